"""Convolutions, channels_last: Conv1D/2D/3D, Conv1D/2D/3DTranspose, DepthwiseConv1D/2D, SeparableConv1D/2D.

Arguments, defaults and weight layouts are Keras': kernel (*kernel_size, in, filters), transposed kernel
(*kernel_size, filters, in), depthwise kernel (*kernel_size, in, depth_multiplier). Each pass is im2col + one
matmul (see conv_math); nothing loops over samples or output positions.
"""
import math

import numpy as np

from dlcli.engine import activations, blas, initializers, lanes
from dlcli.engine.layer import Layer, ranked
from dlcli.errors import ConfigError
from dlcli.layers import conv_math as cm
from dlcli.registry import Size, Sizes


class _Windowed(Layer):
    """Shared argument handling for layers that slide a window (kernel_size, strides, padding, dilation_rate)."""

    rank = 2
    paddings = cm.PADDINGS

    def _window_args(self, kernel_size, strides, padding, dilation_rate=1):
        kind = type(self).__name__
        self.kernel_size = cm.as_tuple(kernel_size, self.rank, "kernel_size", kind)
        self.strides = cm.as_tuple(strides, self.rank, "strides", kind)
        self.dilation_rate = cm.as_tuple(dilation_rate, self.rank, "dilation_rate", kind)
        self.padding = str(padding).lower()
        if self.padding not in self.paddings:
            raise ConfigError(f"{kind}: padding must be one of {', '.join(self.paddings)}; got {padding!r}")
        if max(self.strides) > 1 and max(self.dilation_rate) > 1:  # Keras refuses this combination too
            raise ConfigError(f"{kind}: strides > 1 cannot be combined with dilation_rate > 1")

    def _geometry(self, input_shape):
        return cm.spatial_geometry(self, input_shape, self.rank, self.kernel_size, self.strides, self.padding,
                                   self.dilation_rate)


class _Conv(_Windowed):
    """y = activation(conv(x, kernel) + bias); kernel (*kernel_size, in, filters) as Keras."""

    activation_last = True
    splits_batch = True  # its chunks run on lanes (engine/lanes.py)
    pool_after = None  # the max pooling this conv applies to its own output (graph.py)
    u_ahead = None  # a Winograd conv's (block, U) made ahead of its forward in a training pass (prepare_pass)

    def __init__(self, filters: Size, kernel_size: Sizes, strides: Sizes = 1, padding: str = "valid",
                 dilation_rate: Sizes = 1, groups: Size = 1, activation: str | None = None, use_bias: bool = True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.filters, self.groups, self.use_bias = int(filters), int(groups), use_bias
        if self.groups < 1 or self.filters % self.groups:
            raise ConfigError(f"{type(self).__name__}: filters ({filters}) must be a multiple of groups ({groups})")
        self._window_args(kernel_size, strides, padding, dilation_rate)
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer

    def build(self, input_shape):
        self._geometry(input_shape)
        if input_shape[-1] % self.groups:
            raise ConfigError(f"{type(self).__name__} '{self.name}': its input's {input_shape[-1]} channels must be "
                              f"a multiple of groups ({self.groups})")
        self.kernel = self.add_weight("kernel", (*self.kernel_size, input_shape[-1] // self.groups, self.filters),
                                      self.kernel_initializer, self.kernel_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer, self.bias_regularizer)

    def output_shape(self, input_shape):
        return (*self._geometry(input_shape)[0], self.filters)

    def flops(self, input_shape):
        out = self._geometry(input_shape)[0]
        return 2 * int(np.prod(out)) * int(np.prod(self.kernel_size)) * input_shape[-1] // self.groups * self.filters

    def pools_own_output(self, pool, training=False, reads_inputs=False) -> bool:
        """Whether a pass may hand this conv the max pooling `pool` reading its output (graph.py), under windows
        that tile it: a stride-1 2D conv on few channels, which cm.pooled_conv runs with the pooling, or a
        Winograd-shaped one under windows F(4x4)'s 4x4 output blocks hold whole (cm.winograd_pools; where the
        kernels or the output's size do not allow F(4x4), the conv pools its output itself, as the pooling would).
        In training the conv keeps where each maximum came from and takes the pooled gradient to its weights and
        input; a few-channel one only where it `reads_inputs` (the model's): one whose input gradient a step needs
        pays more for it fused (the book convnet's first conv behind a Rescaling: a step 14.2-15.2 -> 15.5-16.5 ms,
        one thread)."""
        if not (self.rank == pool.rank == 2 and pool.padding == "valid" and pool.strides == pool.pool_size):
            return False
        few = self.groups == 1 and self.strides == (1, 1) and self.kernel.value.shape[-2] < cm.BLOCK_CHANNELS
        return (few and (reads_inputs or not training)) or (
            all(4 % p == 0 for p in pool.pool_size)
            and cm.winograd_shaped(self.kernel.value.shape, self.strides, self.dilation_rate, self.groups))

    def pools_in_its_pass(self, pool_size, out_sizes) -> bool:
        """Whether a forward handed a pooling of windows `pool_size` (pools_own_output) takes it inside its own
        pass, chunk by chunk, never writing its output (out_sizes) whole: cm.pooled_conv on few channels, or F(4x4)'s
        pooled output transform. Otherwise it writes the output and then pools it (_pool_own_output)."""
        if cm.winograd_applies(self.kernel.value.shape, self.strides, self.dilation_rate, self.groups):
            return cm.winograd_pools(out_sizes, pool_size)
        return self.kernel.value.shape[-2] < cm.BLOCK_CHANNELS

    def prepare_pass(self, out_sizes):
        """Before a training pass over the graph (graph.py): a Winograd conv's U = G k G^T for the pass' kernel, made
        in lanes.defer while the caller waits for its lanes in the layers before this one. The pass' forward takes it
        (same kernel, block for `out_sizes`) or, not made by then, makes its own; end_pass drops it."""
        if not cm.winograd_applies(self.kernel.value.shape, self.strides, self.dilation_rate, self.groups):
            return
        pool = self.pool_after.pool_size if self.pool_after is not None else None
        block = cm.winograd_training_block(out_sizes, pool is not None and self.pools_in_its_pass(pool, out_sizes))
        self.u_ahead = False  # wanted, not made yet

        def make():
            if self.u_ahead is False:  # not taken by the forward nor dropped meanwhile
                self.u_ahead = block, cm.winograd_kernel(self.kernel.value, block)
        lanes.defer(make)

    def end_pass(self):
        self.u_ahead = None

    def forward(self, x, training=False):
        self.out_sizes, self.pads = cm.geometry(x.shape[1:-1], self.kernel_size, self.strides, self.padding,
                                                self.dilation_rate)
        self.winograd = cm.winograd_applies(self.kernel.value.shape, self.strides, self.dilation_rate, self.groups)
        pool = self.pool_after.pool_size if self.pool_after is not None else None
        in_pass = pool is not None and self.pools_in_its_pass(pool, self.out_sizes)
        relu = isinstance(self.activation, activations.ReLU) and self.activation.plain
        bias = self.bias.value if self.use_bias else None
        if pool is not None:  # where each pooled maximum came from, for backward
            pooled = (len(x), *(m // p for m, p in zip(self.out_sizes, pool)), self.filters)
            self.pooled_arg = cm.pooled_arg(pooled, pool) if training else None
        self.pooled_in_pass = in_pass
        if self.winograd:  # x itself (its transform reads the padding's zeros); training keeps the tiles only where
            # pooled in its pass, else backward transforms x again (cm.winograd_conv's `keep` says why)
            self.x, self.tiles = x, {} if training and in_pass else None
            self.winograd_block = cm.winograd_training_block(self.out_sizes, in_pass)
            # training keeps U = G k G^T for backward (0.02-0.08 ms a conv to make again), and its taps transposed
            # for the input gradient's products, made while the caller waits for its lanes (lanes.defer; graph.py)
            ahead, self.u_ahead = self.u_ahead, None
            self.winograd_u = None if not training else ahead[1] if ahead and ahead[0] == self.winograd_block else \
                cm.winograd_kernel(self.kernel.value, self.winograd_block)
            self.winograd_u_t = None
            if training:
                lanes.defer(self._transpose_u)
            if in_pass:
                y = self.pooled_y = cm.winograd_conv(x, self.kernel.value, bias, self.out_sizes, self.pads, self.tiles,
                                                     pooled=(pool, relu), arg=self.pooled_arg, u=self.winograd_u)
                return y if relu else self.activation.forward_(y)
            z = cm.winograd_conv(x, self.kernel.value, bias, self.out_sizes, self.pads, self.tiles,
                                 self.winograd_block if training else None, u=self.winograd_u)
            return activations.activate_owned(self, z) if pool is None else self._pool_own_output(z, pool, relu)
        self.xp_shape = cm.padded_shape(x.shape, self.pads)
        if self.groups > 1:
            return self._grouped_forward(cm.pad(x, self.pads))
        if in_pass:
            self.xp = xp = cm.pad(x, self.pads)
            y = self.pooled_y = cm.pooled_conv(xp, self.kernel.value, bias, self.dilation_rate, pool, pooled[1:-1],
                                               relu, self.pooled_arg)
            return y if relu else self.activation.forward_(y)
        # x itself: each chunk's patches are gathered padded (cm.padded_patches), and backward gathers them again
        self.x, self.xp, self.cols = x, None, None
        k, per_sample = math.prod(self.kernel.value.shape[:-1]), math.prod(self.out_sizes)
        weights = self.kernel.value.reshape(k, self.filters)
        if self.use_bias:
            weights = np.concatenate((weights, self.bias.value[None]))
        z = np.empty((x.shape[0] * per_sample, self.filters), x.dtype)

        chunks, kept = self._chunks(len(x))

        def gemms(run):  # each chunk's patches times the kernel, into its rows of z
            for start, stop, cols in self._patch_chunks(x, run, kept):
                blas.product(cols, weights, out=z[start * per_sample:stop * per_sample])
                yield start, cols
        patches = lanes.run(gemms, chunks)
        self.cols = dict(patches) if kept else None  # {start: patches} that backward takes instead of gathering
        z = z.reshape(x.shape[0], *self.out_sizes, self.filters)
        return activations.activate_owned(self, z) if pool is None else self._pool_own_output(z, pool, relu)

    def _transpose_u(self):
        self.winograd_u_t = cm.transposed_taps(self.winograd_u)

    def _pool_own_output(self, z, pool, relu):
        """The max pooling `pool` handed to this conv (pools_own_output), then the activation, of its output z
        where no kernel takes the pooling in its own pass (the NumPy path; F(2x2)'s small outputs). In training
        backward takes the pooled gradient to z's (self.z_shape) from pooled_arg, then as an unpooled conv."""
        pooled = tuple(m // p for m, p in zip(self.out_sizes, pool))
        self.z_shape = z.shape
        y = self.pooled_y = cm.tile_max(z, pool, pooled, relu, np.empty((len(z), *pooled, self.filters), z.dtype),
                                        self.pooled_arg)
        return y if relu else self.activation.forward_(y)

    def _chunks(self, n):
        """([(start, stop)] of the samples gathered at once, whether their patches are kept for backward): a few
        at a time, so each GEMM reads patches im2col has just written, from cache, where one array of every patch
        came back from memory (and needed keeping until backward). Single-thread CPU per GEMM + im2col, AMD EPYC
        (Zen 4) at load ~22: resnet 14x14x32 -> 32 4.99 -> 3.17 ms, book convnet conv 2 4.44 -> 3.31; the kernel
        gradient, im2col included again, 4.31 -> 3.58. Few channels (a memory-bound GEMM, a costlier gather) or few
        patches: KEPT_CHUNKS chunks, kept for backward (one chunk kept the first conv of the book convnet and the
        resnet's stem on one core). The chunks are the lanes' parts (engine/lanes.py): never the lane count's."""
        k, per_sample = math.prod(self.kernel.value.shape[:-1]), math.prod(self.out_sizes)
        kept = self.xp_shape[-1] < cm.BLOCK_CHANNELS or n * per_sample * (k + 1) <= 2 * cm.CHUNK_FLOATS
        if kept:
            return [(a, b) for a, b in lanes.split(n, cm.KEPT_CHUNKS) if a < b], True
        return cm.even_chunks(n, max(1, cm.CHUNK_FLOATS // (per_sample * (k + 1)))), False

    def _patch_chunks(self, x, chunks, fresh=False):
        """(start, stop, the patches of samples start:stop of x, padded by self.pads, as (positions, kernel taps [+ a
        column of ones])) for each chunk, in one buffer reused (its contents valid until the next), or `fresh` ones
        to keep. With the ones, the GEMM adds the bias and its transpose in backward sums the bias gradient with the
        kernel's."""
        k, per_sample = math.prod(self.kernel.value.shape[:-1]), math.prod(self.out_sizes)
        most = max(stop - start for start, stop in chunks)
        shared = None if fresh else self._patch_buffer(most, per_sample, k, x.dtype)
        for start, stop in chunks:
            if shared is None:
                cols, patches = self._patch_buffer(stop - start, per_sample, k, x.dtype)
            elif stop - start == most:
                cols, patches = shared
            else:  # a smaller chunk (they differ by one sample): the buffer's first rows, position-major layout
                cols = shared[0][:(stop - start) * per_sample]
                patches = cols[:, :k].reshape(stop - start, *self.out_sizes, *self.kernel_size, -1, copy=False)
            cm.padded_patches(x[start:stop], self.pads, self.kernel_size, self.out_sizes, self.strides,
                              self.dilation_rate, patches)
            yield start, stop, cols

    def _patch_buffer(self, samples, per_sample, k, dtype):
        """(cols, the view of its first k columns im2col fills) for `samples` samples."""
        c, rank = self.kernel.value.shape[-2], self.rank
        if c < cm.BLOCK_CHANNELS:
            # Few channels: the patches transposed in memory, (kernel taps [+ ones], positions), so each tap copies
            # along whole output rows. Book convnet conv1: im2col 0.28 -> 0.13 ms, its kernel gradient 0.63 -> 0.51.
            cols = np.empty((k + self.use_bias, samples * per_sample), dtype).T
            patches = cols[:, :k].T.reshape(*self.kernel_size, c, samples, *self.out_sizes)
            patches = patches.transpose(rank + 1, *range(rank + 2, 2 * rank + 2), *range(rank), rank)
        else:
            cols = np.empty((samples * per_sample, k + self.use_bias), dtype)
            patches = cols[:, :k].reshape(samples, *self.out_sizes, *self.kernel_size, c)
        if self.use_bias:
            cols[:, k] = 1
        return cols, patches

    # groups > 1 (Keras' grouped convolution, ConvNeXt's depthwise Conv2D): input channels and filters split into
    # `groups` consecutive blocks, filter block j reading channel block j only. One batched product per kernel tap.
    def _grouped_kernel(self, kernel):
        """(*k, in/groups, filters) -> (*k, groups, in/groups, filters/groups)."""
        *k, cg, f = kernel.shape
        return kernel.reshape(*k, cg, self.groups, f // self.groups).swapaxes(-3, -2)

    def _grouped_forward(self, xp):
        self.xp = xp
        positions = xp.shape[0] * int(np.prod(self.out_sizes))
        kernel = self._grouped_kernel(self.kernel.value)
        y = np.zeros((positions, self.groups, self.filters // self.groups), xp.dtype)
        for offset in cm.offsets(self.kernel_size):
            window = xp[cm.window(offset, self.out_sizes, self.strides, self.dilation_rate)]
            y += np.einsum("pgc,gcf->pgf", window.reshape(positions, self.groups, -1), kernel[offset])
        y = y.reshape(xp.shape[0], *self.out_sizes, self.filters)
        if self.use_bias:
            y += self.bias.value
        return self.activate(y)

    def _grouped_backward(self, grad):
        g = np.ascontiguousarray(self.activation_backward(grad))
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += g.reshape(-1, self.filters).sum(0)
        g = g.reshape(-1, self.groups, self.filters // self.groups)
        kernel = self._grouped_kernel(self.kernel.value)
        kernel_grad = None if self.kernel.grad is None else self._grouped_kernel(self.kernel.grad)  # a view
        dxp = np.zeros(self.xp.shape, g.dtype) if self.input_grad_needed else None
        for offset in cm.offsets(self.kernel_size):
            index = cm.window(offset, self.out_sizes, self.strides, self.dilation_rate)
            if kernel_grad is not None:
                window = self.xp[index].reshape(len(g), self.groups, -1)
                kernel_grad[offset] += np.einsum("pgc,pgf->gcf", window, g)
            if dxp is not None:
                dxp[index] += np.einsum("pgf,gcf->pgc", g, kernel[offset]).reshape(dxp[index].shape)
        return None if dxp is None else cm.unpad(dxp, self.pads)

    def backward(self, grad):
        if self.groups > 1:
            return self._grouped_backward(grad)
        if self.pool_after is not None:
            return self._pooled_backward(grad)
        return self._output_backward(self.activation_backward(grad))

    def _output_backward(self, g):
        """The input's gradient (None where not needed) from the conv output's g, the weights' added to theirs."""
        g = np.ascontiguousarray(g).reshape(-1, self.filters)
        if self.winograd:
            return self._winograd_backward(g)
        k = math.prod(self.kernel.value.shape[:-1])
        if self.kernel.grad is not None or (self.use_bias and self.bias.grad is not None):
            grads = np.zeros((k + self.use_bias, self.filters), g.dtype)  # k kernel rows [+ the bias row]
            per_sample = math.prod(self.out_sizes)

            def products(run):  # each chunk's patches.T @ its output gradient
                patches = (self._patch_chunks(self.x, run) if self.cols is None else
                           [(start, stop, self.cols[start]) for start, stop in run])
                return [blas.product(cols.T, g[start * per_sample:stop * per_sample]) for start, stop, cols in patches]
            for product in lanes.run(products, self._chunks(len(self.x))[0]):  # summed in chunk order on any lanes
                grads += product
            if self.kernel.grad is not None:
                self.kernel.grad += grads[:k].reshape(self.kernel.grad.shape)
            if self.use_bias and self.bias.grad is not None:
                self.bias.grad += grads[k]
        if not self.input_grad_needed:  # the first conv reads data: skip its (large) input gradient
            return None
        dxp = cm.col2im_matmul(g, self.kernel.value, self.xp_shape, self.out_sizes, self.strides,
                               self.dilation_rate)
        return cm.unpad(dxp, self.pads)

    def _pooled_backward(self, grad):
        """The backward of a training forward that pooled its own output: grad is the pooling's output gradient."""
        relu = isinstance(self.activation, activations.ReLU) and self.activation.plain
        g, pool = grad if relu else self.activation.backward(grad), self.pool_after.pool_size
        wanted = (self.kernel.grad is not None, self.input_grad_needed, self.use_bias and self.bias.grad is not None)
        if not self.pooled_in_pass:  # the output written whole and pooled after (_pool_own_output)
            return self._output_backward(cm.max_pool_backward(g, self.pooled_arg, self.z_shape, pool,
                                                              self.pooled_y.shape[1:-1], pool,
                                                              self.pooled_y if relu else None))
        if self.winograd:  # pooled in F(4x4)'s output transform
            return self._winograd_backward(g, (pool, relu, self.pooled_arg, self.pooled_y))
        kernel_grad, dxp, bias_grad = cm.pooled_conv_backward(g, self.pooled_y, self.pooled_arg, self.xp,
                                                              self.kernel.value, self.dilation_rate, pool, relu,
                                                              *wanted)
        self._add_gradients(kernel_grad, bias_grad)
        return None if dxp is None else cm.unpad(dxp, self.pads)

    def _winograd_backward(self, g, pooled=None):
        """`pooled`: (pool, relu, where the maxima came from, the pooled output), g the pooled output's gradient."""
        if pooled is None:
            g = g.reshape(len(self.x), *self.out_sizes, self.filters)
        _, dx, bias_grad = cm.winograd_backward(  # the kernel's gradient added to its own later (lanes.defer)
            g, self.kernel.value, self.x, self.out_sizes, self.pads, self.tiles, self.kernel.grad is not None,
            self.input_grad_needed, self.use_bias and self.bias.grad is not None, self.winograd_block, pooled,
            self.winograd_u, self.kernel.grad, self.winograd_u_t)
        self._add_gradients(None, bias_grad)
        return dx

    def _add_gradients(self, kernel_grad, bias_grad):
        """The kernel's and bias's gradients (None: not computed) added to their weights' accumulated ones."""
        if kernel_grad is not None:
            self.kernel.grad += kernel_grad
        if bias_grad is not None:
            self.bias.grad += bias_grad

    def to_onnx(self, g, x, in_shape, mask):
        k = self.rank
        x = g.first(x)
        _, pads = cm.geometry(in_shape[:-1], self.kernel_size, self.strides, self.padding, self.dilation_rate)
        kernel = self.kernel.value.transpose(k + 1, k, *range(k))  # (*k, in, out) -> ONNX's (out, in, *k)
        inputs = [x.name, g.weight(self, kernel, "kernel")]
        if self.use_bias:
            inputs.append(g.weight(self, self.bias.value, "bias"))
        y = g.op("Conv", inputs, self.name, kernel_shape=list(self.kernel_size), strides=list(self.strides),
                 dilations=list(self.dilation_rate), pads=g.pads(pads), group=self.groups)
        return g.activate(self.activation, g.value(y, x.rank, True))


Conv1D = ranked("Conv1D", _Conv, 1, "On (batch, steps, channels); padding may also be 'causal' (left padding only, "
                "as Keras).", paddings=("valid", "same", "causal"))
Conv2D = ranked("Conv2D", _Conv, 2)
Conv3D = ranked("Conv3D", _Conv, 3, "On (batch, depth, height, width, channels), e.g. video frames.")


class _ConvTranspose(_Windowed):
    """The adjoint (gradient) of a convolution, as TF's conv_transpose; kernel (*kernel_size, filters, in) as Keras.

    Output length per axis (Keras' deconv_output_length): valid n*s + max(k - s, 0), same n*s, or with
    output_padding p: (n - 1)*s + k - 2*pad + p (pad = k // 2 for same).
    """

    def __init__(self, filters: Size, kernel_size: Sizes, strides: Sizes = 1, padding: str = "valid",
                 output_padding=None, dilation_rate: Sizes = 1, activation: str | None = None,
                 use_bias: bool = True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.filters, self.use_bias = int(filters), use_bias
        self._window_args(kernel_size, strides, padding, dilation_rate)
        self.output_padding = None if output_padding is None else tuple(
            int(v) for v in ([output_padding] * self.rank if isinstance(output_padding, int) else output_padding))
        if self.output_padding is not None and any(p >= s for p, s in zip(self.output_padding, self.strides)):
            raise ConfigError(f"{type(self).__name__}: output_padding {self.output_padding} must be smaller than "
                              f"strides {self.strides} (as Keras requires)")
        self.activation = activations.get(activation)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer, self.bias_regularizer = kernel_regularizer, bias_regularizer

    def _transpose_geometry(self, sizes):
        """Output sizes and, per axis, the (before, after) pads that embed the output in the kernels' scatter
        buffer: the padding of the Conv2D this layer is the adjoint of (TF's conv2d_transpose)."""
        out, pads = [], []
        ops = self.output_padding or (None,) * self.rank
        for n, k, s, op in zip(sizes, cm.effective(self.kernel_size, self.dilation_rate), self.strides, ops):
            if op is None:
                m = n * s + max(k - s, 0) if self.padding == "valid" else n * s
            else:
                m = (n - 1) * s + k - 2 * (k // 2 if self.padding == "same" else 0) + op
            full = (n - 1) * s + k  # the extent the kernels' scatter covers
            before = max(full - m, 0) // 2 if self.padding == "same" else 0
            out.append(m)
            pads.append((before, max(full, before + m) - before - m))
        return tuple(out), tuple(pads)

    def output_shape(self, input_shape):
        self._check_rank(input_shape)
        out, _ = self._transpose_geometry([1 if n is None else n for n in input_shape[:-1]])
        return (*(None if n is None else m for m, n in zip(out, input_shape[:-1])), self.filters)

    def _check_rank(self, input_shape):
        cm.spatial_geometry(self, input_shape, self.rank, (1,) * self.rank, (1,) * self.rank, "valid")

    def build(self, input_shape):
        self._check_rank(input_shape)
        self.kernel = self.add_weight("kernel", (*self.kernel_size, self.filters, input_shape[-1]),
                                      self.kernel_initializer, self.kernel_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer, self.bias_regularizer)

    def flops(self, input_shape):
        return 2 * int(np.prod(input_shape)) * int(np.prod(self.kernel_size)) * self.filters

    def forward(self, x, training=False):
        self.in_sizes = x.shape[1:-1]
        out, self.pads = self._transpose_geometry(self.in_sizes)
        buffer = (x.shape[0], *(m + a + b for m, (a, b) in zip(out, self.pads)), self.filters)
        self.x2 = x.reshape(-1, x.shape[-1])
        yp = cm.col2im_matmul(self.x2, self.kernel.value, buffer, self.in_sizes, self.strides, self.dilation_rate)
        y = cm.unpad(yp, self.pads)
        if self.use_bias:
            y = y + self.bias.value
        return self.activate(y)

    def backward(self, grad):
        g = self.activation_backward(grad)
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += g.reshape(-1, self.filters).sum(0)
        cols = cm.im2col(cm.pad(g, self.pads), self.kernel_size, self.in_sizes, self.strides, self.dilation_rate)
        cols = cols.reshape(self.x2.shape[0], -1)
        if self.kernel.grad is not None:
            self.kernel.grad += np.dot(cols.T, self.x2).reshape(self.kernel.grad.shape)
        w2 = self.kernel.value.reshape(-1, self.kernel.value.shape[-1])
        return np.dot(cols, w2).reshape(g.shape[0], *self.in_sizes, -1)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.first(x)
        sizes = in_shape[:-1]
        out, pads = self._transpose_geometry(sizes)
        onnx_pads, output_padding = [], []
        for n, m, (before, _), k, s in zip(sizes, out, pads, cm.effective(self.kernel_size, self.dilation_rate),
                                           self.strides):
            full = (n - 1) * s + k  # the scatter's extent; dlcli crops `before` and keeps m values from there
            onnx_pads.append((before, max(full - before - m, 0)))
            output_padding.append(max(before + m - full, 0))
        k = self.rank
        kernel = self.kernel.value.transpose(k + 1, k, *range(k))  # (*k, out, in) -> ONNX's (in, out, *k)
        inputs = [x.name, g.weight(self, kernel, "kernel")]
        if self.use_bias:
            inputs.append(g.weight(self, self.bias.value, "bias"))
        y = g.op("ConvTranspose", inputs, self.name, kernel_shape=list(self.kernel_size),
                 strides=list(self.strides), dilations=list(self.dilation_rate), pads=g.pads(onnx_pads),
                 output_padding=output_padding)
        return g.activate(self.activation, g.value(y, x.rank, True))


Conv1DTranspose = ranked("Conv1DTranspose", _ConvTranspose, 1)
Conv2DTranspose = ranked("Conv2DTranspose", _ConvTranspose, 2)
Conv3DTranspose = ranked("Conv3DTranspose", _ConvTranspose, 3)


class _Depthwise(_Windowed):
    """Per-channel spatial convolution; output channel c * depth_multiplier + m as TF orders it."""

    def _depthwise_forward(self, x, kernel):
        self.out_sizes, self.pads = cm.geometry(x.shape[1:-1], self.kernel_size, self.strides, self.padding,
                                                self.dilation_rate)
        self.xp = cm.pad(x, self.pads)
        y = None
        for offset in cm.offsets(self.kernel_size):
            term = self.xp[cm.window(offset, self.out_sizes, self.strides, self.dilation_rate)][..., None] * kernel[offset]
            y = term if y is None else y.__iadd__(term)
        return y.reshape(*y.shape[:-2], -1)

    def flops(self, input_shape) -> int:
        """Each output position of each of the in x depth_multiplier channels: one multiply-add per kernel tap."""
        out = self._geometry(input_shape)[0]
        return 2 * int(np.prod(out)) * int(np.prod(self.kernel_size)) * input_shape[-1] * self.depth_multiplier

    def _depthwise_backward(self, grad, kernel, kernel_grad):
        g = grad.reshape(*grad.shape[:-1], *kernel.shape[-2:])
        g2 = g.reshape(-1, *kernel.shape[-2:])
        dxp = np.zeros(self.xp.shape, grad.dtype)
        for offset in cm.offsets(self.kernel_size):
            index = cm.window(offset, self.out_sizes, self.strides, self.dilation_rate)
            if kernel_grad is not None:
                kernel_grad[offset] += np.einsum("pc,pcm->cm", self.xp[index].reshape(-1, kernel.shape[-2]), g2)
            dxp[index] += (g * kernel[offset]).sum(-1)
        return cm.unpad(dxp, self.pads)

    def _depthwise_onnx(self, g, x, in_shape, kernel, tag) -> str:
        """Grouped Conv, one group per input channel; output channel c * depth_multiplier + m as TF (and ONNX)."""
        _, pads = cm.geometry(in_shape[:-1], self.kernel_size, self.strides, self.padding, self.dilation_rate)
        *k, cin, dm = kernel.shape
        w = kernel.reshape(*k, cin * dm).transpose(self.rank, *range(self.rank))[:, None]
        return g.op("Conv", [x.name, g.weight(self, w, tag)], f"{self.name}_{tag}", kernel_shape=k,
                    strides=list(self.strides), dilations=list(self.dilation_rate), pads=g.pads(pads), group=cin)


class _DepthwiseConv(_Depthwise):
    """Weights: kernel (*kernel_size, in, depth_multiplier) then bias (in * depth_multiplier), as Keras 3 names
    them."""

    def __init__(self, kernel_size: Sizes, strides: Sizes = 1, padding: str = "valid", depth_multiplier: Size = 1,
                 dilation_rate: Sizes = 1, activation: str | None = None, use_bias: bool = True,
                 depthwise_initializer="glorot_uniform", bias_initializer="zeros", depthwise_regularizer=None,
                 bias_regularizer=None, **kw):
        super().__init__(**kw)
        self._window_args(kernel_size, strides, padding, dilation_rate)
        self.depth_multiplier, self.use_bias = int(depth_multiplier), use_bias
        self.activation = activations.get(activation)
        self.depthwise_initializer = initializers.get(depthwise_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.depthwise_regularizer, self.bias_regularizer = depthwise_regularizer, bias_regularizer

    def build(self, input_shape):
        self._geometry(input_shape)
        self.kernel = self.add_weight("kernel", (*self.kernel_size, input_shape[-1], self.depth_multiplier),
                                      self.depthwise_initializer, self.depthwise_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (input_shape[-1] * self.depth_multiplier,), self.bias_initializer,
                                        self.bias_regularizer)

    def output_shape(self, input_shape):
        return (*self._geometry(input_shape)[0], input_shape[-1] * self.depth_multiplier)

    def forward(self, x, training=False):
        y = self._depthwise_forward(x, self.kernel.value)
        if self.use_bias:
            y += self.bias.value
        return self.activate(y)

    def backward(self, grad):
        g = self.activation_backward(grad)
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += g.reshape(-1, g.shape[-1]).sum(0)
        return self._depthwise_backward(g, self.kernel.value, self.kernel.grad)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.first(x)
        y = self._depthwise_onnx(g, x, in_shape, self.kernel.value, "depthwise")
        if self.use_bias:
            y = g.op("Add", [y, g.weight(self, self.bias.value.reshape(-1, *(1,) * self.rank), "bias")], self.name)
        return g.activate(self.activation, g.value(y, self.rank + 2, True))


DepthwiseConv1D = ranked("DepthwiseConv1D", _DepthwiseConv, 1)
DepthwiseConv2D = ranked("DepthwiseConv2D", _DepthwiseConv, 2)


class _SeparableConv(_Depthwise):
    """Depthwise then pointwise (1x1) convolution. Weights, as Keras: depthwise_kernel (*kernel_size, in, dm),
    pointwise_kernel (1, ..., in * dm, filters), bias (filters)."""

    def __init__(self, filters: Size, kernel_size: Sizes, strides: Sizes = 1, padding: str = "valid",
                 depth_multiplier: Size = 1, dilation_rate: Sizes = 1, activation: str | None = None,
                 use_bias: bool = True, depthwise_initializer="glorot_uniform", pointwise_initializer="glorot_uniform",
                 bias_initializer="zeros", depthwise_regularizer=None, pointwise_regularizer=None,
                 bias_regularizer=None, **kw):
        super().__init__(**kw)
        self.filters, self.depth_multiplier, self.use_bias = int(filters), int(depth_multiplier), use_bias
        self._window_args(kernel_size, strides, padding, dilation_rate)
        self.activation = activations.get(activation)
        self.depthwise_initializer = initializers.get(depthwise_initializer)
        self.pointwise_initializer = initializers.get(pointwise_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.depthwise_regularizer, self.pointwise_regularizer = depthwise_regularizer, pointwise_regularizer
        self.bias_regularizer = bias_regularizer

    def build(self, input_shape):
        self._geometry(input_shape)
        mid = input_shape[-1] * self.depth_multiplier
        self.depthwise_kernel = self.add_weight("depthwise_kernel", (*self.kernel_size, input_shape[-1],
                                                                     self.depth_multiplier),
                                                self.depthwise_initializer, self.depthwise_regularizer)
        self.pointwise_kernel = self.add_weight("pointwise_kernel", (*(1,) * self.rank, mid, self.filters),
                                                self.pointwise_initializer, self.pointwise_regularizer)
        if self.use_bias:
            self.bias = self.add_weight("bias", (self.filters,), self.bias_initializer, self.bias_regularizer)

    def output_shape(self, input_shape):
        return (*self._geometry(input_shape)[0], self.filters)

    def flops(self, input_shape):
        out = self._geometry(input_shape)[0]
        pointwise = 2 * int(np.prod(out)) * input_shape[-1] * self.depth_multiplier * self.filters
        return super().flops(input_shape) + pointwise

    def forward(self, x, training=False):
        self.mid = self._depthwise_forward(x, self.depthwise_kernel.value)
        y = np.dot(self.mid.reshape(-1, self.mid.shape[-1]), self.pointwise_kernel.value[(0,) * self.rank])
        if self.use_bias:
            y += self.bias.value
        return self.activate(y.reshape(*self.mid.shape[:-1], self.filters))

    def backward(self, grad):
        g = np.ascontiguousarray(self.activation_backward(grad)).reshape(-1, self.filters)
        mid2 = self.mid.reshape(-1, self.mid.shape[-1])
        if self.use_bias and self.bias.grad is not None:
            self.bias.grad += g.sum(0)
        if self.pointwise_kernel.grad is not None:
            self.pointwise_kernel.grad[(0,) * self.rank] += np.dot(mid2.T, g)
        gmid = np.dot(g, self.pointwise_kernel.value[(0,) * self.rank].T).reshape(self.mid.shape)
        return self._depthwise_backward(gmid, self.depthwise_kernel.value, self.depthwise_kernel.grad)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.first(x)
        mid = self._depthwise_onnx(g, x, in_shape, self.depthwise_kernel.value, "depthwise")
        # (mid, out) -> ONNX's (out, mid, 1, ...)
        pointwise = self.pointwise_kernel.value[(0,) * self.rank].T.reshape(self.filters, -1, *(1,) * self.rank)
        inputs = [mid, g.weight(self, pointwise, "pointwise")]
        if self.use_bias:
            inputs.append(g.weight(self, self.bias.value, "bias"))
        y = g.op("Conv", inputs, self.name, kernel_shape=[1] * self.rank)
        return g.activate(self.activation, g.value(y, self.rank + 2, True))


SeparableConv1D = ranked("SeparableConv1D", _SeparableConv, 1)
SeparableConv2D = ranked("SeparableConv2D", _SeparableConv, 2)
