"""Integer class labels against a batch of rows: softmax + sparse categorical crossentropy, and the accuracy's hits.

The loss in one pass per row, where the NumPy twin
(losses._sparse_softmax_crossentropy) makes ~10 calls over the batch (max, subtract, exp, sum, log, divide,
gathers and a scatter). The same float32 operations in the same order per row, but exp and log are libm's
(correctly rounded or nearly) where NumPy's SIMD ones may differ by an ulp or two, and the row sum runs in order
where NumPy's is pairwise: values within float32 rounding of the twin's. Given the forward pass' softmax output
(a fused output layer), the gradient is that output minus the one-hot labels: the twin's bits exactly.
"""
import numba
import numpy as np

JIT = dict(cache=True, nogil=True, error_model="numpy")


@numba.njit(**JIT)
def sparse_softmax_crossentropy(z, labels, probabilities, elements, grad):
    """z (rows, classes) logits, labels (rows,) intp or float64, probabilities softmax(z) or empty; writes
    elements (rows,) = -log softmax(z)[label] and grad (rows, classes) = softmax(z) - onehot(label). Returns 0, or
    -1 at the first label that is not a class (0..classes - 1; NaN, or a float with a fraction): the caller's label
    check, folded into this pass as sparse_hits' (losses.sparse_label_values then says which)."""
    rows, classes = z.shape
    given = probabilities.size > 0
    for i in range(rows):
        if not (labels[i] >= 0 and labels[i] < classes):  # NaN fails too
            return -1
        label = int(labels[i])
        if label != labels[i]:
            return -1
        m = z[i, 0]
        for j in range(1, classes):  # np.max: NaN wins
            v = z[i, j]
            if v > m or v != v:
                m = v
        total = z.dtype.type(0)
        for j in range(classes):
            e = np.exp(z[i, j] - m)
            grad[i, j] = e
            total += e
        elements[i] = np.log(total) - (z[i, label] - m)  # -(shifted - log(total)), exactly
        if given:
            for j in range(classes):
                grad[i, j] = probabilities[i, j]
        else:
            for j in range(classes):
                grad[i, j] /= total
        grad[i, label] -= 1
    return 0


@numba.njit(**JIT)
def sparse_hits(y, labels):
    """How many rows of y (rows, classes) have their first maximum at labels (rows,) intp: the twin's
    count_nonzero(labels == y.argmax(-1)), where NumPy's argmax over a short last axis costs ~11 us for the book
    MLP's (128, 10), a call per row. A NaN is np.argmax's maximum (its first one). -1 where a label is not a class
    (0..classes - 1): the caller's range check, folded into this pass (losses.sparse_labels then says which)."""
    rows, classes = y.shape
    hits = 0
    for i in range(rows):
        label = labels[i]
        if label < 0 or label >= classes:
            return -1
        best, m = 0, y[i, 0]
        if m == m:
            for j in range(1, classes):
                v = y[i, j]
                if v != v:
                    best = j
                    break
                if v > m:
                    best, m = j, v
        if best == label:
            hits += 1
    return hits
