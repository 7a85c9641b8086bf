"""Matrix products called from compiled code: OpenBLAS's cblas ?gemm by address (NumPy's own links, found by
engine/blas.gemm_address), and on AVX-512 a register-blocked product (block_gemm) that beats OpenBLAS's path into
its kernel at the small products of the recurrent time loops (kernels/recurrent) and, where OpenBLAS runs AVX2
kernels on an AVX-512 CPU, at the layers' products (product, chosen by engine/blas.product)."""
import numba
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

JIT = dict(cache=True, nogil=True, error_model="numpy")


def _gemm_intrinsic(bits):
    """An intrinsic calling cblas ?gemm at address `fn` in row-major order: C = A @ B + beta C, A (m, k), B (k, n),
    C (m, n) 2-D arrays of one float dtype whose rows are contiguous (any row stride). `bits` is the BLAS' integer
    width (32, or 64 for an ILP64 build such as NumPy's)."""

    @intrinsic
    def call(typingctx, fn, a, b, c, beta):
        def codegen(context, builder, sig, args):
            fn_v, a_v, b_v, c_v, beta_v = args
            aty, bty, cty = sig.args[1], sig.args[2], sig.args[3]
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip((aty, bty, cty), (a_v, b_v, c_v))]
            iN, i32 = ir.IntType(bits), ir.IntType(32)
            fl = context.get_value_type(aty.dtype)
            ptr = ir.IntType(8).as_pointer()
            item = ir.Constant(ir.IntType(64), context.get_abi_sizeof(fl))

            def dim(arr, axis):
                return builder.trunc(builder.extract_value(arr.shape, axis), iN) if bits < 64 else \
                    builder.extract_value(arr.shape, axis)

            def lead(arr):
                ld = builder.sdiv(builder.extract_value(arr.strides, 0), item)
                return builder.trunc(ld, iN) if bits < 64 else ld

            A, B, C = arrays
            m, k, n = dim(A, 0), dim(A, 1), dim(B, 1)
            fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, iN, iN, iN, fl, ptr, iN, ptr, iN, fl, ptr, iN])
            target = builder.inttoptr(fn_v, fnty.as_pointer())
            no_trans = ir.Constant(i32, 111)
            beta_f = context.cast(builder, beta_v, sig.args[4], aty.dtype)
            builder.call(target, [ir.Constant(i32, 101), no_trans, no_trans, m, n, k,
                                  ir.Constant(fl, 1.0), builder.bitcast(A.data, ptr), lead(A),
                                  builder.bitcast(B.data, ptr), lead(B), beta_f, builder.bitcast(C.data, ptr),
                                  lead(C)])
            return context.get_dummy_value()

        return types.void(fn, a, b, c, beta), codegen

    return call


_gemm64, _gemm32 = _gemm_intrinsic(64), _gemm_intrinsic(32)


def _block_gemm_intrinsic(rows, vectors):
    """An intrinsic computing C = A @ B + beta C (beta 0 or 1) for 2-D float arrays, B's and C's rows contiguous (any
    row stride), A any strided view (a transpose is read in place), in blocks of C of `rows` rows x `vectors` 64-byte
    vectors (16 float32) held in registers across the whole k loop: per k, `vectors` loads of B's row, one broadcast
    of A per row and rows x vectors fused multiply-adds. The right edge runs masked (a block of as few vectors as it
    needs), the bottom rows one at a time; the other blocks load B and store C plainly, and C is read only where beta
    is 1. Masked stores into an output not in cache cost AMD's Zen 5 dearly: the resnet's stem's 4 products of
    (12544, 9) @ (9, 32) (its 6.4 MB output) in training steps, one thread, medians of 60 alternating with OpenBLAS's
    Haswell np.dot (load 4-9): masked 0.64-0.71 ms, np.dot 0.50-0.57, plain 0.34-0.36. In cache, one thread, medians
    of 200 alternating, masked -> plain: that product 44.1 -> 39.1 us, a resnet chunk's 36 Winograd taps (129, 32) @
    (32, 32) 39.9 -> 37.5 and (65, 64) @ (64, 64) 76.4 -> 73.0, LSTM(32)'s (128, 65) @ (65, 32) 3.4 -> 3.3; the same
    bits."""

    @intrinsic
    def call(typingctx, a, b, c, beta):
        def codegen(context, builder, sig, args):
            A, B, C = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
            fl = context.get_value_type(sig.args[0].dtype)
            size = context.get_abi_sizeof(fl)
            lanes = 64 // size
            i32, i64 = ir.IntType(32), ir.IntType(64)
            vec, vptr, mask_ty = ir.VectorType(fl, lanes), ir.VectorType(fl, lanes).as_pointer(), \
                ir.VectorType(ir.IntType(1), lanes)
            suffix, module = f"v{lanes}f{size * 8}", builder.module
            load = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vptr, i32, mask_ty, vec]),
                                                  f"llvm.masked.load.{suffix}.p0")
            store = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), [vec, vptr, i32, mask_ty]),
                                                   f"llvm.masked.store.{suffix}.p0")
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fmuladd.{suffix}")
            align, zero = ir.Constant(i32, size), ir.Constant(vec, None)
            lane_index = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
            beta_v = context.cast(builder, args[3], sig.args[3], types.float64)
            accumulate = builder.fcmp_ordered("!=", beta_v, ir.Constant(ir.DoubleType(), 0.0))
            acc = [[cgutils.alloca_once(builder, vec) for _ in range(vectors)] for _ in range(rows)]

            def const(v):
                return ir.Constant(i64, v)

            def splat(x, ty):
                one = builder.insert_element(ir.Constant(ty, None), x, ir.Constant(i32, 0))
                return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

            def at(arr, i, j):  # the address of arr[i, j] (a vector's address where j starts one)
                lead = builder.sdiv(builder.extract_value(arr.strides, 0), const(size))
                return builder.gep(builder.bitcast(arr.data, fl.as_pointer()), [builder.add(builder.mul(i, lead), j)])

            def at_a(i, k):  # the address of A[i, k]: through both strides unless A's layout is C-contiguous
                if sig.args[0].layout == "C":
                    return at(A, i, k)
                steps = [builder.sdiv(builder.extract_value(A.strides, d), const(size)) for d in (0, 1)]
                return builder.gep(builder.bitcast(A.data, fl.as_pointer()),
                                   [builder.add(builder.mul(i, steps[0]), builder.mul(k, steps[1]))])

            M, K, N = (builder.extract_value(x.shape, d) for x, d in ((A, 0), (A, 1), (B, 1)))

            def block(n_rows, n_vectors, i0, j0, whole):
                """A block of C; `whole`: all its vectors inside C (no masks: its stores plain ones)."""
                cols = [builder.add(j0, const(v * lanes)) for v in range(n_vectors)]
                masks = [builder.icmp_signed("<", lane_index, splat(builder.sub(N, j), lane_index.type)) for j in cols]

                def read(p, mask):
                    if whole:
                        return builder.load(p, align=size)
                    return builder.call(load, [p, align, mask, zero])

                for r in range(n_rows):
                    for v in range(n_vectors):
                        builder.store(zero, acc[r][v])
                with builder.if_then(accumulate):  # C read only where added to
                    for r in range(n_rows):
                        for v in range(n_vectors):
                            p = builder.bitcast(at(C, builder.add(i0, const(r)), cols[v]), vptr)
                            builder.store(read(p, masks[v]), acc[r][v])
                with cgutils.for_range(builder, K) as loop:
                    row = [read(builder.bitcast(at(B, loop.index, j), vptr), m) for j, m in zip(cols, masks)]
                    for r in range(n_rows):
                        x = splat(builder.load(at_a(builder.add(i0, const(r)), loop.index)), vec)
                        for v in range(n_vectors):
                            builder.store(builder.call(fma, [x, row[v], builder.load(acc[r][v])]), acc[r][v])
                for r in range(n_rows):
                    for v in range(n_vectors):
                        p = builder.bitcast(at(C, builder.add(i0, const(r)), cols[v]), vptr)
                        if whole:
                            builder.store(builder.load(acc[r][v]), p, align=size)
                        else:
                            builder.call(store, [builder.load(acc[r][v]), p, align, masks[v]])

            width = const(lanes * vectors)
            full_cols = builder.sdiv(N, width)
            edge = builder.mul(full_cols, width)
            edge_vectors = builder.sdiv(builder.add(builder.sub(N, edge), const(lanes - 1)), const(lanes))

            def block_row(n_rows, i0):
                with cgutils.for_range(builder, full_cols) as loop:
                    block(n_rows, vectors, i0, builder.mul(loop.index, width), True)
                for v in range(1, vectors + 1):  # the columns past the last full block
                    with builder.if_then(builder.icmp_signed("==", edge_vectors, const(v))):
                        block(n_rows, v, i0, edge, False)

            full_rows = builder.sdiv(M, const(rows))
            with cgutils.for_range(builder, full_rows) as loop:
                block_row(rows, builder.mul(loop.index, const(rows)))
            with cgutils.for_range(builder, builder.sub(M, builder.mul(full_rows, const(rows)))) as loop:
                block_row(1, builder.add(builder.mul(full_rows, const(rows)), loop.index))
            return context.get_dummy_value()

        return types.void(a, b, c, beta), codegen

    return call


# 8 rows x 2 vectors: 16 accumulators of AVX-512's 32 registers; against 4x2, 6x2, 4x3, 8x1 and 12x1 the fastest or
# within 5% at every step shape below.
block_gemm = _block_gemm_intrinsic(8, 2)


def _compiled_for_avx512() -> bool:
    """Whether numba compiles for this CPU (no NUMBA_CPU_NAME) and it has AVX-512F."""
    from llvmlite import binding

    return numba.config.CPU_NAME is None and bool(binding.get_host_cpu_features().get("avx512f"))


# The step products are small (an LSTM(32) part of 32 samples: (128, 65) @ (65, 32) forward, (128, 32) @ (32, 65)
# and (32, 128) @ (128, 32) backward), and OpenBLAS's path into its kernel costs about as much as the kernel. Thread
# CPU per product, one thread, 1,000 calls in a compiled loop, best of 7, AMD EPYC (Zen 5) at load 3-4, OpenBLAS's
# AVX2 kernels (this workplace's OPENBLAS_CORETYPE=Haswell) / its AVX-512 ones (SkylakeX) / block_gemm:
# 4.77 / 2.04 / 2.08 us, 4.73 / 2.36 / 2.89, 2.44 / 1.05 / 0.98; GRU(32)'s (32, 32) @ (32, 96) 1.77 / 0.79 / 0.74,
# (32, 96) @ (96, 32) 1.86 / 0.79 / 0.75; and at LSTM(512)'s (2048, 545) @ (545, 64) still 1,156 / 614 / 550 us.
# Without AVX-512 the products stay with BLAS (64-byte vectors would take two registers each there).
AVX512 = _compiled_for_avx512()


@numba.njit(**JIT)
def matmul(blas, a, b, c, beta):
    """c = a @ b (+ c when beta is 1): block_gemm on AVX-512, else through the BLAS `blas` = (address, 64-bit
    integers)."""
    if AVX512:
        block_gemm(a, b, c, beta)
    elif blas[1]:
        _gemm64(blas[0], a, b, c, beta)
    else:
        _gemm32(blas[0], a, b, c, beta)


@numba.njit(**JIT)
def product(a, b, out):
    """out[t] = a[t] @ b[t] for each t of 3-D float stacks (a 2-D product is a stack of one) by block_gemm: b's and
    out's rows contiguous, a any strided view (a transpose is read in place). Each element of out sums its k products
    in order with fused multiply-adds whatever the blocks (the bits of OpenBLAS's SkylakeX sgemm at the Winograd
    taps' shapes), so a part of out's rows gives the same bits as the whole. Its twin is np.matmul."""
    for t in range(a.shape[0]):
        block_gemm(a[t], b[t], out[t], 0.0)


@numba.njit(**JIT)
def matrix_product(a, b, out):
    """out = a @ b for 2-D float arrays by block_gemm, as product's stack of one (its views cost ~0.2 us a call)."""
    block_gemm(a, b, out, 0.0)
