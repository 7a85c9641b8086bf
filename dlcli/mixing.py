"""Keras' MixUp and CutMix, applied by the trainer to each training batch's inputs *and* targets (`train.mix`).

In Keras they are image preprocessing layers called on `{"images": ..., "labels": ...}` in the data pipeline: a
layer inside a model sees only its input, so it could mix the images but never their labels. dlcli therefore
gives them their own config key, `train.mix: {type: MixUp, alpha: 0.2}` or `{type: CutMix, factor: 1.0}`, and
mixes every training batch (never validation, test or predict) as Keras' transform_images and transform_labels do.
Float targets (one-hot, probabilities) are mixed as Keras mixes labels; integer class labels cannot be, so the
batch's loss becomes w * loss(labels) + (1 - w) * loss(partner's labels) per sample, which for cross-entropy is
exactly the loss of the mixed one-hot targets (and training metrics count each sample's larger share as its label,
as accuracy against Keras' mixed one-hot targets does).
"""
import numpy as np

from dlcli.errors import ConfigError, DlcliError
from dlcli.layers.preprocessing import _factor, box_mask
from dlcli.registry import Registry

MIXES = Registry("batch mix")


class _Mix:
    def check(self, model):
        """Refuse, before any data is read, a model whose inputs this mix cannot mix."""

    def mix(self, xs: list, ys: list, rng: np.random.Generator, sparse: bool):
        """(mixed inputs, targets, partner targets or None, each sample's own share w). Targets come back mixed
        (partner None), unless a loss takes class labels (`sparse`): then they come back as they are with the
        partner's, for the trainer to weigh the two losses w and 1 - w."""
        drawn = self.draw(xs, rng)
        weight, partner = drawn["mix_weight"], drawn["permutation"]
        xs = self.mix_inputs(xs, drawn)
        if not sparse:
            return xs, [self.mix_targets(y.astype(np.float32, copy=False) if y.dtype.kind in "iub" else y, weight,
                                         partner) for y in ys], None, weight
        return xs, ys, [y[partner] for y in ys], weight

    @staticmethod
    def mix_targets(y, weight, partner):
        """Keras' transform_labels: w y + (1 - w) y[permutation]."""
        w = weight.astype(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
        return w * y + (1 - w) * y[partner]


@MIXES.register("MixUp")
class MixUp(_Mix):
    """Keras' MixUp: each sample becomes w x + (1 - w) x[permutation] (every input of the model), w drawn per
    sample from Beta(alpha, alpha), the permutation a shuffle of the batch."""

    def __init__(self, alpha: float = 0.2, seed: int | None = None, data_format: str | None = None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ConfigError(f"MixUp: alpha must be a number > 0; got {alpha!r}")
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"MixUp: dlcli images are channels_last; got data_format {data_format!r}")
        self.alpha, self.seed, self.data_format = float(alpha), seed, data_format

    def draw(self, xs, rng):
        n = len(xs[0])
        return {"permutation": rng.permutation(n), "mix_weight": rng.beta(self.alpha, self.alpha, n)}

    def mix_inputs(self, xs, drawn):
        return [self.mix_targets(x.astype(np.float32, copy=False) if x.dtype.kind in "iub" else x,
                                 drawn["mix_weight"], drawn["permutation"]) for x in xs]


@MIXES.register("CutMix")
class CutMix(_Mix):
    """Keras' CutMix: a box of each image is replaced by the same box of its partner (a shuffle of the batch).
    One alpha per batch from factor's range (a number f means [0, f]) plus 1e-6; per image w ~ Beta(alpha, alpha),
    the box sqrt(1 - w) of the height and width at a uniform position, and the targets mixed by the share of the
    image outside the box, 1 - box area / image area (Keras measures the box unrounded). Images (batch, height,
    width, channels) only, one input."""

    def __init__(self, factor=1.0, seed: int | None = None, data_format: str | None = None):
        if data_format not in (None, "channels_last"):
            raise ConfigError(f"CutMix: dlcli images are channels_last; got data_format {data_format!r}")
        self.factor = _factor(factor, (0.0, 1.0), "CutMix")
        self.seed, self.data_format = seed, data_format

    def check(self, model):
        shapes = [tuple(t.shape) for t in model.graph.inputs]
        if len(shapes) != 1 or len(shapes[0]) != 3:
            raise DlcliError(f"train.mix: CutMix cuts boxes out of images, so the model needs one input of images "
                             f"(height, width, channels); its inputs are {', '.join(map(str, shapes))}", exit_code=2)

    def draw(self, xs, rng):
        n = len(xs[0])
        alpha = rng.uniform(*self.factor) + 1e-6
        beta = rng.beta(alpha, alpha, n)
        return self.boxes(xs[0].shape, beta, rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.permutation(n))

    @staticmethod
    def boxes(shape, beta, x_position, y_position, permutation) -> dict:
        """The box sqrt(1 - beta) of each side and the share w = 1 - its area share (Keras' CutMix)."""
        ratio = np.sqrt(1.0 - beta)
        mask, area = box_mask(shape, ratio, ratio, x_position, y_position)
        return {"permutation": permutation, "mask": mask, "mix_weight": 1.0 - area}

    def mix_inputs(self, xs, drawn):
        x = xs[0]
        return [np.where(drawn["mask"], x[drawn["permutation"]], x)]


def get(spec):
    """The train.mix spec ({type: MixUp, ...} or a bare name) as a mix, or None."""
    return None if spec is None else MIXES.create(spec)
