"""BatchNormalization, LayerNormalization, RMSNormalization, GroupNormalization, UnitNormalization and Normalization
with Keras' arguments, defaults and weight order (gamma, beta, ...; mean, variance, count)."""
import numpy as np

from dlcli import kernels
from dlcli.engine import initializers, lanes
from dlcli.engine.layer import Layer, Param, register
from dlcli.errors import ConfigError, ShapeError
from dlcli.layers import conv_math as cm


def _axes(axis, rank: int, layer) -> tuple[int, ...]:
    """Normalised (non-negative, batch-free) axes; Keras counts them with the batch axis, so axis 1 is ours 0."""
    axes = [axis] if isinstance(axis, int) else list(axis)
    out = []
    for a in axes:
        a = a + rank + 1 if a < 0 else a
        if not 1 <= a <= rank:
            raise ShapeError(f"{type(layer).__name__} '{layer.name}': axis {axis} is out of range for inputs of "
                             f"rank {rank + 1} (the batch axis 0 cannot be normalised over)")
        out.append(a - 1)
    return tuple(sorted(out))


def _sum(a, axes):
    """a.sum(axes, keepdims=True), as a BLAS ones-vector product when the axes are all leading or all trailing:
    about 5x faster than NumPy's reduction on float32 batches, and normalisation is reduction-bound."""
    k, nd = len(axes), a.ndim
    shape = tuple(1 if i in axes else n for i, n in enumerate(a.shape))
    if axes == tuple(range(k)):
        a2 = a.reshape(-1, int(np.prod(a.shape[k:], dtype=np.int64)))
        return np.dot(np.ones(a2.shape[0], a.dtype), a2).reshape(shape)
    if axes == tuple(range(nd - k, nd)):
        a2 = a.reshape(-1, int(np.prod(a.shape[nd - k:], dtype=np.int64)))
        return np.dot(a2, np.ones(a2.shape[1], a.dtype)).reshape(shape)
    return a.sum(axes, keepdims=True)


def _channelwise(ufunc, a, v, out=None):
    """ufunc(a, v, out) for a per-channel v (shape (1, ..., 1, channels)) against a channels-last a. NumPy's inner
    loop runs along one row, so a row per position (32 channels) pays its loop overhead 32 elements at a time:
    over rows of a whole sample, against v tiled to match, x - mean at 64x28x28x32 takes 0.24 ms instead of 0.50."""
    if a.ndim < 3 or v.size != a.shape[-1] or v.shape[-1] != a.shape[-1] or not a.flags.c_contiguous:
        return ufunc(a, v, out=out)
    rows = a.reshape(a.shape[0], -1)
    res = ufunc(rows, np.tile(v.reshape(-1), rows.shape[1] // v.size),
                out=None if out is None else out.reshape(rows.shape))
    return res.reshape(a.shape)


def _mean(a, axes):
    return _sum(a, axes) / a.dtype.type(np.prod([a.shape[i] for i in axes]))


class _Normalization(Layer):
    supports_masking = True

    def _build_affine(self, input_shape):
        self.feature_axes = _axes(self.axis, len(input_shape), self)
        shape = tuple(input_shape[a] for a in self.feature_axes)
        # broadcast shape of the weights against (batch, *input_shape)
        self.param_view = (1, *[input_shape[a] if a in self.feature_axes else 1 for a in range(len(input_shape))])
        if self.scale:
            self.gamma = self.add_weight("gamma", shape, self.gamma_initializer, self.gamma_regularizer)
        if self.center:
            self.beta = self.add_weight("beta", shape, self.beta_initializer, self.beta_regularizer)
        return shape

    def _affine(self, xhat):
        y = _channelwise(np.multiply, xhat, self.gamma.value.reshape(self.param_view)) if self.scale else xhat.copy()
        if self.center:
            _channelwise(np.add, y, self.beta.value.reshape(self.param_view), out=y)
        return y

    def _affine_backward(self, grad, reduce_axes):
        """Adds the gamma/beta gradients; returns d(loss)/d(xhat)."""
        if self.center and self.beta.grad is not None:
            self.beta.grad += _sum(grad, reduce_axes).reshape(self.beta.grad.shape)
        if not self.scale:
            return grad
        if self.gamma.grad is not None:
            self.gamma.grad += _sum(grad * self.xhat, reduce_axes).reshape(self.gamma.grad.shape)
        return grad * self.gamma.value.reshape(self.param_view)

    def _affine_arrays(self, shape):
        """(gamma, beta) as arrays, ones and zeros where scale or center is off, for the ONNX graph."""
        gamma = self.gamma.value if self.scale else np.ones(shape, np.float32)
        beta = self.beta.value if self.center else np.zeros(shape, np.float32)
        return gamma, beta


@register("BatchNormalization")
class BatchNormalization(_Normalization):
    """Batch statistics while training (and then moving = momentum * moving + (1 - momentum) * batch), moving ones
    at inference, as Keras 3: biased batch variance, and a layer with trainable=False always runs in inference mode.
    With a mask (Embedding mask_zero, Masking) the statistics are over the unmasked steps only, as Keras 3's
    `_moments(inputs, mask)`; every step is still normalised. Weights in Keras' order: gamma, beta, moving_mean,
    moving_variance (the last two non-trainable)."""

    def __init__(self, axis=-1, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, **kw):
        super().__init__(**kw)
        self.axis, self.momentum, self.epsilon = axis, float(momentum), float(epsilon)
        self.center, self.scale = center, scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer, self.gamma_regularizer = beta_regularizer, gamma_regularizer
        self.sync = None  # set by dlcli.distributed for data-parallel training

    def build(self, input_shape):
        shape = self._build_affine(input_shape)
        self.moving_mean = self.add_weight("moving_mean", shape, self.moving_mean_initializer, trainable=False)
        self.moving_variance = self.add_weight("moving_variance", shape, self.moving_variance_initializer,
                                               trainable=False)
        self.reduce_axes = (0, *[a + 1 for a in range(len(input_shape)) if a not in self.feature_axes])

    post_activation = None  # the ReLU layer after it, applied here when the graph moved it (graph.py)
    # In training the graph may run the Add after it here too (graph.py): `residual` is then the Add's other input
    # for this call, `sum_activation` the Add's own post_activation (its ReLU or None), and the output is the Add's
    residual = sum_activation = None
    # In training the graph may hand it the max pooling after its ReLU layer (a residual net's stem, BN -> ReLU ->
    # MaxPooling: pools_in_training): the output is then that pooling's, the ReLU applied, and both layers pass on
    pool_after = None

    def pools_in_training(self, pool) -> bool:
        """Whether the layer can make `pool`'s output (pool_after): channels-last statistics of images, pooled in
        windows that tile them (2D, 'valid', strides of the pool's size)."""
        return (self.reduce_axes == (0, 1, 2) and pool.rank == 2 and pool.padding == "valid"
                and tuple(pool.strides) == tuple(pool.pool_size))

    def forward(self, x, training=False):
        self.training = training and self.trainable
        self.relu_fused = False  # True: the compiled passes applied the post_activation ReLU themselves
        self.pooled = None  # (the pooling's argmax, its output, the geometry) where the layer pooled its output
        residual, self.residual = self.residual, None  # this call's: the layer keeps no reference to it
        if self.pool_after is not None:
            return self._pooled_forward(x)
        y = self._forward(x, residual)
        if residual is None:
            return y if self.post_activation is None or self.relu_fused else self.post_activation.forward_(y)
        if self.summed:  # by the compiled pass, and clamped: the ReLU's backward reads its output, cached here
            if self.sum_activation is not None:
                self.sum_activation.y = y
            return y
        # y is this call's own array, as the Add's new one; the residual comes in the Add's dtype (the graph casts
        # it), which is this layer's (graph._summed_adds)
        y = np.add(y, residual, out=y)
        return y if self.sum_activation is None else self.sum_activation.forward_(y)

    def _pooled_forward(self, x):
        """relu(max pooling of the output) in `pool_after`'s windows: the compiled pass normalises, pools and clamps
        at once with batch statistics; otherwise the layers' own passes run one after the other."""
        pool = self.pool_after.pool_size
        out_sizes = tuple(m // p for m, p in zip(x.shape[1:3], pool))
        compiled = self._compiled(x) if self.training and self.input_mask is None and self.sync is None else None
        if compiled is None:
            y, arg = cm.max_pool(self._forward(x), pool, out_sizes, pool, relu=True)
            self.pooled = (arg, y, pool, out_sizes, x.shape, False)
            return y
        self.mask_weights, self.summed = None, False
        c, dt = x.shape[-1], x.dtype
        mean, inv_std = self._compiled_statistics(compiled, x.reshape(-1, c))
        gamma, beta = self._compiled_affine(dt)
        y = np.empty((len(x), *out_sizes, c), dt)
        arg = np.empty(y.shape, np.uint8 if np.prod(pool) < 256 else np.int32)
        lanes.run(lambda run: [compiled.normalise_pooled(x[a:b], mean, inv_std, gamma, beta, *pool, True, arg[a:b],
                                                         y[a:b]) for a, b in run], cm.batch_parts(len(x)))
        self.xhat, self.x, self.mean = None, x, mean
        self.inv_std = inv_std.reshape(self.param_view)
        self.pooled = (arg, y, pool, out_sizes, x.shape, True)
        return y

    def _compiled_statistics(self, compiled, rows, then=None):
        """[mean, inv_std] of the batch's rows (rows, C) from the compiled shifted sums; the moving ones updated.
        then(run, mean, inv_std): a pass over the same ranges of rows ((index, start, stop) each), after the
        statistics in the same lanes run (its `halfway`)."""
        c, dt = rows.shape[1], rows.dtype
        parts, short = _row_parts(len(rows), c)
        shift = rows[0].astype(np.float64)  # every range's: the sums add up
        sums, stats = np.empty((len(parts), 2, c), np.float64), []

        def statistics():
            stats.extend(self._statistics(compiled, sums, shift, len(rows), dt))
        lanes.run(lambda run: [compiled.shifted_sums(rows[a:b], shift, sums[i, 0], sums[i, 1]) for i, a, b in run],
                  [(i, a, b) for i, (a, b) in enumerate(parts)], short,
                  None if then is None else (statistics, lambda run: then(run, *stats)))
        if then is None:
            statistics()
        return stats

    def _statistics(self, compiled, sums, shift, n, dt):
        """(mean, inv_std) from the ranges' shifted sums, the moving ones updated: compiled.statistics where the
        moving ones have the batch's dtype (new arrays, as _update_moving makes), else its twin here. On the calling
        thread while the lanes wait: the resnet's eight BatchNormalizations' forward, its CPU a step on 2 lanes,
        steps alternating, AMD EPYC at load 8, median 2.57-2.95 -> 2.27-2.46 ms (the twin's ~15 NumPy calls)."""
        old = (self.moving_mean.value, self.moving_variance.value)
        if compiled is not None and all(v.dtype == dt and v.ndim == 1 for v in old):
            moving, mean, inv_std = [v.copy() for v in old], np.empty(len(shift), dt), np.empty(len(shift), dt)
            compiled.statistics(sums, shift, n, dt.type(self.momentum), dt.type(self.epsilon), *moving, mean, inv_std)
            self.moving_mean.value, self.moving_variance.value = moving
            return mean, inv_std
        d, dd = _summed(sums[:, 0]) / n, _summed(sums[:, 1]) / n
        mean, var = (shift + d).astype(dt), np.maximum(dd - d * d, 0.0).astype(dt)
        self._update_moving(mean, var, dt.type)
        return mean, 1 / np.sqrt(var + dt.type(self.epsilon))

    def _forward(self, x, residual=None):
        dtype = x.dtype.type
        self.mask_weights, self.summed = None, False
        compiled = self._compiled(x) if self.training and self.input_mask is None and self.sync is None else None
        if compiled is not None:
            return self._forward_compiled(compiled, x, residual)
        if self.training:
            if self.input_mask is not None:
                mean, var, count = self._masked_moments(x, self.input_mask)
                centered = x - mean
            else:
                mean = _mean(x, self.reduce_axes)
                centered = _channelwise(np.subtract, x, mean)
                var = _mean(centered * centered, self.reduce_axes)
                count = float(x.size // mean.size)
            if self.sync is not None and not self.sync.paused:
                mean, var = self._global_moments(x, mean, var, count)
                centered = x - mean
            self._update_moving(mean, var, dtype)
        else:
            centered = _channelwise(np.subtract, x,
                                    self.moving_mean.value.reshape(self.param_view).astype(x.dtype, copy=False))
            var = self.moving_variance.value.reshape(self.param_view).astype(x.dtype, copy=False)
        self.inv_std = 1 / np.sqrt(var + dtype(self.epsilon))
        # centered is this call's own array
        self.xhat = _channelwise(np.multiply, centered, self.inv_std, out=centered)
        return self._affine(self.xhat)

    def backward(self, grad):
        if self.pooled is not None:  # grad is the pooling's output gradient
            arg, y, pool, out_sizes, shape, fused = self.pooled
            compiled = kernels.compiled("normalization") if fused else None
            if compiled is not None:
                return self._backward_compiled(compiled, np.ascontiguousarray(grad))
            grad = cm.max_pool_backward(grad, arg, shape, pool, out_sizes, pool, relu_y=y)
        if self.relu_fused:  # the compiled passes mask the gradient themselves
            compiled = kernels.compiled("normalization")
            grad = np.ascontiguousarray(grad)
            if compiled is not None:
                return self._backward_compiled(compiled, grad)
            grad = grad * (self._affine(self._normalised()) > 0)  # the ReLU's twin: DLCLI_KERNELS changed since forward
        elif self.post_activation is not None:
            grad = self.post_activation.backward(grad)
        if self.training and self.sync is None and self.mask_weights is None:
            return self._batch_backward(grad)
        dxhat = self._affine_backward(grad, self.reduce_axes)
        if not self.training:
            return dxhat * self.inv_std
        # d/dx of (x - mean) / std with batch statistics: the mean and variance depend on every sample too
        if self.sync is not None and not self.sync.paused:
            mean_d, mean_dx = self._global_means(dxhat)
            if self.sync.ghost:  # its stand-in sample is not in the batch: no gradient flows from it
                return np.zeros_like(dxhat)
        elif self.mask_weights is not None:  # masked statistics: only unmasked steps moved the mean and variance
            w, total = self.mask_weights
            # every step is normalised with them, so the sums run over all steps; only unmasked x moved them
            return (dxhat - w * (_sum(dxhat, self.reduce_axes) / total
                                 + self.xhat * (_sum(dxhat * self.xhat, self.reduce_axes) / total))) * self.inv_std
        else:
            mean_d = _mean(dxhat, self.reduce_axes)
            mean_dx = _mean(dxhat * self.xhat, self.reduce_axes)
        return (dxhat - mean_d - self.xhat * mean_dx) * self.inv_std

    def _update_moving(self, mean, var, dtype):
        m = dtype(self.momentum)
        for param, batch in ((self.moving_mean, mean), (self.moving_variance, var)):
            param.value = (param.value * m + batch.reshape(param.value.shape) * (1 - m)).astype(
                param.value.dtype, copy=False)

    def _compiled(self, a):
        """The compiled training passes (dlcli/kernels/normalization.py) for channels-last statistics (every axis
        but the last reduced) of a contiguous batch, or None: the NumPy twins run."""
        if self.reduce_axes != tuple(range(a.ndim - 1)) or not a.flags.c_contiguous:
            return None
        return kernels.compiled("normalization")

    def _compiled_affine(self, dtype):
        """(gamma, beta) as the compiled passes take them: an empty array where scale or center is off."""
        off = np.empty(0, dtype)
        return self.gamma.value if self.scale else off, self.beta.value if self.center else off

    def _forward_compiled(self, compiled, x, residual=None):
        c, dt = x.shape[-1], x.dtype
        rows, y = x.reshape(-1, c), np.empty_like(x)
        self.summed = residual is not None and residual.shape == x.shape and residual.dtype == dt and \
            residual.flags.c_contiguous and (self.sum_activation is None or self.sum_activation.plain)
        added = residual.reshape(-1, c) if self.summed else np.empty((0, c), dt)
        gamma, beta = self._compiled_affine(dt)
        relu = self.post_activation is not None or (self.summed and self.sum_activation is not None)
        out = y.reshape(-1, c)
        mean, inv_std = self._compiled_statistics(compiled, rows, lambda run, mean, inv_std: [
            compiled.normalise(rows[a:b], mean, inv_std, gamma, beta, relu, added[a:b] if self.summed else added,
                               out[a:b]) for _, a, b in run])
        # the input, not xhat: the backward recomputes xhat as it reads it, so no pass writes it
        self.xhat, self.x, self.mean = None, x, mean
        self.inv_std = inv_std.reshape(self.param_view)
        self.relu_fused = self.post_activation is not None  # the sum's ReLU is the Add's: its backward masks
        return y

    def _normalised(self):
        """xhat, as the forward computed it: kept by the NumPy forward, recomputed with the same float32 operations
        after the compiled one (for a NumPy backward: DLCLI_KERNELS changed in between)."""
        if self.xhat is None:
            return _channelwise(np.multiply, _channelwise(np.subtract, self.x, self.mean.reshape(self.param_view)),
                                self.inv_std)
        return self.xhat

    def _batch_backward(self, grad):
        """The unmasked one-process case, 1.6x faster: with dxhat = gamma * grad, the sums the
        input gradient needs, sum(dxhat) and sum(dxhat * xhat), are gamma times beta's and gamma's own gradients,
        so dx = gamma * inv_std * (grad - mean(grad) - xhat * mean(grad * xhat))."""
        axes = self.reduce_axes
        compiled = self._compiled(grad)
        if compiled is not None and self.xhat is None:
            return self._backward_compiled(compiled, grad)
        xhat = self._normalised()
        dx = np.multiply(grad, xhat)
        sum_g, sum_gx = _sum(grad, axes), _sum(dx, axes)
        if self.center and self.beta.grad is not None:
            self.beta.grad += sum_g.reshape(self.beta.grad.shape)
        if self.scale and self.gamma.grad is not None:
            self.gamma.grad += sum_gx.reshape(self.gamma.grad.shape)
        n = grad.dtype.type(grad.size // sum_g.size)
        scale = self.inv_std * self.gamma.value.reshape(self.param_view) if self.scale else self.inv_std
        _channelwise(np.multiply, xhat, sum_gx * (scale / n), out=dx)
        np.subtract(_channelwise(np.multiply, grad, scale), dx, out=dx)
        return _channelwise(np.subtract, dx, sum_g * (scale / n), out=dx)

    def _backward_compiled(self, compiled, grad):
        """The compiled backward of a compiled training forward; grad is the output's gradient, or the pooling's
        where the layer pooled its output (`pooled`: the rows' gradients are then made as they are read)."""
        c, dt = self.x.shape[-1], grad.dtype
        x, dx = self.x.reshape(-1, c), np.empty(self.x.shape, dt)
        mean, inv_std = self.mean, self.inv_std.reshape(-1)
        gamma, beta = self._compiled_affine(dt)
        relu = self.relu_fused
        parts, short = _row_parts(len(x), c)
        if self.pooled is None:
            rows = grad.reshape(-1, c)

            def sums(i, j, acc):
                compiled.gradient_sums(rows[i:j], x[i:j], mean, inv_std, gamma, beta, relu, *acc)

            def input_gradient(i, j, scale, a, b):
                compiled.input_gradient(rows[i:j], x[i:j], mean, inv_std, gamma, beta, relu, scale, a, b,
                                        dx.reshape(-1, c)[i:j])
        else:  # the pooling's gradient, its moved ReLU's mask and where each maximum came from
            arg, y, pool = self.pooled[:3]

            def sums(i, j, acc):
                compiled.pooled_gradient_sums(grad, arg, y, self.x, i, j, mean, inv_std, *pool, *acc)

            def input_gradient(i, j, scale, a, b):
                compiled.pooled_input_gradient(grad, arg, y, self.x, i, j, mean, inv_std, *pool, scale, a, b, dx)
        acc, stats = np.empty((len(parts), 2, c), np.float64), []  # each range's two float64 sums; what they give

        def statistics():
            stats.extend(self._gradient_statistics(compiled, acc, len(x), dt))
        lanes.run(lambda run: [sums(i, j, acc[k]) for k, i, j in run], [(k, i, j) for k, (i, j) in enumerate(parts)],
                  short, (statistics, lambda run: [input_gradient(i, j, *stats[2:]) for _, i, j in run]))
        sum_g, sum_gx = stats[:2]
        if self.center and self.beta.grad is not None:
            self.beta.grad += sum_g.reshape(self.beta.grad.shape)
        if self.scale and self.gamma.grad is not None:
            self.gamma.grad += sum_gx.reshape(self.gamma.grad.shape)
        return dx

    def _gradient_statistics(self, compiled, sums, n, dt):
        """(sum_g, sum_gx, scale, a, b) between the compiled backward's passes from the ranges' float64 sums (ranges,
        2, C): compiled.gradient_statistics in one call, else its twin here. The resnet's eight BatchNormalizations'
        backward, the calling thread's CPU a step as in _statistics: median 2.79-3.04 -> 2.67-2.86 ms."""
        inv_std = self.inv_std.reshape(-1)
        if compiled is not None:
            out = [np.empty(len(inv_std), dt) for _ in range(5)]
            compiled.gradient_statistics(sums, inv_std, self._compiled_affine(dt)[0], n, *out)
            return out
        scale = np.ascontiguousarray((self.inv_std * self.gamma.value.reshape(self.param_view) if self.scale
                                      else self.inv_std).reshape(-1), dt)
        sum_g, sum_gx = _summed(sums[:, 0]).astype(dt), _summed(sums[:, 1]).astype(dt)
        return sum_g, sum_gx, scale, sum_gx * (scale / n), sum_g * (scale / n)

    def _masked_moments(self, x, mask):
        """Keras 3's masked moments: sums weighted by the mask over (sum of weights + 1e-7), so an all-masked batch
        gives zeros, not NaN. (Keras' 1e-7 also leaves a term of order 1e-7 * mean in the gradient, dropped here.)"""
        w = mask.astype(x.dtype).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        w = np.broadcast_to(w, x.shape)
        total = _sum(w, self.reduce_axes) + x.dtype.type(1e-7)
        mean = _sum(w * x, self.reduce_axes) / total
        var = _sum(w * (x - mean) ** 2, self.reduce_axes) / total
        self.mask_weights = (w, total)
        return mean, var, float(_sum(w, self.reduce_axes).reshape(-1)[0])

    # Synchronised statistics (data-parallel training, dlcli.distributed.BatchStatSync): one allreduce of
    # per-channel sums in the forward pass and one in the backward, so each rank normalises with the global batch's
    # moments and back-propagates through them exactly as one process holding the whole batch would.
    def _global_moments(self, x, mean, var, count: float):
        """Global mean and biased variance from each rank's count (of unmasked samples), mean and centred sum of
        squares (Chan et al.'s parallel variance: the between-rank term is formed in float64, so no E[x^2] - E[x]^2
        cancellation)."""
        count = 0.0 if self.sync.ghost else count
        self.mask_weights = None  # the backward's sums are the global ones (_global_means)
        m = mean.reshape(-1).astype(np.float64)
        buf = np.concatenate([count * m, count * var.reshape(-1), count * m * m, [count]])
        self.sync(buf)
        c = mean.size
        self.global_count = total = buf[-1]
        g_mean = buf[:c] / total
        g_var = np.maximum((buf[c:2 * c] + buf[2 * c:3 * c]) / total - g_mean * g_mean, 0.0)
        return g_mean.astype(x.dtype).reshape(mean.shape), g_var.astype(x.dtype).reshape(var.shape)

    def _global_means(self, dxhat):
        sums = np.concatenate([_sum(dxhat, self.reduce_axes).reshape(-1),
                               _sum(dxhat * self.xhat, self.reduce_axes).reshape(-1)]).astype(np.float64)
        if self.sync.ghost:
            sums[:] = 0.0
        self.sync(sums)
        c = sums.size // 2
        shape = self.inv_std.shape
        dtype = dxhat.dtype
        means = ((sums[:c] / self.global_count).astype(dtype).reshape(shape),
                 (sums[c:] / self.global_count).astype(dtype).reshape(shape))
        if self.input_mask is None:
            return means
        # with a mask only the unmasked steps moved the statistics (global_count counts those)
        w = self.input_mask.astype(dtype).reshape(self.input_mask.shape + (1,) * (dxhat.ndim - self.input_mask.ndim))
        return tuple(w * m for m in means)

    def to_onnx(self, g, x, in_shape, mask):
        gamma, beta = self._affine_arrays(self.moving_mean.value.shape)
        if self.feature_axes == (len(in_shape) - 1,):  # the channel axis: ONNX's BatchNormalization (inference)
            x = g.first(x)
            y = g.op("BatchNormalization", [x.name, g.weight(self, gamma, "gamma"), g.weight(self, beta, "beta"),
                                            g.weight(self, self.moving_mean.value, "moving_mean"),
                                            g.weight(self, self.moving_variance.value, "moving_variance")],
                     self.name, epsilon=self.epsilon)
            return g.value(y, x.rank, x.first)
        x = g.last(x)  # other axes: dlcli's own arithmetic, (x - mean) * 1/sqrt(var + eps) * gamma + beta
        view = self.param_view
        inv_std = 1 / np.sqrt(self.moving_variance.value + np.float32(self.epsilon))
        y = g.op("Sub", [x.name, g.weight(self, self.moving_mean.value.reshape(view), "moving_mean")])
        y = g.op("Mul", [y, g.weight(self, (inv_std * gamma).reshape(view), "scale")])
        return g.value(g.op("Add", [y, g.weight(self, beta.reshape(view), "beta")], self.name), x.rank)


@register("LayerNormalization")
class LayerNormalization(_Normalization):
    """Normalise each sample over `axis` (default the last), then gamma * xhat + beta; epsilon 1e-3 as Keras."""

    def __init__(self, axis=-1, epsilon: float = 1e-3, center: bool = True, scale: bool = True,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, **kw):
        super().__init__(**kw)
        self.axis, self.epsilon, self.center, self.scale = axis, float(epsilon), center, scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer, self.gamma_regularizer = beta_regularizer, gamma_regularizer

    def build(self, input_shape):
        self._build_affine(input_shape)
        self.norm_axes = tuple(a + 1 for a in self.feature_axes)
        self.param_axes = (0, *[a + 1 for a in range(len(input_shape)) if a not in self.feature_axes])

    def forward(self, x, training=False):
        mean = _mean(x, self.norm_axes)
        centered = x - mean
        var = _mean(centered * centered, self.norm_axes)
        self.inv_std = 1 / np.sqrt(var + x.dtype.type(self.epsilon))
        self.xhat = centered * self.inv_std
        return self._affine(self.xhat)

    def backward(self, grad):
        dxhat = self._affine_backward(grad, self.param_axes)
        mean_d = _mean(dxhat, self.norm_axes)
        mean_dx = _mean(dxhat * self.xhat, self.norm_axes)
        return (dxhat - mean_d - self.xhat * mean_dx) * self.inv_std

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        axes, rank = self.feature_axes, len(in_shape)
        gamma, beta = self._affine_arrays(tuple(in_shape[a] for a in axes))
        if g.opset >= 17 and axes == tuple(range(rank - len(axes), rank)):
            y = g.op("LayerNormalization", [x.name, g.weight(self, gamma, "gamma"), g.weight(self, beta, "beta")],
                     self.name, axis=-len(axes), epsilon=self.epsilon)
            return g.value(y, x.rank)
        norm_axes = [a + 1 for a in axes]
        centered = g.op("Sub", [x.name, g.reduce("ReduceMean", x.name, norm_axes)])
        var = g.reduce("ReduceMean", g.op("Mul", [centered, centered]), norm_axes)
        inv_std = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.scalar(self.epsilon)])])])
        y = g.op("Mul", [g.op("Mul", [centered, inv_std]), g.weight(self, gamma.reshape(self.param_view), "gamma")])
        return g.value(g.op("Add", [y, g.weight(self, beta.reshape(self.param_view), "beta")], self.name), x.rank)


@register("RMSNormalization")
class RMSNormalization(Layer):
    """x / sqrt(mean(x^2 over `axis`) + epsilon) * scale (Zhang & Sennrich 2019): no centring and no offset; Keras'
    weight `scale` (ones) over the axis, epsilon 1e-6. The axes must be the trailing ones: Keras' torch backend
    normalises over the last axes whatever `axis` says, its others over `axis`, so elsewhere they disagree."""

    supports_masking = True

    def __init__(self, axis: int | list[int] = -1, epsilon: float = 1e-6, **kw):
        super().__init__(**kw)
        self.axis = axis if isinstance(axis, int) else [int(a) for a in axis]
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        axes = _axes(self.axis, len(input_shape), self)
        if axes != tuple(range(len(input_shape) - len(axes), len(input_shape))):
            raise ShapeError(f"RMSNormalization '{self.name}': axis {self.axis} must be the last axes of inputs of "
                             f"rank {len(input_shape) + 1} (Keras' backends disagree on any other)")
        self.norm_axes = tuple(a + 1 for a in axes)
        self.scale = self.add_weight("scale", tuple(input_shape[a] for a in axes), "ones")

    def forward(self, x, training=False):
        self.inv_rms = 1 / np.sqrt(_mean(x * x, self.norm_axes) + x.dtype.type(self.epsilon))
        self.xhat = x * self.inv_rms
        return self.xhat * self.scale.value

    def backward(self, grad):
        if self.scale.grad is not None:
            self.scale.grad += (grad * self.xhat).reshape(-1, *self.scale.value.shape).sum(0)
        dxhat = grad * self.scale.value
        return (dxhat - self.xhat * _mean(dxhat * self.xhat, self.norm_axes)) * self.inv_rms

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        mean_square = g.reduce("ReduceMean", g.op("Mul", [x.name, x.name]), self.norm_axes)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean_square, g.scalar(self.epsilon)])])])
        y = g.op("Mul", [g.op("Mul", [x.name, inv]), g.weight(self, self.scale.value, "scale")], self.name)
        return g.value(y, x.rank)


@register("GroupNormalization")
class GroupNormalization(_Normalization):
    """Normalise each sample over groups of channels (and every other non-batch axis), then gamma * xhat + beta
    per channel (Wu & He 2018; Keras' groups 32, epsilon 1e-3; channels last)."""

    def __init__(self, groups: int = 32, axis: int = -1, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, **kw):
        super().__init__(**kw)
        self.groups, self.axis, self.epsilon, self.center, self.scale = int(groups), axis, float(epsilon), center, \
            scale
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.beta_regularizer, self.gamma_regularizer = beta_regularizer, gamma_regularizer

    def build(self, input_shape):
        if self.axis not in (-1, len(input_shape)):
            raise ShapeError(f"GroupNormalization '{self.name}': dlcli groups the last (channels) axis only; got "
                             f"axis {self.axis}")
        channels = input_shape[-1]
        if self.groups < 1 or channels % self.groups:
            raise ShapeError(f"GroupNormalization '{self.name}': {channels} channels do not split into {self.groups} "
                             f"groups (Keras needs channels to be a multiple of groups)")
        self._build_affine(input_shape)
        self.param_axes = tuple(range(len(input_shape)))  # gamma and beta gradients: summed over all but channels

    def _grouped(self, a):
        return a.reshape(a.shape[0], -1, self.groups, a.shape[-1] // self.groups)

    def forward(self, x, training=False):
        grouped = self._grouped(x)
        mean = grouped.mean((1, 3), keepdims=True)
        centered = grouped - mean
        var = (centered * centered).mean((1, 3), keepdims=True)
        self.inv_std = 1 / np.sqrt(var + x.dtype.type(self.epsilon))
        self.xhat = (centered * self.inv_std).reshape(x.shape)
        return self._affine(self.xhat)

    def backward(self, grad):
        dxhat = self._grouped(self._affine_backward(grad, self.param_axes))
        xhat = self._grouped(self.xhat)
        dx = (dxhat - dxhat.mean((1, 3), keepdims=True)
              - xhat * (dxhat * xhat).mean((1, 3), keepdims=True)) * self.inv_std
        return dx.reshape(grad.shape)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        channels = in_shape[-1]
        grouped = g.op("Reshape", [x.name, g.ints([0, -1, self.groups, channels // self.groups])])
        centered = g.op("Sub", [grouped, g.reduce("ReduceMean", grouped, [1, 3])])
        var = g.reduce("ReduceMean", g.op("Mul", [centered, centered]), [1, 3])
        inv_std = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.scalar(self.epsilon)])])])
        xhat = g.op("Reshape", [g.op("Mul", [centered, inv_std]), g.op("Shape", [x.name])])
        gamma, beta = self._affine_arrays((channels,))
        y = g.op("Mul", [xhat, g.weight(self, gamma, "gamma")])
        return g.value(g.op("Add", [y, g.weight(self, beta, "beta")], self.name), x.rank)


@register("UnitNormalization")
class UnitNormalization(Layer):
    """x / |x| over `axis` (counting the batch axis, as Keras), computed as x * min(1 / |x|, 1e12)."""

    supports_masking = True

    def __init__(self, axis: int | list[int] = -1, **kw):
        super().__init__(**kw)
        self.axis = axis if isinstance(axis, int) else [int(a) for a in axis]

    def _axes(self):
        return self.axis if isinstance(self.axis, int) else tuple(self.axis)

    def forward(self, x, training=False):
        inv = 1 / np.sqrt((x * x).sum(self._axes(), keepdims=True))
        self.clipped = inv > 1e12
        self.inv = np.minimum(inv, 1e12).astype(x.dtype)
        self.y = x * self.inv
        return self.y

    def backward(self, grad):
        along = (grad * self.y).sum(self._axes(), keepdims=True)
        return np.where(self.clipped, grad, grad - self.y * along) * self.inv

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        axes = [self.axis] if isinstance(self.axis, int) else self.axis
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.reduce("ReduceSum", g.op("Mul", [x.name, x.name]), axes)])])
        return g.value(g.op("Mul", [x.name, g.op("Min", [inv, g.scalar(1e12)])], self.name), x.rank)


@register("Normalization")
class Normalization(Layer):
    """(x - mean) / max(sqrt(variance), 1e-7) per feature of `axis` (kept axes; Keras' default the last), or its
    inverse with `invert`. mean and variance are given, or non-trainable weights (mean, variance, count, as Keras
    saves them) set by `adapt(data)`, by `adapt: true` in a config (on the training inputs before the first epoch;
    not a Keras argument) or read from a Keras file."""

    supports_masking = True

    def __init__(self, axis: int | list[int] | None = -1, mean=None, variance=None, invert: bool = False,
                 adapt: bool = False, **kw):
        super().__init__(**kw)
        if (mean is None) != (variance is None):
            raise ConfigError("Normalization: give both mean and variance, or neither (as Keras)")
        if adapt and mean is not None:
            raise ConfigError("Normalization: adapt: true computes mean and variance; do not give them too")
        self.adapt_on_fit = bool(adapt)
        self.axis = [] if axis is None else [int(a) for a in (axis if isinstance(axis, (list, tuple)) else [axis])]
        self.mean, self.variance, self.invert = mean, variance, bool(invert)

    def build(self, input_shape):
        ndim = len(input_shape) + 1
        if any(not -ndim <= a < ndim or a % ndim == 0 for a in self.axis):
            raise ShapeError(f"Normalization '{self.name}': axis {self.axis} must be axes of inputs (None, "
                             f"{', '.join(map(str, input_shape))}) other than the batch's")
        self.keep = tuple(sorted(a % ndim for a in self.axis))
        self.view = (1, *[input_shape[d - 1] if d in self.keep else 1 for d in range(1, ndim)])
        shape = tuple(input_shape[d - 1] for d in self.keep)
        if self.mean is None:
            self.add_weight("mean", shape, "zeros", trainable=False)
            self.add_weight("variance", shape, "ones", trainable=False)
            self.params["count"] = Param("count", np.zeros((), np.int64), trainable=False, layer=self)

    def _moments(self, dtype):
        given = self.mean is not None
        mean = np.asarray(self.mean if given else self.params["mean"].value, dtype)
        variance = np.asarray(self.variance if given else self.params["variance"].value, dtype)
        # a scalar applies to every feature, else one value per kept feature (Keras)
        mean, variance = (np.broadcast_to(a, self.view) if a.ndim == 0 else a.reshape(self.view)
                          for a in (mean, variance))
        return mean, np.maximum(np.sqrt(variance), dtype.type(1e-7))

    def adapt(self, data, batch_size: int = 4096):
        """mean and variance of `data` (an array of inputs, batch first, or an iterable of such chunks) over every
        axis but the kept ones, summed in float64 chunk by chunk (Keras' adapt; count: values per feature)."""
        if self.mean is not None:
            raise ConfigError(f"Normalization '{self.name}' was given mean and variance; it has nothing to adapt")
        chunks = (data[s:s + batch_size] for s in range(0, len(data), batch_size)) if hasattr(data, "shape") \
            else iter(data)
        total = squares = 0.0
        count = 0
        for chunk in chunks:
            chunk = np.asarray(chunk, np.float64)
            self.ensure_built(chunk.shape[1:])
            axes = tuple(d for d in range(chunk.ndim) if d not in self.keep)
            total = total + chunk.sum(axes)
            squares = squares + (chunk * chunk).sum(axes)
            count += chunk.size // max(int(np.prod([chunk.shape[d] for d in self.keep])), 1)
        mean = total / max(count, 1)
        variance = np.maximum(squares / max(count, 1) - mean * mean, 0)
        for name, value in (("mean", mean), ("variance", variance)):
            self.params[name].value = np.asarray(value, self.dtype).reshape(self.params[name].value.shape)
        self.params["count"].value = np.array(count, np.int64)

    def forward(self, x, training=False):
        mean, self.scale = self._moments(x.dtype)
        return mean + x * self.scale if self.invert else (x - mean) / self.scale

    def backward(self, grad):
        return grad * self.scale if self.invert else grad / self.scale

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        mean, scale = self._moments(np.dtype(np.float32))
        m, s = g.const(mean, f"{self.name}_mean"), g.const(scale, f"{self.name}_scale")
        y = g.op("Add", [m, g.op("Mul", [x.name, s])], self.name) if self.invert else \
            g.op("Div", [g.op("Sub", [x.name, m]), s], self.name)
        return g.value(y, x.rank)


def adapt_to_inputs(model, xs) -> list[str]:
    """`adapt` every Normalization layer built with adapt=True that reads a model input straight away, on that
    input's training data (the config's `adapt: true`, before the first epoch); the names adapted."""
    from dlcli.data.source import as_source
    from dlcli.engine.graph import InputLayer

    source_of_inputs = as_source(xs)
    adapted = []
    for node in model.graph.nodes:
        layer = node.layer
        if not isinstance(layer, Normalization) or not layer.adapt_on_fit:
            continue
        source = node.inputs[0].node.layer if node.inputs else None
        if not isinstance(source, InputLayer):
            raise ConfigError(f"Normalization '{layer.name}' has adapt: true, so it must read a model input directly "
                              f"(it reads '{source.name if source else '?'}'): dlcli adapts it to the training inputs")
        index, n = [t.node.layer for t in model.inputs].index(source), len(source_of_inputs)
        # batch by batch through the data source (a folder of images decodes as it goes), as Keras' adapt does
        layer.adapt(source_of_inputs.take(np.arange(start, min(start + 4096, n)))[index]
                    for start in range(0, n, 4096))
        adapted.append(layer.name)
    return adapted


# The compiled passes over a batch of LANE_FLOATS or more run over ROW_PARTS ranges of rows, shared by the lanes
# (engine/lanes.py); smaller ones in one range: their hand-overs cost more than half the passes. Main-thread CPU at 2
# threads, AMD EPYC at load 17 (forward / backward ms): the resnet's stem BN (64x28x28x32) 1.18 / 1.11 -> 0.81 /
# 0.84. Under lanes.SHORT_FLOATS the parts go to lanes that poll only (lanes.run's `short`): at load 17, handed to
# sleeping lanes, the 14x14x32 ones went 0.34 / 0.27 -> 0.37 / 0.33 ms and the 7x7x64 ones 0.15 / 0.15 -> 0.24 /
# 0.22. Both counts depend on the shape alone, so the float64 sums add up in the same order on any number of lanes.
ROW_PARTS, LANE_FLOATS = 4, 1 << 17


def _row_parts(rows, c):
    """(the ranges of rows the passes run over, whether they are short: lanes.run's `short`)."""
    return lanes.split(rows, ROW_PARTS if rows * c >= LANE_FLOATS else 1), rows * c < lanes.SHORT_FLOATS


def _summed(parts):
    """The parts' float64 sums added in part order."""
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total
