"""Optimizers: the base class owns schedules, clipping, weight decay, lr multipliers and state; each subclass
implements only Keras 3's `update_step` rule, in place on the parameter array.

Update rules, defaults and clipping semantics follow `keras.optimizers` (Keras 3): clipping happens before the
decoupled weight decay `w -= w * weight_decay * lr`, which happens before the update; `iterations` counts applied
steps and a learning-rate schedule is called with it. State slots (velocity, momentum ...) are created lazily,
indexed by the parameter's position in the list given to `apply`.
"""
import inspect
import math

import numpy as np

from dlcli import kernels
from dlcli.errors import ConfigError, DlcliError
from dlcli.registry import Registry

OPTIMIZERS = Registry("optimizer")
_BASE_ARGS = ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay")


class Optimizer:
    name = ""

    def __init__(self, learning_rate=0.001, clipnorm=None, clipvalue=None, global_clipnorm=None,
                 weight_decay=None):
        if sum(x is not None for x in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ConfigError("only one of clipnorm, clipvalue and global_clipnorm can be set (as in Keras); got "
                              f"clipnorm={clipnorm}, clipvalue={clipvalue}, global_clipnorm={global_clipnorm}")
        self.clipnorm, self.clipvalue, self.global_clipnorm = clipnorm, clipvalue, global_clipnorm
        self.weight_decay = weight_decay
        self._learning_rate = _learning_rate_arg(learning_rate)
        self.iterations = 0
        self.slots: dict[str, dict[int, np.ndarray]] = {}
        self._buffers: dict = {}

    def slot_count(self) -> int:
        """Arrays of state kept per weight (momentum, Adam's two moments ...): inspect-shapes' memory estimate."""
        return 1

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
        grads = self._clipped([p.grad for p in params])
        decay = self.weight_decay
        for index, (param, grad) in enumerate(zip(params, grads)):
            if grad is None:
                continue
            param_lr = lr * param.layer.lr_mult if param.layer is not None else lr
            if decay:
                param.value *= 1 - decay * param_lr  # Keras: w - w * wd * lr
            self.update_step(index, param.value, grad, param_lr)
        self.iterations += 1

    def update_step(self, index: int, value: np.ndarray, grad: np.ndarray, lr: float):
        raise NotImplementedError

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
        """Flat named arrays for np.savez: iterations, the constant learning rate, and 'slot/index' arrays."""
        state = {"iterations": np.array(self.iterations, np.int64)}
        if not callable(self._learning_rate):
            state["learning_rate"] = np.array(self._learning_rate, np.float64)  # Keras saves it as a variable
        for name, per_param in self.slots.items():
            for index, array in per_param.items():
                state[f"{name}/{index}"] = array.copy()
        return state

    def set_state(self, state: dict):
        """Restore what `get_state` returned, exactly (training continues bit-identically)."""
        self.iterations = int(state["iterations"])
        if "learning_rate" in state and not callable(self._learning_rate):
            self._learning_rate = float(state["learning_rate"])
        self.slots = {}
        for key, array in state.items():
            if "/" in key:
                name, index = key.rsplit("/", 1)
                self.slots.setdefault(name, {})[int(index)] = np.array(array, copy=True)

    def get_config(self) -> dict:
        """{type, learning_rate, constructor args}; unset clipping/decay arguments are left out (YAML-safe)."""
        config = {"type": self.name, "learning_rate": _learning_rate_config(self._learning_rate)}
        for arg in inspect.signature(type(self).__init__).parameters:
            if arg not in ("self", "learning_rate", "kw") and arg not in _BASE_ARGS:
                config[arg] = getattr(self, arg)
        for arg in _BASE_ARGS:
            if getattr(self, arg) is not None:
                config[arg] = getattr(self, arg)
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

    name = "sgd"

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

    name = "rmsprop"

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

    name = "adam"

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

    name = "adamw"

    def __init__(self, learning_rate=0.001, weight_decay: float = 0.004, beta_1: float = 0.9,
                 beta_2: float = 0.999, epsilon: float = 1e-7, amsgrad: bool = False, **kw):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad, weight_decay=weight_decay, **kw)


@OPTIMIZERS.register("adagrad", "Adagrad")
class Adagrad(Optimizer):
    """acc += g^2 (acc starts at initial_accumulator_value); w -= lr*g / sqrt(acc + eps)."""

    name = "adagrad"

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

    name = "nadam"

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self._u_products = [1.0]  # prod u_1..u_t for t = 0, 1, ...: a function of the step, so never saved

    def slot_count(self) -> int:
        return 2

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

    name = "adamax"

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def slot_count(self) -> int:
        return 2

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

    name = "adadelta"

    def __init__(self, learning_rate=0.001, rho: float = 0.95, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.rho, self.epsilon = float(rho), float(epsilon)

    def slot_count(self) -> int:
        return 2

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

    name = "lion"

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

    name = "ftrl"

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

    def slot_count(self) -> int:
        return 2

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

    name = "lamb"

    def __init__(self, learning_rate=0.001, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7, **kw):
        super().__init__(learning_rate, **kw)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)

    def slot_count(self) -> int:
        return 2

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


def get(identifier) -> Optimizer:
    """An optimizer from a name ('adam'), a {type: name, **args} mapping, or an Optimizer (returned as is)."""
    return identifier if isinstance(identifier, Optimizer) else OPTIMIZERS.create(identifier)


def _learning_rate_arg(value):
    if isinstance(value, dict):
        try:
            from dlcli import schedules
        except ImportError as e:
            raise ConfigError(f"learning-rate schedules are not available ({e}); give learning_rate as a number")
        return schedules.get(value)
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"learning_rate must be a number or a schedule; got {value!r}")
    return float(value)


def _learning_rate_config(value):
    if not callable(value):
        return value
    try:
        from dlcli import schedules

        return schedules.serialize(value)
    except (ImportError, AttributeError):
        return value.get_config() if hasattr(value, "get_config") else repr(value)


def _norm(g) -> float:
    flat = g.reshape(-1)
    return math.sqrt(float(np.dot(flat, flat)))


def _scaled(g, scale: float):
    return g if scale >= 1.0 else g * np.asarray(scale, g.dtype)
