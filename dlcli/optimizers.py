"""Optimizers: the base class owns schedules, clipping, weight decay, lr multipliers and state; each subclass
implements only Keras 3's `update_step` rule, in place on the parameter array.

Update rules, defaults and clipping semantics follow `keras.optimizers` (Keras 3): clipping happens before the
decoupled weight decay `w -= w * weight_decay * lr`, which happens before the update; `iterations` counts applied
steps and a learning-rate schedule is called with it. State slots (velocity, momentum ...) are created lazily,
indexed by the parameter's position in the list given to `apply` (a checkpoint's 'slot/index'); where that list
changes (a layer's `trainable` changed between fits) each weight's state follows it (`Optimizer.follow`), and a
checkpoint keeps it by the weights' paths.
"""
import inspect
import math
import re

import numpy as np

from dlcli import kernels, schedules
from dlcli.errors import ConfigError, DlcliError
from dlcli.registry import Registry

OPTIMIZERS = Registry("optimizer", name_attribute="name")
_BASE_ARGS = ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay", "use_ema", "ema_momentum",
              "ema_overwrite_frequency")
_BASE_DEFAULTS = {"use_ema": False, "ema_momentum": 0.99}  # left out of get_config at these values


class Optimizer:
    name = ""  # the first name the class is registered under (set by OPTIMIZERS.register)
    slots_per_weight = 1  # arrays of state kept per weight (momentum, Adam's two moments ...)

    def __init__(self, learning_rate=0.001, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 weight_decay=None, use_ema: bool = False, ema_momentum: float = 0.99,
                 ema_overwrite_frequency: int | None = None):
        if sum(x is not None for x in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ConfigError("only one of clipnorm, clipvalue and global_clipnorm can be set (as in Keras); got "
                              f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}")
        if use_ema and not 0 <= ema_momentum <= 1:
            raise ConfigError(f"ema_momentum must be in [0, 1] (as in Keras); got {ema_momentum}")
        if ema_overwrite_frequency is not None and (isinstance(ema_overwrite_frequency, bool) or not isinstance(
                ema_overwrite_frequency, int) or ema_overwrite_frequency < 1):
            raise ConfigError(f"ema_overwrite_frequency must be an integer >= 1 or null; got "
                              f"{ema_overwrite_frequency!r}")
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.weight_decay = weight_decay
        self.use_ema, self.ema_momentum = bool(use_ema), float(ema_momentum)
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self._learning_rate = _learning_rate_arg(learning_rate)
        self.iterations = 0
        self.slots: dict[str, dict[int, np.ndarray]] = {}
        self._buffers: dict = {}
        self._followed, self._order = None, []  # the list the slots' indices refer to, and its weights' ids
        self._aside: dict[str, dict[str, np.ndarray]] = {}  # the state of weights not in the list, by path

    def slot_count(self) -> int:
        """slots_per_weight for this configuration: inspect-shapes' memory estimate."""
        return self.slots_per_weight

    # --- learning rate --------------------------------------------------------------------------------------
    @property
    def current_lr(self) -> float:
        """The rate the next step uses: a schedule is evaluated at `iterations` (Keras' optimizer.learning_rate)."""
        lr = self._learning_rate
        return float(lr(self.iterations)) if callable(lr) else lr

    @property
    def learning_rate(self) -> float:
        return self.current_lr

    @learning_rate.setter
    def learning_rate(self, value):
        if callable(self._learning_rate):
            # Keras refuses too: a schedule owns the rate.
            raise DlcliError("this optimizer's learning rate comes from a schedule and cannot be set (e.g. by "
                             "ReduceLROnPlateau); use a constant learning_rate or drop the callback")
        self._learning_rate = float(value)

    # --- one step ---------------------------------------------------------------------------------------------
    def apply(self, params):
        """One update of every param with a gradient (clip, decay, update_step); `iterations` += 1."""
        lr = self.current_lr
        self.follow(params)
        self.build(params)
        grads = self._clipped([p.grad for p in params])
        for index, (param, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            param_lr = lr * param.layer.lr_mult if param.layer is not None else lr
            decay = self.decay_for(index, param)
            if decay:
                param.value *= 1 - decay * param_lr  # Keras: w - w * wd * lr
            self.update_step(index, param.value, grad, param_lr)
        if self.use_ema:
            self._update_ema(params)
        self.iterations += 1

    def follow(self, params) -> bool:
        """Keep each weight's state with it when the list of weights differs from the last step's (a layer frozen or
        unfrozen between fits): its slots move to its new index, and those of a weight that left wait aside, by
        weight path, until it returns. Keras 3 keys the state by variable; by index, a frozen first layer would hand
        its moments to the next weight (of another shape). True where the list changed. The first list after a
        restore (set_state) takes each weight's state by its path (by index from a file without paths)."""
        if params is self._followed:
            return False
        order = [id(p) for p in params]
        previous, self._followed = self._followed, params
        if order == self._order:
            return False
        if not self._order:  # the first list, or the first since a restore
            self._order = order
            self._take_back(params, ())
            return True
        old, new = {key: i for i, key in enumerate(self._order)}, {key: i for i, key in enumerate(order)}
        paths = {id(p): p.path for p in previous}
        for name, per_param in self.slots.items():
            moved = {}
            for key, i in old.items():
                if i in per_param:
                    if key in new:
                        moved[new[key]] = per_param[i]
                    else:
                        self._aside.setdefault(paths[key], {})[name] = per_param[i]
            self.slots[name] = moved
        self._take_back(params, old)
        self._order = order
        return True

    def _take_back(self, params, kept):
        """The state waiting aside of each weight in `params` but not in `kept` (ids), at its index."""
        if self._aside:
            for j, p in enumerate(params):
                if id(p) not in kept:
                    for name, array in self._aside.pop(p.path, {}).items():
                        self.slots.setdefault(name, {})[j] = array

    def build(self, params):
        """State that must exist before the first step's weight decay (Keras' build); called before each step."""

    def decay_for(self, index: int, param) -> float | None:
        """The decoupled weight decay of one weight (Muon decays its two kinds of weights differently)."""
        return self.weight_decay

    def update_step(self, index: int, value: np.ndarray, grad: np.ndarray, lr: float):
        raise NotImplementedError

    # --- exponential moving average of the weights (Keras' use_ema) -------------------------------------------
    def _update_ema(self, params):
        """average = m average + (1 - m) w after each step (the first step copies w), kept as the 'average' slot;
        every ema_overwrite_frequency steps the weights take the averages' values, as Keras does."""
        momentum = self.ema_momentum if self.iterations else 0.0
        overwrite = self.ema_overwrite_frequency and (self.iterations + 1) % self.ema_overwrite_frequency == 0
        for index, param in enumerate(params):
            if param.grad is None:
                continue
            average = self.slot("average", index, param.value)
            average *= momentum
            average += (1 - momentum) * param.value
            if overwrite:
                param.value[...] = average

    def ema_averages(self, params) -> list[np.ndarray | None]:
        """Each trainable weight's moving average (None before the first step or without use_ema)."""
        self.follow(params)
        averages = self.slots.get("average", {})
        return [averages.get(i) if p.grad is not None else None for i, p in enumerate(params)]

    def finalize_variable_values(self, params):
        """Keras' end of fit: with use_ema the weights become their moving averages."""
        for param, average in zip(params, self.ema_averages(params)):
            if average is not None:
                param.value[...] = average

    def _clipped(self, grads):
        """Keras' clipping: per-tensor norm, global norm, or element values (new arrays; grads stay untouched)."""
        if self.clipnorm and self.clipnorm > 0:
            return [g if g is None else _scaled(g, self.clipnorm / max(_norm(g), self.clipnorm)) for g in grads]
        if self.global_clipnorm and self.global_clipnorm > 0:
            total = math.sqrt(sum(_norm(g) ** 2 for g in grads if g is not None))
            scale = self.global_clipnorm / max(total, self.global_clipnorm)
            return [g if g is None else _scaled(g, scale) for g in grads]
        if self.clipvalue and self.clipvalue > 0:
            return [g if g is None else np.clip(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    # --- state ------------------------------------------------------------------------------------------------
    def slot(self, name: str, index: int, like: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The state array `name` of parameter `index`, created (filled with `fill`) on first use."""
        per_param = self.slots.setdefault(name, {})
        array = per_param.get(index)
        if array is None:
            array = per_param[index] = np.full_like(like, fill)
        return array

    def scratch(self, like: np.ndarray) -> np.ndarray:
        """A reusable temporary shaped like `like` (one buffer per dtype, sized for the largest parameter)."""
        buffer = self._buffers.get(like.dtype)
        if buffer is None or buffer.size < like.size:
            buffer = self._buffers[like.dtype] = np.empty(like.size, like.dtype)
        return buffer[:like.size].reshape(like.shape)

    def get_state(self) -> dict[str, np.ndarray]:
        """Flat named arrays for np.savez: iterations, the constant learning rate, 'slot/index' arrays, the path of
        the weight at each index ('weight_paths'), and the state of weights out of training (a layer frozen since
        they had some) as 'aside/layer/weight/slot': a run resumed, or a saved model loaded, then unfrozen continues
        as the uninterrupted one."""
        state = {"iterations": np.array(self.iterations, np.int64)}
        if not callable(self._learning_rate):
            state["learning_rate"] = np.array(self._learning_rate, np.float64)  # Keras saves it as a variable
        if self._followed is not None:
            state["weight_paths"] = np.array([p.path for p in self._followed], str)
        for name, per_param in self.slots.items():
            for index, array in per_param.items():
                state[f"{name}/{index}"] = array.copy()
        for path, per_slot in self._aside.items():
            for name, array in per_slot.items():
                state[f"aside/{path}/{name}"] = array.copy()
        return state

    def set_state(self, state: dict):
        """Restore what `get_state` returned, exactly (training continues bit-identically): each weight's state by
        its path, taken by the next list of weights (`follow`); by index where the file has no paths."""
        self.iterations = int(state["iterations"])
        if "learning_rate" in state and not callable(self._learning_rate):
            self._learning_rate = float(state["learning_rate"])
        self.slots, self._followed, self._order, self._aside = {}, None, [], {}
        paths = [str(p) for p in state.get("weight_paths", ())]
        for key, array in state.items():
            if key.startswith("aside/"):
                path, name = key[len("aside/"):].rsplit("/", 1)
                self._aside.setdefault(path, {})[name] = np.array(array, copy=True)
            elif "/" in key:
                name, index = key.rsplit("/", 1)
                if paths:
                    self._aside.setdefault(paths[int(index)], {})[name] = np.array(array, copy=True)
                else:
                    self.slots.setdefault(name, {})[int(index)] = np.array(array, copy=True)

    def get_config(self) -> dict:
        """{type, learning_rate, constructor args}; unset clipping/decay arguments are left out (YAML-safe)."""
        lr = self._learning_rate  # a schedule by its config, a custom callable by its repr
        lr = (lr.get_config() if hasattr(lr, "get_config") else repr(lr)) if callable(lr) else lr
        config = {"type": self.name, "learning_rate": lr}
        for arg in inspect.signature(type(self).__init__).parameters:
            if arg not in ("self", "learning_rate", "kw") and arg not in _BASE_ARGS:
                config[arg] = getattr(self, arg)
        for arg in _BASE_ARGS:
            value = getattr(self, arg)
            if value is not None and (arg not in _BASE_DEFAULTS or value != _BASE_DEFAULTS[arg]):
                config[arg] = value
        return config

    def __repr__(self):
        return f"<{type(self).__name__} {self.get_config()}>"


def _compiled(value, grad):
    """The one-pass update rules (dlcli/kernels/optimizers.py) for a contiguous parameter and gradient of one dtype,
    or None: the NumPy twin in each update_step runs."""
    if grad.dtype != value.dtype or not (value.flags.c_contiguous and grad.flags.c_contiguous):
        return None
    return kernels.compiled("optimizers")


def _unused(value):
    """A slot the kernel never reads (empty, so the compiler's overlap checks still let its loop vectorise)."""
    return np.empty(0, value.dtype)


@OPTIMIZERS.register("sgd", "SGD")
class SGD(Optimizer):
    """w -= lr*g; with momentum m = momentum*m - lr*g, w += m (Nesterov: w += momentum*m - lr*g)."""

    def __init__(self, learning_rate=0.01, momentum: float = 0.0, nesterov: bool = False, **kw):
        super().__init__(learning_rate, **kw)
        if not 0 <= momentum <= 1:
            raise ConfigError(f"SGD momentum must be a float in [0, 1] (as in Keras); got {momentum}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def slot_count(self) -> int:
        return int(self.momentum > 0)

    def update_step(self, index, value, grad, lr):
        compiled = _compiled(value, grad)
        if compiled is not None:
            m = self.slot("momentum", index, value) if self.momentum else _unused(value)
            dt = value.dtype.type
            compiled.sgd(value.reshape(-1), grad.reshape(-1), m.reshape(-1), dt(lr), dt(self.momentum),
                         self.momentum > 0, self.nesterov)
            return
        step = np.multiply(grad, lr, out=self.scratch(value))
        if not self.momentum:
            value -= step
            return
        m = self.slot("momentum", index, value)
        m *= self.momentum
        m -= step
        if self.nesterov:
            value -= step
            value += np.multiply(m, self.momentum, out=step)
        else:
            value += m


@OPTIMIZERS.register("rmsprop", "RMSprop")
class RMSprop(Optimizer):
    """v = rho*v + (1-rho)*g^2; w -= lr*g / sqrt(v + eps) (centered: v - avg_g^2 + eps; momentum: plain)."""

    def __init__(self, learning_rate=0.001, rho: float = 0.9, momentum: float = 0.0, epsilon: float = 1e-7,
                 centered: bool = False, **kw):
        super().__init__(learning_rate, **kw)
        self.rho, self.momentum, self.epsilon, self.centered = float(rho), float(momentum), float(epsilon), \
            bool(centered)

    def slot_count(self) -> int:
        return 1 + (self.momentum > 0) + self.centered

    def update_step(self, index, value, grad, lr):
        compiled = _compiled(value, grad)
        if compiled is not None:
            v = self.slot("velocity", index, value)
            a = self.slot("average_gradient", index, value) if self.centered else _unused(value)
            m = self.slot("momentum", index, value) if self.momentum > 0 else _unused(value)
            dt = value.dtype.type
            compiled.rmsprop(value.reshape(-1), grad.reshape(-1), v.reshape(-1), a.reshape(-1), m.reshape(-1),
                             dt(lr), dt(self.rho), dt(1 - self.rho), dt(self.epsilon), dt(self.momentum),
                             self.centered, self.momentum > 0)
            return
        s = self.scratch(value)
        v = self.slot("velocity", index, value)
        v *= self.rho
        v += np.multiply(np.multiply(grad, grad, out=s), 1 - self.rho, out=s)
        if self.centered:
            a = self.slot("average_gradient", index, value)
            a *= self.rho
            a += np.multiply(grad, 1 - self.rho, out=s)
            np.subtract(v, np.multiply(a, a, out=s), out=s)
            s += self.epsilon
        else:
            np.add(v, self.epsilon, out=s)
        np.sqrt(s, out=s)
        np.divide(grad, s, out=s)
        s *= lr
        if self.momentum > 0:
            m = self.slot("momentum", index, value)
            m *= self.momentum
            m += s
            value -= m
        else:
            value -= s


@OPTIMIZERS.register("adam", "Adam")
class Adam(Optimizer):
    """m += (g-m)(1-b1); v += (g^2-v)(1-b2); w -= m * lr*sqrt(1-b2^t)/(1-b1^t) / (sqrt(v) + eps), t = step+1."""

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7,
                 amsgrad: bool = False, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon, self.amsgrad = float(beta_1), float(beta_2), float(epsilon), \
            bool(amsgrad)

    def slot_count(self) -> int:
        return 2 + self.amsgrad

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        alpha = lr * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        compiled = _compiled(value, grad)
        if compiled is not None:
            m, v = self.slot("momentum", index, value), self.slot("velocity", index, value)
            v_hat = self.slot("velocity_hat", index, value) if self.amsgrad else _unused(value)
            dt = value.dtype.type
            compiled.adam(value.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), v_hat.reshape(-1),
                          dt(alpha), dt(1 - self.beta_1), dt(1 - self.beta_2), dt(self.epsilon), self.amsgrad)
            return
        s = self.scratch(value)
        m = self.slot("momentum", index, value)
        v = self.slot("velocity", index, value)
        m += np.multiply(np.subtract(grad, m, out=s), 1 - self.beta_1, out=s)
        np.multiply(grad, grad, out=s)
        s -= v
        s *= 1 - self.beta_2
        v += s
        if self.amsgrad:
            v_hat = self.slot("velocity_hat", index, value)
            v = np.maximum(v_hat, v, out=v_hat)
        np.sqrt(v, out=s)
        s += self.epsilon
        np.divide(m, s, out=s)
        s *= alpha
        value -= s


@OPTIMIZERS.register("adamw", "AdamW")
class AdamW(Adam):
    """Adam with decoupled weight decay (Keras' AdamW: weight_decay=0.004, applied by the base class)."""

    def __init__(self, learning_rate=0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, **kw):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay=weight_decay, **kw)


@OPTIMIZERS.register("adagrad", "Adagrad")
class Adagrad(Optimizer):
    """acc += g^2 (acc starts at initial_accumulator_value); w -= lr*g / sqrt(acc + eps)."""

    def __init__(self, learning_rate=0.001, initial_accumulator_value: float = 0.1, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.initial_accumulator_value, self.epsilon = float(initial_accumulator_value), float(epsilon)

    def update_step(self, index, value, grad, lr):
        s = self.scratch(value)
        acc = self.slot("accumulator", index, value, self.initial_accumulator_value)
        acc += np.multiply(grad, grad, out=s)
        np.add(acc, self.epsilon, out=s)
        np.sqrt(s, out=s)
        np.divide(grad, s, out=s)
        s *= lr
        value -= s


@OPTIMIZERS.register("nadam", "Nadam")
class Nadam(Optimizer):
    """Adam with Nesterov momentum and Keras' momentum schedule u_t = b1 (1 - 0.96^t / 2): m and v as Adam's,
    w -= lr (u_{t+1} m / (1 - prod u_1..u_{t+1}) + (1 - u_t) g / (1 - prod u_1..u_t)) / (sqrt(v / (1 - b2^t)) + eps)."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self._u_products = [1.0]  # prod u_1..u_t for t = 0, 1, ...: a function of the step, so never saved

    def _u(self, t):
        return self.beta_1 * (1 - 0.5 * 0.96 ** t)

    def _u_product(self, t):
        while len(self._u_products) <= t:
            self._u_products.append(self._u_products[-1] * self._u(len(self._u_products)))
        return self._u_products[t]

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        u_t, u_next = self._u(t), self._u(t + 1)
        product, product_next = self._u_product(t), self._u_product(t) * u_next
        m = self.slot("momentum", index, value)
        v = self.slot("velocity", index, value)
        m += (grad - m) * (1 - self.beta_1)
        v += (grad * grad - v) * (1 - self.beta_2)
        m_hat = u_next * m / (1 - product_next) + (1 - u_t) * grad / (1 - product)
        value -= m_hat * lr / (np.sqrt(v / (1 - self.beta_2 ** t)) + self.epsilon)


@OPTIMIZERS.register("adamax", "Adamax")
class Adamax(Optimizer):
    """Adam with the infinity norm: m += (g - m)(1 - b1); u = max(b2 u, |g|); w -= lr m / ((1 - b1^t)(u + eps))."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        m = self.slot("m", index, value)
        u = self.slot("u", index, value)
        m += (grad - m) * (1 - self.beta_1)
        np.maximum(u * self.beta_2, np.abs(grad), out=u)
        value -= lr * m / ((1 - self.beta_1 ** t) * (u + self.epsilon))


@OPTIMIZERS.register("adadelta", "Adadelta")
class Adadelta(Optimizer):
    """a = rho a + (1 - rho) g^2; d = -sqrt(s + eps) g / sqrt(a + eps); s = rho s + (1 - rho) d^2; w += lr d."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, rho: float = 0.95, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.rho, self.epsilon = float(rho), float(epsilon)

    def update_step(self, index, value, grad, lr):
        a = self.slot("accumulated_grad", index, value)
        s = self.slot("accumulated_delta_var", index, value)
        a *= self.rho
        a += (1 - self.rho) * grad * grad
        delta = -np.sqrt(s + self.epsilon) * grad / np.sqrt(a + self.epsilon)
        s *= self.rho
        s += (1 - self.rho) * delta * delta
        value += lr * delta


@OPTIMIZERS.register("lion", "Lion")
class Lion(Optimizer):
    """w -= lr sign(b1 m + (1 - b1) g); then m = b2 m + (1 - b2) g (Chen et al. 2023, Keras' defaults 0.9/0.99)."""

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.99, **kw):
        super().__init__(learning_rate, **kw)
        if not 0 < beta_1 <= 1:
            raise ConfigError(f"Lion beta_1 must be in (0, 1] (as in Keras); got {beta_1}")
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)

    def update_step(self, index, value, grad, lr):
        m = self.slot("momentum", index, value)
        value -= lr * np.sign(m * self.beta_1 + grad * (1 - self.beta_1))
        m *= self.beta_2
        m += grad * (1 - self.beta_2)


@OPTIMIZERS.register("ftrl", "Ftrl")
class Ftrl(Optimizer):
    """Follow-the-regularized-leader (McMahan et al. 2013) in Keras' form: an accumulator of g^2 (starting at
    initial_accumulator_value) and a linear term; the weight is the closed-form minimiser with L1/L2 strengths."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, learning_rate_power: float = -0.5,
                 initial_accumulator_value: float = 0.1, l1_regularization_strength: float = 0.0,
                 l2_regularization_strength: float = 0.0, l2_shrinkage_regularization_strength: float = 0.0,
                 beta: float = 0.0, **kw):
        super().__init__(learning_rate, **kw)
        for what, value in (("learning_rate_power", -learning_rate_power), ("initial_accumulator_value",
                            initial_accumulator_value), ("l1_regularization_strength", l1_regularization_strength),
                            ("l2_regularization_strength", l2_regularization_strength),
                            ("l2_shrinkage_regularization_strength", l2_shrinkage_regularization_strength)):
            if value < 0:
                raise ConfigError(f"Ftrl {what} must be {'<= 0' if what == 'learning_rate_power' else '>= 0'} "
                                  f"(as in Keras); got {-value if what == 'learning_rate_power' else value}")
        self.learning_rate_power = float(learning_rate_power)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.l1_regularization_strength = float(l1_regularization_strength)
        self.l2_regularization_strength = float(l2_regularization_strength)
        self.l2_shrinkage_regularization_strength = float(l2_shrinkage_regularization_strength)
        self.beta = float(beta)

    def update_step(self, index, value, grad, lr):
        accum = self.slot("accumulator", index, value, self.initial_accumulator_value)
        linear = self.slot("linear", index, value)
        power = -self.learning_rate_power
        l2 = self.l2_regularization_strength + self.beta / (2.0 * lr)
        shrunk = grad + 2 * self.l2_shrinkage_regularization_strength * value
        new_accum = accum + grad * grad
        linear += shrunk - (new_accum ** power - accum ** power) / lr * value
        quadratic = new_accum ** power / lr + 2 * l2
        l1 = self.l1_regularization_strength
        value[...] = (np.clip(linear, -l1, l1) - linear) / quadratic
        accum[...] = new_accum


@OPTIMIZERS.register("lamb", "Lamb")
class Lamb(Optimizer):
    """Adam's bias-corrected step r = m_hat / (sqrt(v_hat) + eps), scaled per weight by the trust ratio
    |w| / |r| (You et al. 2019; 1 where either norm is 0): w -= lr |w| / |r| r."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        m = self.slot("momentum", index, value)
        v = self.slot("velocity", index, value)
        m += (grad - m) * (1 - self.beta_1)
        v += (grad * grad - v) * (1 - self.beta_2)
        update = (m / (1 - self.beta_1 ** t)) / (np.sqrt(v / (1 - self.beta_2 ** t)) + self.epsilon)
        w_norm, r_norm = _norm(value), _norm(update)
        ratio = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        value -= ratio * lr * update


@OPTIMIZERS.register("adafactor", "Adafactor")
class Adafactor(Optimizer):
    """Shazeer & Stern's factored second moments (keras.optimizers.Adafactor): for a weight of 2 or more axes, row
    and column means of g^2 + epsilon_1 decayed by beta_2_t = 1 - t^beta_2_decay, v = r / mean(r) (x) c; a vector
    keeps the full v. The step u = g / sqrt(v), clipped to RMS clip_threshold, is scaled by
    max(epsilon_2, RMS(w)) min(lr, 1/sqrt(t)) (with relative_step and a constant rate, lr itself is capped so)."""

    def __init__(self, learning_rate=0.001, beta_2_decay: float = -0.8, epsilon_1: float = 1e-30,
                 epsilon_2: float = 1e-3, clip_threshold: float = 1.0, relative_step: bool = True, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_2_decay, self.epsilon_1, self.epsilon_2 = float(beta_2_decay), float(epsilon_1), float(epsilon_2)
        self.clip_threshold, self.relative_step = float(clip_threshold), bool(relative_step)

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        if not callable(self._learning_rate) and self.relative_step:
            lr = min(lr, 1 / math.sqrt(t))
        alpha = max(self.epsilon_2, _rms(value)) * min(lr, 1 / math.sqrt(t))
        square = grad * grad + self.epsilon_1
        beta = 1 - t ** self.beta_2_decay
        if value.ndim >= 2:
            r = self.slot("row", index, value[..., 0])
            c = self.slot("column", index, value[..., 0, :])
            r *= beta
            r += (1 - beta) * square.mean(-1)
            c *= beta
            c += (1 - beta) * square.mean(-2)
            v = (r / r.mean(-1, keepdims=True))[..., None] * c[..., None, :]
        else:
            v = self.slot("velocity", index, value)
            v *= beta
            v += (1 - beta) * square
        u = grad / np.sqrt(v)
        value -= alpha * u / max(1.0, _rms(u) / self.clip_threshold)


@OPTIMIZERS.register("muon", "Muon")
class Muon(Optimizer):
    """Muon (keras.optimizers.Muon): a 2-D weight follows momentum m = momentum m + g (Nesterov: g + momentum m
    is used), orthogonalised by ns_steps Newton-Schulz iterations (muon_a, muon_b, muon_c) and scaled by
    sqrt(max(rows, cols)) rms_rate; every other weight (and embeddings, and paths matching exclude_layers) takes
    AdamW's step at learning_rate adam_lr_ratio, decayed by adam_weight_decay instead of weight_decay."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.001, adam_beta_1: float = 0.9, adam_beta_2: float = 0.999,
                 adam_weight_decay: float = 0.004, epsilon: float = 1e-7, weight_decay: float = 0.004,
                 exclude_layers: list[str] | None = None, exclude_embeddings: bool = True, muon_a: float = 3.4445,
                 muon_b: float = -4.775, muon_c: float = 2.0315, adam_lr_ratio: float = 1.0, momentum: float = 0.95,
                 ns_steps: int = 5, nesterov: bool = True, rms_rate: float | None = 0.2, **kw):
        super().__init__(learning_rate, weight_decay=weight_decay, **kw)
        self.adam_beta_1, self.adam_beta_2, self.adam_weight_decay = float(adam_beta_1), float(adam_beta_2), \
            adam_weight_decay
        self.epsilon, self.exclude_layers, self.exclude_embeddings = float(epsilon), list(exclude_layers or []), \
            bool(exclude_embeddings)
        self.muon_a, self.muon_b, self.muon_c = float(muon_a), float(muon_b), float(muon_c)
        self.adam_lr_ratio, self.momentum, self.ns_steps = float(adam_lr_ratio), float(momentum), int(ns_steps)
        self.nesterov, self.rms_rate = bool(nesterov), rms_rate
        self._uses_adamw: dict[int, bool] = {}

    def uses_adamw(self, param) -> bool:
        import re

        return (param.value.ndim != 2 or (self.exclude_embeddings and "embedding" in param.path.lower())
                or any(re.search(pattern, param.path) for pattern in self.exclude_layers))

    def decay_for(self, index, param):
        adamw = self._uses_adamw[index] = self.uses_adamw(param)
        return self.adam_weight_decay if adamw else self.weight_decay

    def update_step(self, index, value, grad, lr):
        m = self.slot("momentum", index, value)
        if self._uses_adamw[index]:
            t = self.iterations + 1
            alpha = lr * self.adam_lr_ratio * math.sqrt(1 - self.adam_beta_2 ** t) / (1 - self.adam_beta_1 ** t)
            v = self.slot("velocity", index, value)
            m += (grad - m) * (1 - self.adam_beta_1)
            v += (grad * grad - v) * (1 - self.adam_beta_2)
            value -= m * alpha / (np.sqrt(v) + self.epsilon)
            return
        m *= self.momentum
        m += grad
        update = self.orthogonalised(grad + self.momentum * m if self.nesterov else m) * lr
        if self.rms_rate is not None:
            update *= math.sqrt(max(value.shape)) * self.rms_rate
        value -= update

    def orthogonalised(self, x):
        """Newton-Schulz iterations towards the nearest semi-orthogonal matrix (Keras' zeropower_via_newtonschulz5)."""
        tall = x.shape[0] > x.shape[1]
        x = x.T if tall else x
        x = x / (np.linalg.norm(x) + 1e-7)
        for _ in range(self.ns_steps):
            a = x @ x.T
            x = self.muon_a * x + (self.muon_b * a + self.muon_c * a @ a) @ x
        return x.T if tall else x


@OPTIMIZERS.register("schedule_free_adamw", "ScheduleFreeAdamW")
class ScheduleFreeAdamW(Optimizer):
    """Defazio et al.'s schedule-free AdamW (keras.optimizers.ScheduleFreeAdamW): z (the 'momentum' slot, starting
    at w) takes Adam's bias-corrected second-moment step at lr (warmed up linearly over warmup_steps), x is the
    running average of z with weight 1/t, and the weights hold y = (1 - beta_1) z + beta_1 x."""

    slots_per_weight = 2

    def __init__(self, learning_rate=0.0025, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8,
                 warmup_steps: int = 0, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon, self.warmup_steps = float(beta_1), float(beta_2), float(epsilon), \
            int(warmup_steps)

    def build(self, params):
        starts = self.slots.setdefault("momentum", {})
        for index, param in enumerate(params):
            if index not in starts and param.grad is not None:
                starts[index] = param.value.copy()  # z starts at the weights before any decay, as Keras' build

    def update_step(self, index, value, grad, lr):
        t = self.iterations + 1
        if self.warmup_steps > 0:
            lr *= min(t / self.warmup_steps, 1.0)
        z = self.slots["momentum"][index]
        v = self.slot("velocity", index, value)
        x = (value - (1 - self.beta_1) * z) / self.beta_1
        v += (grad * grad - v) * (1 - self.beta_2)
        z -= lr * grad / (np.sqrt(v / (1 - self.beta_2 ** t)) + self.epsilon)
        x = (1 - 1 / t) * x + z / t
        value[...] = (1 - self.beta_1) * z + self.beta_1 * x


class OptimizerMap:
    """Keras' OptimizerMap: weight paths ('layer/weight', Param.path) to optimizers. A path given exactly wins;
    else the one pattern it fully matches as a regular expression (two matches are an error, as in Keras); else
    `default_optimizer`. Keys and optimizers are config mappings ({type: adam, ...}) or names."""

    def __init__(self, default_optimizer, optimizer_map: dict | None = None):
        if optimizer_map is not None and not isinstance(optimizer_map, dict):
            raise ConfigError(f"OptimizerMap's optimizer_map is a mapping of weight paths (or patterns) to "
                              f"optimizers; got {optimizer_map!r}")
        self.default_optimizer = _inner_optimizer(default_optimizer, "default_optimizer")
        self.optimizer_map = {str(k): _inner_optimizer(v, f"optimizer_map['{k}']")
                              for k, v in (optimizer_map or {}).items()}
        for pattern in self.optimizer_map:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"OptimizerMap key '{pattern}' is not a regular expression: {e}") from None

    def __call__(self, path: str) -> Optimizer:
        if path in self.optimizer_map:
            return self.optimizer_map[path]
        matching = [p for p in self.optimizer_map if re.fullmatch(p, path)]
        if len(matching) > 1:
            raise ConfigError(f"weight '{path}' matches several OptimizerMap keys ({', '.join(matching)}); Keras "
                              f"refuses that too: make the patterns exclusive")
        return self.optimizer_map[matching[0]] if matching else self.default_optimizer

    def get_config(self) -> dict:
        return {"default_optimizer": self.default_optimizer.get_config(),
                "optimizer_map": {k: v.get_config() for k, v in self.optimizer_map.items()}}


@OPTIMIZERS.register("MultiOptimizer")
class MultiOptimizer(Optimizer):
    """Keras' MultiOptimizer: each weight is updated by the optimizer its OptimizerMap gives it, each inner optimizer
    applying its own step (clipping, weight decay, schedule, iterations, EMA) to its own weights only, as Keras'
    apply delegates. There is no one learning rate: current_lr reports the default optimizer's, and setting it
    (ReduceLROnPlateau) is refused as Keras refuses it."""

    def __init__(self, optimizer_map: dict):
        super().__init__(0.0)
        if not isinstance(optimizer_map, dict):
            raise ConfigError(f"MultiOptimizer's optimizer_map is {{default_optimizer: ..., optimizer_map: "
                              f"{{'layer/weight or pattern': optimizer}}}}; got {optimizer_map!r}")
        args = {k: v for k, v in optimizer_map.items() if k != "type"}
        if optimizer_map.get("type", "OptimizerMap") != "OptimizerMap" or "default_optimizer" not in args \
                or set(args) - {"default_optimizer", "optimizer_map"}:
            raise ConfigError(f"MultiOptimizer's optimizer_map takes default_optimizer and optimizer_map (Keras' "
                              f"OptimizerMap); got {', '.join(map(str, optimizer_map)) or 'nothing'}")
        self.optimizer_map = OptimizerMap(**args)
        # Keras' order: the map's optimizers, then the default (one entry for an optimizer given twice)
        self.optimizers = list(dict.fromkeys([*self.optimizer_map.optimizer_map.values(),
                                              self.optimizer_map.default_optimizer]))
        self._groups = None

    def slot_count(self) -> int:
        return max(o.slot_count() for o in self.optimizers)

    @property
    def current_lr(self) -> float:
        return self.optimizer_map.default_optimizer.current_lr

    @property
    def learning_rate(self) -> float:
        return self.current_lr

    @learning_rate.setter
    def learning_rate(self, value):
        raise DlcliError("a MultiOptimizer has no one learning rate to set (Keras refuses it too); drop "
                         "ReduceLROnPlateau or give the inner optimizers schedules")

    def apply(self, params):
        if self.follow(params) or self._groups is None:
            self._groups = [self.optimizers.index(self.optimizer_map(p.path)) for p in params]
        for i, opt in enumerate(self.optimizers):
            group = [p for p, g in zip(params, self._groups) if g == i]
            if group:
                opt.apply(group)
        self.iterations += 1

    def _each(self, params):
        groups = [self.optimizers.index(self.optimizer_map(p.path)) for p in params]
        return [(opt, [p for p, g in zip(params, groups) if g == i]) for i, opt in enumerate(self.optimizers)]

    def ema_averages(self, params):
        averages = {}
        for opt, group in self._each(params):
            averages.update(zip(map(id, group), opt.ema_averages(group)))
        return [averages[id(p)] for p in params]

    def finalize_variable_values(self, params):
        for opt, group in self._each(params):
            opt.finalize_variable_values(group)

    def get_state(self) -> dict:
        state = {"iterations": np.array(self.iterations, np.int64)}
        for i, opt in enumerate(self.optimizers):
            state.update({f"optimizer_{i}.{k}": v for k, v in opt.get_state().items()})
        return state

    def set_state(self, state: dict):
        self.iterations = int(state["iterations"])
        for i, opt in enumerate(self.optimizers):
            prefix = f"optimizer_{i}."
            opt.set_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def get_config(self) -> dict:
        return {"type": self.name, "optimizer_map": {"type": "OptimizerMap", **self.optimizer_map.get_config()}}


def _inner_optimizer(spec, where) -> Optimizer:
    opt = get(spec)
    if isinstance(opt, MultiOptimizer):
        raise ConfigError(f"OptimizerMap {where}: a MultiOptimizer cannot hold another (as in Keras)")
    return opt


def get(identifier) -> Optimizer:
    """An optimizer from a name ('adam'), a {type: name, **args} mapping, or an Optimizer (returned as is)."""
    return identifier if isinstance(identifier, Optimizer) else OPTIMIZERS.create(identifier)


def _learning_rate_arg(value):
    if isinstance(value, dict):
        return schedules.get(value)
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"learning_rate must be a number or a schedule; got {value!r}")
    return float(value)


def _rms(x) -> float:
    return math.sqrt(float(np.mean(np.square(x))))


def _norm(g) -> float:
    flat = g.reshape(-1)
    return math.sqrt(float(np.dot(flat, flat)))


def _scaled(g, scale: float):
    return g if scale >= 1.0 else g * np.asarray(scale, g.dtype)
