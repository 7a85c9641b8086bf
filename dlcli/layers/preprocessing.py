"""Preprocessing layers: Rescaling (always on), and image augmentation layers, active only with training=True
and the identity at inference (as Keras).

Randomness comes from the layer's `self.rng` (seeded from the run seed by the model; a `seed` argument overrides
it at build time). RandomTranslation, RandomRotation and RandomZoom share one vectorised resampler: per output
pixel a source coordinate, read with nearest or bilinear interpolation and Keras' fill modes. Angles are exact
(not rounded to 90-degree steps).
"""
import numpy as np

from dlcli.engine.layer import Layer, register
from dlcli.errors import ConfigError, ShapeError

FILL_MODES = ("reflect", "wrap", "nearest", "constant")
INTERPOLATIONS = ("bilinear", "nearest")


@register("Rescaling")
class Rescaling(Layer):
    """y = x * scale + offset (Keras' Rescaling): e.g. scale 1/255 turns image_folder's 0..255 pixels into 0..1."""

    supports_masking = True

    def __init__(self, scale: float, offset: float = 0.0, **kw):
        super().__init__(**kw)
        self.scale, self.offset = float(scale), float(offset)

    def forward(self, x, training=False):
        return x * np.float32(self.scale) + np.float32(self.offset)

    def backward(self, grad):
        return grad * np.float32(self.scale)

    def to_onnx(self, g, x, in_shape, mask):
        x = g.last(x)
        y = g.op("Mul", [x.name, g.weight(self, np.array(self.scale, np.float32), "scale")])
        y = g.op("Add", [y, g.weight(self, np.array(self.offset, np.float32), "offset")], self.name)
        return g.value(y, x.rank)


class _Augmentation(Layer):
    supports_masking = True

    def __init__(self, seed: int | None = None, **kw):
        super().__init__(**kw)
        self.seed = seed

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"{type(self).__name__} '{self.name}' expects images (batch, height, width, channels);"
                             f" got (None, {', '.join(map(str, input_shape))})")
        if self.seed is not None:
            self.rng = np.random.default_rng(self.seed)

    def draw(self, n):
        """The batch's random parameters, which `augment(x, drawn)` applies (None: the layer draws nothing)."""
        return None

    def forward(self, x, training=False):
        self.active = bool(training)
        return self.augment(x, self.draw(x.shape[0])) if training else x

    def backward(self, grad):
        return self.augment_backward(grad) if self.active else grad

    def to_onnx(self, g, x, in_shape, mask):
        return x  # the identity at inference


@register("RandomFlip")
class RandomFlip(_Augmentation):
    """Flip each image with probability 1/2 per direction in `mode` (horizontal = left-right)."""

    MODES = {"horizontal": (False, True), "vertical": (True, False), "horizontal_and_vertical": (True, True)}

    def __init__(self, mode: str = "horizontal_and_vertical", seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        if mode not in self.MODES:
            raise ConfigError(f"RandomFlip: mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        self.mode = mode

    def draw(self, n):
        vertical, horizontal = self.MODES[self.mode]
        return (self.rng.random(n) < 0.5) & vertical, (self.rng.random(n) < 0.5) & horizontal

    def augment(self, x, flips):
        self.flips = flips
        return self._flip(x)

    def _flip(self, x):
        for axis, flip in zip((1, 2), self.flips):
            if flip.any():
                x = np.where(flip[:, None, None, None], np.flip(x, axis), x)
        return x

    def augment_backward(self, grad):
        return self._flip(grad)  # a flip is its own inverse (and the two flips commute)


def _range(factor, what: str, layer: str) -> tuple[float, float]:
    """Keras: a float f means [-f, f]; a pair means [lower, upper]."""
    lo, hi = (-abs(float(factor)), abs(float(factor))) if np.isscalar(factor) else tuple(map(float, factor))
    if lo > hi:
        raise ConfigError(f"{layer}: {what} lower bound {lo} is above its upper bound {hi}")
    return lo, hi


def _fold(idx, n: int, fill_mode: str):
    """Integer indices mapped into [0, n) by Keras' fill mode; `valid` is False where 'constant' fills instead."""
    if fill_mode == "reflect":  # (d c b a | a b c d | d c b a)
        k = idx % (2 * n)
        return np.where(k >= n, 2 * n - 1 - k, k), None
    if fill_mode == "wrap":
        return idx % n, None
    if fill_mode == "mirror":  # (d c b | a b c d | c b a), JAX's and SciPy's map_coordinates
        k = idx % max(2 * n - 2, 1)
        return np.where(k >= n, 2 * n - 2 - k, k), None
    clipped = np.clip(idx, 0, n - 1)
    return clipped, (None if fill_mode == "nearest" else (idx >= 0) & (idx < n))


def _neighbourhood_sum(x, k_rows: int, k_cols: int, row_weights=None, col_weights=None):
    """Zero-padded 'same' correlation of each channel with an outer-product kernel (row weights down, column
    weights across; ones when None), as two passes of shifted adds. Symmetric kernels make it its own transpose."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    pr, pc = k_rows // 2, k_cols // 2
    padded = np.pad(x, ((0, 0), (pr, pr), (0, 0), (0, 0)))
    for i in range(k_rows):
        out += padded[:, i:i + h] * (1 if row_weights is None else row_weights[i])
    padded, out = np.pad(out, ((0, 0), (0, 0), (pc, pc), (0, 0))), np.zeros_like(x)
    for j in range(k_cols):
        out += padded[:, :, j:j + w] * (1 if col_weights is None else col_weights[j])
    return out


def _gaussian(size: int, sigma: float):
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


class _Resampling(_Augmentation):
    """Output pixel (r, c) reads the input at a per-image source coordinate `source(drawn, n, h, w)` gives."""

    def _resampling_args(self, fill_mode, interpolation, fill_value, fill_modes=FILL_MODES):
        kind = type(self).__name__
        if fill_mode not in fill_modes:
            raise ConfigError(f"{kind}: fill_mode must be one of {', '.join(fill_modes)}; got {fill_mode!r}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"{kind}: interpolation must be one of {', '.join(INTERPOLATIONS)}; "
                              f"got {interpolation!r}")
        self.fill_mode, self.interpolation, self.fill_value = fill_mode, interpolation, float(fill_value)

    def augment(self, x, drawn):
        n, h, w, c = x.shape
        rows, cols = self.source(drawn, n, h, w)
        if self.interpolation == "nearest":
            corners = [(np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64), None)]
        else:
            r0, c0 = np.floor(rows), np.floor(cols)
            fr, fc = rows - r0, cols - c0
            r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
            corners = [(r0, c0, (1 - fr) * (1 - fc)), (r0, c0 + 1, (1 - fr) * fc),
                       (r0 + 1, c0, fr * (1 - fc)), (r0 + 1, c0 + 1, fr * fc)]
        base = (np.arange(n) * h)[:, None, None]
        flat_x = x.reshape(-1, c)
        out = np.zeros(x.shape, x.dtype)
        fill = np.zeros((n, h, w), x.dtype)
        self.corners = []
        for r, cc, weight in corners:
            r, valid_r = _fold(r, h, self.fill_mode)
            cc, valid_c = _fold(cc, w, self.fill_mode)
            weight = np.ones((n, h, w), x.dtype) if weight is None else weight.astype(x.dtype)
            if valid_r is not None:
                fill += weight * ~(valid_r & valid_c)
                weight = weight * (valid_r & valid_c)
            flat = ((base + r) * w + cc).reshape(-1)
            out += weight[..., None] * flat_x[flat].reshape(x.shape)
            self.corners.append((flat, weight.reshape(-1, 1)))
        if self.fill_mode == "constant" and self.fill_value:
            out += self.fill_value * fill[..., None]
        self.in_shape = x.shape
        return out

    def augment_backward(self, grad):
        c = self.in_shape[-1]
        dx = np.zeros((int(np.prod(self.in_shape[:-1])), c), grad.dtype)
        g = grad.reshape(-1, c)
        for flat, weight in self.corners:
            np.add.at(dx, flat, g * weight)
        return dx.reshape(self.in_shape)


@register("RandomTranslation")
class RandomTranslation(_Resampling):
    """Shift each image by a random fraction of its height/width (positive = down/right), as Keras."""

    def __init__(self, height_factor, width_factor, fill_mode: str = "reflect", interpolation: str = "bilinear",
                 seed: int | None = None, fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.height_factor = _range(height_factor, "height_factor", "RandomTranslation")
        self.width_factor = _range(width_factor, "width_factor", "RandomTranslation")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def draw(self, n):
        """(2, n): each image's shift down and right, as fractions of its height and width."""
        return np.stack([self.rng.uniform(*self.height_factor, n), self.rng.uniform(*self.width_factor, n)])

    def source(self, drawn, n, h, w):
        dy, dx = drawn[0] * h, drawn[1] * w
        rows = np.arange(h)[None, :, None] - dy[:, None, None]
        cols = np.arange(w)[None, None, :] - dx[:, None, None]
        return np.broadcast_to(rows, (n, h, w)), np.broadcast_to(cols, (n, h, w))


@register("RandomRotation")
class RandomRotation(_Resampling):
    """Rotate each image about its centre by a random fraction `factor` of a full turn (positive =
    counter-clockwise), as Keras; any angle, not only multiples of 90 degrees."""

    def __init__(self, factor, fill_mode: str = "reflect", interpolation: str = "bilinear", seed: int | None = None,
                 fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.factor = _range(factor, "factor", "RandomRotation")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def draw(self, n):
        return self.rng.uniform(*self.factor, n)  # fractions of a full turn

    def source(self, drawn, n, h, w):
        theta = np.asarray(drawn)[:, None, None] * 2 * np.pi
        cy, cx = (h - 1) / 2, (w - 1) / 2
        r = np.arange(h)[None, :, None] - cy
        c = np.arange(w)[None, None, :] - cx
        cos, sin = np.cos(theta), np.sin(theta)
        # inverse rotation of the output pixel (image rows point down, hence the signs)
        return cy + sin * c + cos * r, cx + cos * c - sin * r


@register("RandomZoom")
class RandomZoom(_Resampling):
    """Zoom each image about its centre; a positive factor zooms out, a negative one in (Keras' convention).
    width_factor None keeps the aspect ratio (the same draw as the height)."""

    def __init__(self, height_factor, width_factor=None, fill_mode: str = "reflect",
                 interpolation: str = "bilinear", seed: int | None = None, fill_value: float = 0.0, **kw):
        super().__init__(seed, **kw)
        self.height_factor = _range(height_factor, "height_factor", "RandomZoom")
        self.width_factor = None if width_factor is None else _range(width_factor, "width_factor", "RandomZoom")
        self._resampling_args(fill_mode, interpolation, fill_value)

    def draw(self, n):
        """(2, n): each image's zoom down and across."""
        zh = 1 + self.rng.uniform(*self.height_factor, n)
        return np.stack([zh, zh if self.width_factor is None else 1 + self.rng.uniform(*self.width_factor, n)])

    def source(self, drawn, n, h, w):
        zh, zw = (np.asarray(z)[:, None, None] for z in drawn)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        rows = cy + (np.arange(h)[None, :, None] - cy) * zh
        cols = cx + (np.arange(w)[None, None, :] - cx) * zw
        return np.broadcast_to(rows, (n, h, w)), np.broadcast_to(cols, (n, h, w))


@register("RandomShear")
class RandomShear(_Resampling):
    """Shear each image about its top-left corner as Keras' RandomShear: output pixel (row, col) reads the input at
    (row + s_y col, col + s_x row), s_x and s_y drawn per image from x_factor's and y_factor's ranges (a number f
    means [-f, f], within [0, 1]) and both negated together by a coin; Keras' fill modes and interpolations."""

    def __init__(self, x_factor=0.0, y_factor=0.0, interpolation: str = "bilinear", fill_mode: str = "reflect",
                 fill_value: float = 0.0, data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.x_factor = self._shear_range(x_factor, "x_factor")
        self.y_factor = self._shear_range(y_factor, "y_factor")
        self._resampling_args(fill_mode, interpolation, fill_value)
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomShear: dlcli images are channels_last; got data_format {data_format!r}")
        self.data_format = data_format

    @staticmethod
    def _shear_range(factor, what):
        """Keras' _set_factor_with_name: a number f in [0, 1] means [-f, f]; a pair is sorted. Keras wants the
        pair in [0, 1] too, yet saves a number f as [-f, f] (its own loader then refuses the file): dlcli takes
        pairs in [-1, 1], so such files import."""
        pair = isinstance(factor, (list, tuple))
        given = list(factor) if pair else [factor]
        low = -1 if pair else 0
        if pair and len(given) != 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and
                                               low <= f <= 1 for f in given):
            raise ConfigError(f"RandomShear: {what} must be a number in [0, 1] or a pair in [-1, 1]; got {factor!r}")
        return tuple(sorted(float(f) for f in given)) if pair else (-float(factor), float(factor))

    def draw(self, n):
        """(n, 2): each image's (s_x, s_y)."""
        sign = np.where(self.rng.uniform(0, 1, (n, 1)) > 0.5, -1.0, 1.0)
        shear_y = self.rng.uniform(*self.y_factor, (n, 1))
        shear_x = self.rng.uniform(*self.x_factor, (n, 1))
        return np.concatenate([shear_x, shear_y], 1) * sign

    def source(self, drawn, n, h, w):
        shear = np.asarray(drawn, np.float64)
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        return rows + shear[:, 1, None, None] * cols, cols + shear[:, 0, None, None] * rows


@register("RandomPerspective")
class RandomPerspective(_Resampling):
    """Warp each image, with probability p drawn per image from factor's range (a number means [0, f]), by the
    homography taking its four corners to corners moved by (corner * u), u drawn per corner and axis from
    [-scale / 2, scale / 2] (Keras' RandomPerspective; the corners' coordinates scale the move, so the top-left
    corner stays). Pixels from outside the image take fill_value. The identity at inference."""

    def __init__(self, factor=1.0, scale=1.0, interpolation: str = "bilinear", fill_value: float = 0.0,
                 seed: int | None = None, data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomPerspective")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 1:
            raise ConfigError(f"RandomPerspective: scale must be a number in [0, 1]; got {scale!r}")
        self.scale = float(scale)
        self._resampling_args("constant", interpolation, fill_value)
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomPerspective: dlcli images are channels_last; got data_format {data_format!r}")
        self.data_format = data_format

    def draw(self, n):
        probability = self.rng.uniform(*self.factor, n)
        apply = self.rng.uniform(0, 1, n) < probability
        return {"apply_perspective": apply,
                "perspective_factor": self.rng.uniform(-0.5 * self.scale, 0.5 * self.scale, (n, 4, 2))}

    @staticmethod
    def homography(start, end):
        """Keras' compute_homography_matrix: the 8 coefficients taking each end point to its start point, solved in
        float32 as Keras does whatever the images' dtype."""
        start, end = start.astype(np.float32), end.astype(np.float32)
        ex, ey, sx, sy = end[..., 0], end[..., 1], start[..., 0], start[..., 1]
        zero, one = np.zeros_like(ex), np.ones_like(ex)
        rows_x = np.stack([ex, ey, one, zero, zero, zero, -sx * ex, -sx * ey], -1)
        rows_y = np.stack([zero, zero, zero, ex, ey, one, -sy * ex, -sy * ey], -1)
        system = np.stack([rows_x, rows_y], 2).reshape(len(ex), 8, 8)  # x and y rows of each corner in turn
        return np.linalg.solve(system, np.stack([sx, sy], 2).reshape(len(ex), 8, 1))[..., 0]

    def source(self, drawn, n, h, w):
        corners = np.array([[0.0, 0.0], [w - 1, 0.0], [0.0, h - 1], [w - 1, h - 1]])
        start = np.broadcast_to(corners, (n, 4, 2))
        a = self.homography(start, start + start * np.asarray(drawn["perspective_factor"], np.float64))
        a = a[:, :, None, None]
        cols, rows = np.arange(w)[None, None, :], np.arange(h)[None, :, None]
        denominator = a[:, 6] * cols + a[:, 7] * rows + 1.0
        source_cols = (a[:, 0] * cols + a[:, 1] * rows + a[:, 2]) / denominator
        source_rows = (a[:, 3] * cols + a[:, 4] * rows + a[:, 5]) / denominator
        keep = ~np.asarray(drawn["apply_perspective"], bool)[:, None, None]  # these read their own pixels
        return np.where(keep, rows + 0.0 * cols, source_rows), np.where(keep, cols + 0.0 * rows, source_cols)


@register("RandomElasticTransform")
class RandomElasticTransform(_Resampling):
    """Displace the pixels of each image, with probability p drawn per image from factor's range (a number f means
    [0, f]), by a smooth random field (Keras 3.15's RandomElasticTransform and ops.image.elastic_transform): per
    pixel and axis standard normal noise times sigma, blurred by a Gaussian of that sigma (int(6 sigma) | 1 taps,
    zero padding), times alpha; sigma = 0.05 min(H, W) s and alpha = 0.1 max(H, W) s, s drawn once per batch from
    scale's range. Read with interpolation and fill_mode as Keras' JAX backend does (mirror too), then clipped to
    value_range. Keras' JAX backend draws both axes' noise from one key, so its field moves every pixel along the
    diagonal; dlcli draws the two apart, as Keras' torch backend does. The identity at inference."""

    def __init__(self, factor=1.0, scale=1.0, interpolation: str = "bilinear", fill_mode: str = "reflect",
                 fill_value: float = 0.0, value_range=(0, 255), seed: int | None = None,
                 data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomElasticTransform")
        self.scale = _factor(scale, (0.0, 1.0), "RandomElasticTransform")
        self._resampling_args(fill_mode, interpolation, fill_value, (*FILL_MODES, "mirror"))
        self.value_range = _value_range(value_range, "RandomElasticTransform")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomElasticTransform: dlcli images are channels_last; got data_format "
                              f"{data_format!r}")
        self.data_format = data_format

    def draw(self, n):
        probability = self.rng.uniform(*self.factor, n)
        return {"apply_transform": self.rng.uniform(0, 1, n) < probability,
                "distortion_factor": self.rng.uniform(*self.scale),
                "noise": self.rng.standard_normal((2, n, *self.input_shape[:2]))}  # columns', then rows' noise

    def source(self, drawn, n, h, w):
        s = float(drawn["distortion_factor"])
        alpha, sigma = max(h, w) * (0.1 * s), min(h, w) * (0.05 * s)
        size = int(6 * sigma) | 1
        kernel = _gaussian(size, sigma)
        noise = np.asarray(drawn["noise"], np.float64).reshape(2 * n, h, w, 1) * sigma
        field = alpha * _neighbourhood_sum(noise, size, size, kernel, kernel).reshape(2, n, h, w)
        moved = np.asarray(drawn["apply_transform"], bool)[:, None, None]
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        return rows + np.where(moved, field[1], 0), cols + np.where(moved, field[0], 0)

    def augment(self, x, drawn):
        self.unchanged = self.scale[1] == 0 or self.factor[1] == 0  # Keras draws nothing and returns its input
        if self.unchanged:
            return x
        y = super().augment(x, drawn)
        low, high = self.value_range
        self.inside = (y >= low) & (y <= high)
        return np.clip(y, low, high).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return grad if self.unchanged else super().augment_backward(grad * self.inside)


def _resize_matrix(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
    """(n_out, n_in) weights resampling one axis as Keras' torch backend does: bilinear with half-pixel centres
    (torch's interpolate, align_corners=False, no antialias), nearest as torch's 'nearest-exact'."""
    scale, dst = n_in / n_out, np.arange(n_out)
    matrix = np.zeros((n_out, n_in))
    if interpolation == "nearest":
        matrix[dst, np.minimum(np.floor((dst + 0.5) * scale).astype(int), n_in - 1)] = 1
        return matrix
    src = np.maximum((dst + 0.5) * scale - 0.5, 0)
    low = np.minimum(np.floor(src).astype(int), n_in - 1)
    frac = src - low
    np.add.at(matrix, (dst, low), 1 - frac)
    np.add.at(matrix, (dst, np.minimum(low + 1, n_in - 1)), frac)
    return matrix


def _aspect_crop(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """(top, left, rows, columns): the largest centred window with the target's aspect ratio (Keras' smart_resize
    and crop_to_aspect_ratio)."""
    rows = max(min(height, int(float(width * target_height) / target_width)), 1)
    cols = max(min(width, int(float(height * target_width) / target_height)), 1)
    return int(float(height - rows) / 2), int(float(width - cols) / 2), rows, cols


class _Resample(Layer):
    """Crop a window (top, left, rows, cols) of each image, then resample it to (height, width) with one matrix per
    axis: y = A_h x A_w^T per channel, a linear map whose transpose is the backward pass and whose ONNX form is a
    Slice and two MatMuls. Always on (training and inference), as Keras' Resizing and CenterCrop."""

    supports_masking = False

    def _check_size(self, height, width):
        for what, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{type(self).__name__}: {what} must be an integer >= 1; got {value!r}")
        self.height, self.width = height, width

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ShapeError(f"{type(self).__name__} '{self.name}' expects images (batch, height, width, channels);"
                             f" got (None, {', '.join(map(str, input_shape))})")
        top, left, rows, cols, interpolation = self.window(*input_shape[:2])
        self.box = (top, left, rows, cols)
        self.rows_matrix = _resize_matrix(rows, self.height, interpolation)
        self.cols_matrix = _resize_matrix(cols, self.width, interpolation)

    def output_shape(self, input_shape):
        return (self.height, self.width, input_shape[2])

    def forward(self, x, training=False):
        top, left, rows, cols = self.box
        dtype = x.dtype
        self.in_shape = x.shape
        window = x[:, top:top + rows, left:left + cols]
        a, b = self.rows_matrix.astype(dtype), self.cols_matrix.astype(dtype)
        return np.einsum("ih,nhwc,jw->nijc", a, window, b, optimize=True)

    def backward(self, grad):
        top, left, rows, cols = self.box
        a, b = self.rows_matrix.astype(grad.dtype), self.cols_matrix.astype(grad.dtype)
        dx = np.zeros(self.in_shape, grad.dtype)
        dx[:, top:top + rows, left:left + cols] = np.einsum("ih,nijc,jw->nhwc", a, grad, b, optimize=True)
        return dx

    def to_onnx(self, g, x, in_shape, mask):
        top, left, rows, cols = self.box
        x = g.first(x)  # (n, c, h, w)
        y = g.op("Slice", [x.name, g.ints([top, left]), g.ints([top + rows, left + cols]), g.ints([2, 3])])
        y = g.op("MatMul", [y, g.weight(self, self.cols_matrix.T.astype(np.float32), "columns")])
        y = g.op("MatMul", [g.weight(self, self.rows_matrix.astype(np.float32), "rows"), y], self.name)
        return g.value(y, 4, first=True)


@register("Resizing")
class Resizing(_Resample):
    """Resize images to (height, width) as Keras' Resizing (its torch backend): bilinear or nearest,
    crop_to_aspect_ratio first takes the largest centred window of the target's aspect ratio. Keras' other
    interpolations, pad_to_aspect_ratio and antialias are not implemented and are refused by name."""

    def __init__(self, height: int, width: int, interpolation: str = "bilinear", crop_to_aspect_ratio: bool = False,
                 pad_to_aspect_ratio: bool = False, fill_mode: str = "constant", fill_value: float = 0.0,
                 antialias: bool = False, data_format: str | None = None, **kw):
        super().__init__(**kw)
        self._check_size(height, width)
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"Resizing: interpolation must be one of {', '.join(INTERPOLATIONS)} here; got "
                              f"{interpolation!r}")
        for what, value in (("pad_to_aspect_ratio", pad_to_aspect_ratio), ("antialias", antialias)):
            if value:
                raise ConfigError(f"Resizing: {what}: true is not implemented in dlcli (crop_to_aspect_ratio is)")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"Resizing: dlcli images are channels_last; got data_format {data_format!r}")
        self.interpolation, self.crop_to_aspect_ratio = interpolation, bool(crop_to_aspect_ratio)
        self.pad_to_aspect_ratio, self.fill_mode, self.fill_value = False, fill_mode, float(fill_value)
        self.antialias, self.data_format = False, data_format

    def window(self, height, width):
        if self.crop_to_aspect_ratio:
            return (*_aspect_crop(height, width, self.height, self.width), self.interpolation)
        return 0, 0, height, width, self.interpolation


@register("CenterCrop")
class CenterCrop(_Resample):
    """The centred (height, width) window of each image (Keras' CenterCrop: offsets (H - height) // 2 and
    (W - width) // 2); an image smaller than that on either axis is resized as Keras' smart_resize does (the largest
    centred window of the target's aspect ratio, bilinear)."""

    def __init__(self, height: int, width: int, data_format: str | None = None, **kw):
        super().__init__(**kw)
        self._check_size(height, width)
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"CenterCrop: dlcli images are channels_last; got data_format {data_format!r}")
        self.data_format = data_format

    def window(self, height, width):
        if height >= self.height and width >= self.width:
            return (height - self.height) // 2, (width - self.width) // 2, self.height, self.width, "nearest"
        return (*_aspect_crop(height, width, self.height, self.width), "bilinear")


@register("RandomCrop")
class RandomCrop(_Resample):
    """A random (height, width) window of the batch in training, one position for the whole batch as Keras'
    RandomCrop draws it, when the images are larger on both axes. Otherwise, and at inference, the largest centred
    window of the target's aspect ratio resized bilinearly to (height, width): what Keras documents for inference
    (its 3.15 code returns the input uncropped at inference, which a model of fixed shapes cannot follow)."""

    supports_masking = False

    def __init__(self, height: int, width: int, seed: int | None = None, data_format: str | None = None, **kw):
        super().__init__(**kw)
        self._check_size(height, width)
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomCrop: dlcli images are channels_last; got data_format {data_format!r}")
        self.seed, self.data_format = seed, data_format

    def build(self, input_shape):
        super().build(input_shape)
        if self.seed is not None:
            self.rng = np.random.default_rng(self.seed)
        self.random = input_shape[0] > self.height and input_shape[1] > self.width

    def window(self, height, width):
        return (*_aspect_crop(height, width, self.height, self.width), "bilinear")

    def draw(self, n):
        """(top, left) of the batch's window (Keras: uniform integers over every position)."""
        rows, cols = self.input_shape[:2]
        return int(self.rng.integers(rows - self.height + 1)), int(self.rng.integers(cols - self.width + 1))

    def forward(self, x, training=False):
        self.offset = self.draw(x.shape[0]) if training and self.random else None
        if self.offset is None:
            return super().forward(x, training)
        top, left = self.offset
        self.in_shape = x.shape
        return x[:, top:top + self.height, left:left + self.width]

    def backward(self, grad):
        if self.offset is None:
            return super().backward(grad)
        top, left = self.offset
        dx = np.zeros(self.in_shape, grad.dtype)
        dx[:, top:top + self.height, left:left + self.width] = grad
        return dx


def box_mask(shape, x_ratio, y_ratio, x_position, y_position):
    """Keras' boxes for CutMix and RandomErasing (_compute_crop_bounds, _generate_batch_mask): per image a box
    x_ratio of the width and y_ratio of the height, its start position * (length - box length) along each axis,
    unrounded; returns the (n, height, width, 1) mask of the pixels it covers and its area share of the image."""
    _, height, width, _ = shape
    bounds = []
    for length, ratio, position in ((width, x_ratio, x_position), (height, y_ratio, y_position)):
        crop = ratio * length
        start = position * (length - crop)
        bounds += [start, start + crop]
    x0, x1, y0, y1 = (b[:, None, None] for b in bounds)
    cols, rows = np.arange(width)[None, None, :], np.arange(height)[None, :, None]
    mask = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return mask[..., None], ((x1 - x0) * (y1 - y0) / (width * height)).reshape(-1)


@register("RandomErasing")
class RandomErasing(_Augmentation):
    """Replace a random box of each image, with probability p drawn per image from factor's range (a number means
    [0, f]), by fill_value (a number, one per channel, or None: Gaussian noise times value_range's top, as
    Keras). The box is sqrt(s_w) of the width and sqrt(s_h) of the height, s drawn from scale's range, at a
    uniform position (Keras' RandomErasing). The identity at inference."""

    def __init__(self, factor=1.0, scale=(0.02, 0.33), fill_value=None, value_range=(0, 255),
                 seed: int | None = None, data_format: str | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomErasing")
        self.scale = _factor(scale, (0.0, 1.0), "RandomErasing")
        if fill_value is not None and not (isinstance(fill_value, (int, float)) and not isinstance(fill_value, bool)
                                           or isinstance(fill_value, (list, tuple)) and len(fill_value) == 3):
            raise ConfigError(f"RandomErasing: fill_value must be a number, three numbers (one per channel) or "
                              f"null for noise; got {fill_value!r}")
        self.fill_value = fill_value
        self.value_range = _value_range(value_range, "RandomErasing")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomErasing: dlcli images are channels_last; got data_format {data_format!r}")
        self.data_format = data_format

    def draw(self, n):
        ratios = np.sqrt(self.rng.uniform(*self.scale, (n, 2)))
        x_position, y_position = self.rng.uniform(0, 1, n), self.rng.uniform(0, 1, n)
        probability = self.rng.uniform(*self.factor, n)
        drawn = {"ratios": ratios, "x_position": x_position, "y_position": y_position,
                 "apply_erasing": self.rng.uniform(0, 1, n) < probability}
        if self.fill_value is None:
            drawn["noise"] = self.rng.standard_normal((n, *self.input_shape)) * self.value_range[1]
        return drawn

    def augment(self, x, drawn):
        ratios = drawn["ratios"]
        mask, _ = box_mask(x.shape, ratios[:, 0], ratios[:, 1], drawn["x_position"], drawn["y_position"])
        self.erased = mask & np.asarray(drawn["apply_erasing"], bool)[:, None, None, None]
        fill = drawn["noise"] if self.fill_value is None else np.asarray(self.fill_value, np.float64)
        return np.where(self.erased, fill, x).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return np.where(self.erased, 0, grad)


def _factor(factor, bounds, layer: str) -> tuple[float, float]:
    """Keras' BaseImagePreprocessingLayer._set_factor: a pair (sorted), or a number f giving
    (max(-|f|, lower bound), |f|); both within `bounds`."""
    message = f"{layer}: factor must be a number or a pair in [{bounds[0]}, {bounds[1]}]; got {factor!r}"
    if isinstance(factor, (list, tuple)):
        if len(factor) != 2 or factor[0] > bounds[1] or factor[1] < bounds[0]:
            raise ConfigError(message)
        return tuple(sorted(float(f) for f in factor))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not bounds[0] <= factor <= bounds[1]:
        raise ConfigError(message)
    return max(-abs(float(factor)), bounds[0]), abs(float(factor))


def _value_range(value_range, layer: str) -> list[float]:
    if not isinstance(value_range, (list, tuple)) or len(value_range) != 2:
        raise ConfigError(f"{layer}: value_range must be a pair [low, high]; got {value_range!r}")
    return sorted(float(v) for v in value_range)


class _PixelAugmentation(_Augmentation):
    """A per-image random change of pixel values, clipped to value_range, the identity at inference. `draw(n)`
    gives each image's parameter, `apply(x, p)` the unclipped result and `apply_backward(grad, p)` its transpose."""

    def augment(self, x, drawn):
        self.params_drawn = np.asarray(drawn).astype(x.dtype)
        y = self.apply(x, self.params_drawn)
        low, high = self.value_range
        self.inside = (y >= low) & (y <= high)  # where the clip passes the gradient (torch's clamp)
        return np.clip(y, low, high).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        return self.apply_backward(grad * self.inside, self.params_drawn)


@register("RandomBrightness")
class RandomBrightness(_PixelAugmentation):
    """Adds factor * (high - low) to every pixel of an image, the factor drawn per image from [lower, upper]
    (Keras: a number f means [-f, f], within [-1, 1]), then clips to value_range."""

    def __init__(self, factor, value_range=(0, 255), seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (-1.0, 1.0), "RandomBrightness")
        self.value_range = _value_range(value_range, "RandomBrightness")

    def draw(self, n):
        low, high = self.value_range
        return self.rng.uniform(*self.factor, n) * (high - low)

    def apply(self, x, delta):
        return x + delta[:, None, None, None]

    def apply_backward(self, grad, delta):
        return grad


@register("RandomContrast")
class RandomContrast(_PixelAugmentation):
    """(x - mean) * c + mean per image and channel, the mean over height and width, c drawn per image from
    [1 - lower, 1 + upper], then clipped to value_range. As Keras 3.15 parses factor (bounds [0, 1]), a number f
    gives lower 0, so c is in [1, 1 + f]: contrast only ever rises; give a pair [f, f] for [1 - f, 1 + f]."""

    def __init__(self, factor, value_range=(0, 255), seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomContrast")
        self.value_range = _value_range(value_range, "RandomContrast")

    def draw(self, n):
        return self.rng.uniform(1 - self.factor[0], 1 + self.factor[1], n)

    def apply(self, x, c):
        mean = x.mean((1, 2), keepdims=True)
        c = c[:, None, None, None]
        return (x - mean) * c + mean

    def apply_backward(self, grad, c):
        c = c[:, None, None, None]
        return grad * c + (1 - c) * grad.mean((1, 2), keepdims=True)


GRAYSCALE = np.array([0.2989, 0.587, 0.114])  # Keras' rgb_to_grayscale (torchvision's weights)


@register("RandomGrayscale")
class RandomGrayscale(_Augmentation):
    """Each image becomes grayscale with probability `factor` (0.2989 R + 0.587 G + 0.114 B in every channel, as
    Keras' rgb_to_grayscale; a one-channel image stays as it is); the identity at inference."""

    def __init__(self, factor: float = 0.5, data_format: str | None = None, seed: int | None = None, **kw):
        super().__init__(seed, **kw)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
            raise ConfigError(f"RandomGrayscale: factor must be a probability in [0, 1]; got {factor!r}")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomGrayscale: dlcli images are channels_last; got data_format {data_format!r}")
        self.factor, self.data_format = float(factor), data_format

    def build(self, input_shape):
        super().build(input_shape)
        if input_shape[-1] not in (1, 3):
            raise ShapeError(f"RandomGrayscale '{self.name}' needs 1 or 3 channels (RGB); got {input_shape[-1]}")

    def draw(self, n):
        return self.rng.random(n) < self.factor

    def augment(self, x, chosen):
        self.chosen = chosen[:, None, None, None]
        if x.shape[-1] == 1:
            return x
        gray = x @ GRAYSCALE.astype(x.dtype)
        return np.where(self.chosen, gray[..., None], x).astype(x.dtype, copy=False)

    def augment_backward(self, grad):
        if grad.shape[-1] == 1:
            return grad
        return np.where(self.chosen, grad.sum(-1, keepdims=True) * GRAYSCALE.astype(grad.dtype), grad)


@register("RandomInvert")
class RandomInvert(_Augmentation):
    """Each image becomes high - x (high: value_range's top) with a probability drawn per image from factor's
    range (Keras' RandomInvert: a number f means [0, f], so the default 1.0 inverts half the images); the identity
    at inference."""

    def __init__(self, factor=1.0, value_range=(0, 255), seed: int | None = None, data_format: str | None = None,
                 **kw):
        super().__init__(seed, **kw)
        self.factor = _factor(factor, (0.0, 1.0), "RandomInvert")
        self.value_range = _value_range(value_range, "RandomInvert")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"RandomInvert: dlcli images are channels_last; got data_format {data_format!r}")
        self.data_format = data_format

    def draw(self, n):
        return self.rng.random(n) < self.rng.uniform(*self.factor, n)

    def augment(self, x, chosen):
        self.chosen = chosen[:, None, None, None]
        return np.where(self.chosen, np.asarray(self.value_range[1], x.dtype) - x, x)

    def augment_backward(self, grad):
        return np.where(self.chosen, -grad, grad)
