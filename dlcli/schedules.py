"""Learning-rate schedules: `schedule(step) -> learning rate`, step = optimizer updates applied so far.

Formulas, argument names and defaults follow `keras.optimizers.schedules` (Keras 3) where Keras has the schedule;
one-cycle follows PyTorch's OneCycleLR (cosine annealing, two phases). A schedule can stand for a constant
learning rate (`compile.optimizer.learning_rate: {type: cosine_decay, ...}`, called with the optimizer's step)
or drive the LearningRateScheduler callback (called with the epoch index).
"""
import math

from dlcli.errors import ConfigError
from dlcli.registry import Registry

SCHEDULES = Registry("learning-rate schedule", name_attribute="name")


class Schedule:
    name = ""  # the first name the class is registered under (set by SCHEDULES.register)

    def __call__(self, step) -> float:
        raise NotImplementedError

    def get_config(self) -> dict:
        import inspect

        args = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {"type": self.name, **{a: getattr(self, a) for a in args}}

    def __repr__(self):
        return f"<{type(self).__name__} {self.get_config()}>"


@SCHEDULES.register("piecewise_constant", "PiecewiseConstantDecay", "step")
class PiecewiseConstantDecay(Schedule):
    """values[0] while step <= boundaries[0], values[i] while boundaries[i-1] < step <= boundaries[i], then
    values[-1] (Keras' boundaries are inclusive on the right)."""

    def __init__(self, boundaries: list[int], values: list[float]):
        if len(values) != len(boundaries) + 1:
            raise ConfigError(f"piecewise_constant needs one more value than boundaries (as in Keras); got "
                              f"{len(boundaries)} boundaries and {len(values)} values")
        if list(boundaries) != sorted(boundaries):
            raise ConfigError(f"piecewise_constant boundaries must increase; got {boundaries}")
        self.boundaries, self.values = [int(b) for b in boundaries], [float(v) for v in values]

    def __call__(self, step):
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return value
        return self.values[-1]


@SCHEDULES.register("exponential_decay", "ExponentialDecay")
class ExponentialDecay(Schedule):
    """initial_learning_rate * decay_rate ** (step / decay_steps); staircase floors the exponent."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False):
        _positive(decay_steps, "exponential_decay decay_steps")
        self.initial_learning_rate, self.decay_steps = float(initial_learning_rate), int(decay_steps)
        self.decay_rate, self.staircase = float(decay_rate), bool(staircase)

    def __call__(self, step):
        p = step / self.decay_steps
        return self.initial_learning_rate * self.decay_rate ** (math.floor(p) if self.staircase else p)


@SCHEDULES.register("cosine_decay", "CosineDecay")
class CosineDecay(Schedule):
    """Optional linear warm-up from initial_learning_rate to warmup_target over warmup_steps, then cosine decay
    over decay_steps down to alpha x the peak (Keras 3's CosineDecay: no warm-up when warmup_target is None)."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, alpha: float = 0.0,
                 warmup_target: float | None = None, warmup_steps: int = 0):
        _positive(decay_steps, "cosine_decay decay_steps")
        self.initial_learning_rate, self.decay_steps, self.alpha = float(initial_learning_rate), int(decay_steps), \
            float(alpha)
        self.warmup_target = None if warmup_target is None else float(warmup_target)
        self.warmup_steps = int(warmup_steps)

    def _decay(self, step, peak):
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))
        return peak * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step):
        if self.warmup_target is None:
            return self._decay(min(step, self.decay_steps), self.initial_learning_rate)
        step = min(step, self.decay_steps + self.warmup_steps)
        if step < self.warmup_steps:
            return self.initial_learning_rate + (self.warmup_target - self.initial_learning_rate) * \
                step / self.warmup_steps
        return self._decay(step - self.warmup_steps, self.warmup_target)


@SCHEDULES.register("one_cycle", "OneCycle")
class OneCycle(Schedule):
    """Cosine rise from max/div_factor to max_learning_rate over the first pct_start of total_steps, then cosine
    fall to max/(div_factor*final_div_factor) at step total_steps-1 (PyTorch's OneCycleLR defaults; Keras has none)."""

    def __init__(self, max_learning_rate: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0,
                 final_div_factor: float = 1e4):
        _positive(total_steps, "one_cycle total_steps")
        if not 0 < pct_start < 1:
            raise ConfigError(f"one_cycle pct_start must be in (0, 1); got {pct_start}")
        self.max_learning_rate, self.total_steps, self.pct_start = float(max_learning_rate), int(total_steps), \
            float(pct_start)
        self.div_factor, self.final_div_factor = float(div_factor), float(final_div_factor)

    def __call__(self, step):
        initial = self.max_learning_rate / self.div_factor
        final = initial / self.final_div_factor
        peak_step = self.pct_start * self.total_steps - 1  # PyTorch's phase boundary
        end_step = self.total_steps - 1
        step = min(step, end_step)
        if step <= peak_step:
            return _cos_anneal(initial, self.max_learning_rate, step / peak_step if peak_step > 0 else 1.0)
        return _cos_anneal(self.max_learning_rate, final, (step - peak_step) / (end_step - peak_step))


@SCHEDULES.register("inverse_time_decay", "InverseTimeDecay")
class InverseTimeDecay(Schedule):
    """initial_learning_rate / (1 + decay_rate * step / decay_steps); staircase floors step / decay_steps."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, decay_rate: float, staircase: bool = False):
        _positive(decay_steps, "inverse_time_decay decay_steps")
        self.initial_learning_rate, self.decay_steps = float(initial_learning_rate), int(decay_steps)
        self.decay_rate, self.staircase = float(decay_rate), bool(staircase)

    def __call__(self, step):
        p = step / self.decay_steps
        return self.initial_learning_rate / (1 + self.decay_rate * (math.floor(p) if self.staircase else p))


@SCHEDULES.register("polynomial_decay", "PolynomialDecay")
class PolynomialDecay(Schedule):
    """(initial - end) * (1 - step / decay_steps) ** power + end, held at end after decay_steps; with cycle the
    decay restarts from the initial rate over the next multiple of decay_steps (Keras)."""

    def __init__(self, initial_learning_rate: float, decay_steps: int, end_learning_rate: float = 0.0001,
                 power: float = 1.0, cycle: bool = False):
        _positive(decay_steps, "polynomial_decay decay_steps")
        self.initial_learning_rate, self.decay_steps = float(initial_learning_rate), int(decay_steps)
        self.end_learning_rate, self.power, self.cycle = float(end_learning_rate), float(power), bool(cycle)

    def __call__(self, step):
        decay_steps = self.decay_steps
        if self.cycle:
            decay_steps *= 1 if step == 0 else math.ceil(step / self.decay_steps)
        else:
            step = min(step, decay_steps)
        fraction = step / decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * (1 - fraction) ** self.power + \
            self.end_learning_rate


@SCHEDULES.register("cosine_decay_restarts", "CosineDecayRestarts")
class CosineDecayRestarts(Schedule):
    """Cosine decay that restarts (SGDR, Loshchilov & Hutter 2017): the i-th period lasts first_decay_steps *
    t_mul^i steps and starts from initial_learning_rate * m_mul^i; alpha is the floor as a fraction (Keras)."""

    def __init__(self, initial_learning_rate: float, first_decay_steps: int, t_mul: float = 2.0, m_mul: float = 1.0,
                 alpha: float = 0.0):
        _positive(first_decay_steps, "cosine_decay_restarts first_decay_steps")
        self.initial_learning_rate, self.first_decay_steps = float(initial_learning_rate), int(first_decay_steps)
        self.t_mul, self.m_mul, self.alpha = float(t_mul), float(m_mul), float(alpha)

    def __call__(self, step):
        fraction = step / self.first_decay_steps
        if self.t_mul == 1.0:
            restart = math.floor(fraction)
            fraction -= restart
        else:
            # periods 1, t, t^2 ...: restart i begins at (1 - t^i) / (1 - t) first periods
            restart = math.floor(math.log(1 - fraction * (1 - self.t_mul)) / math.log(self.t_mul))
            fraction = (fraction - (1 - self.t_mul ** restart) / (1 - self.t_mul)) / self.t_mul ** restart
        cosine = 0.5 * self.m_mul ** restart * (1 + math.cos(math.pi * fraction))
        return self.initial_learning_rate * ((1 - self.alpha) * cosine + self.alpha)


def _cos_anneal(start, end, fraction):
    return end + (start - end) / 2.0 * (1 + math.cos(math.pi * fraction))


def _positive(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer; got {value!r}")


def get(identifier) -> Schedule:
    """A schedule from {type: name, **args} (or a Schedule, returned as is)."""
    if isinstance(identifier, Schedule):
        return identifier
    if not isinstance(identifier, dict) or "type" not in identifier:
        raise ConfigError(f"a learning-rate schedule is a mapping like {{type: cosine_decay, initial_learning_rate: "
                          f"0.001, decay_steps: 1000}}; got {identifier!r}; known: {', '.join(SCHEDULES.names())}")
    return SCHEDULES.create(identifier)
