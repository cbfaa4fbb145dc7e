"""The SJ-side quantised CUBA neuron: lava-dl's fixed-point CUBA spikes, trainable with SJ surrogates.

`CubaNeuron` gives, bit for bit, the spikes of
``lava.lib.dl.slayer.neuron.cuba.Neuron(threshold, current_decay, voltage_decay)``
(default scale 1 << 6, shared parameters, no persistent state) on its CPU path, and
back-propagates through the user's SpikingJelly surrogate function and ``detach_reset``.

What slayer 0.6.0 computes (``neuron/cuba.py``, ``neuron/base.py``,
``neuron/dynamics/leaky_integrator.py::_li_dynamics_fwd``, ``utils/quantize.py``,
``spike/spike.py``), all reproduced here:

- scales: ``w_scale = 64``, ``s_scale = p_scale = 4096``; both leaky-integrator stages run
  with ``w_scale = s_scale = 4096`` in int64.
- threshold: ``int(threshold * 64) / 64`` (truncation toward zero); ``vThMant = int(threshold * 64)``.
- decays: ``torch.FloatTensor([4096 * decay])`` (float32), clamped to [0, 4096], then
  ``torch.round`` (half to even); ``iDecay``/``vDecay`` are those integers.
- input: ``(4096 * x[..., t]).to(int64)``, i.e. truncation toward zero.
- each stage: ``y = right_shift_to_zero(y * (4096 - decay), 12) + input`` where
  ``right_shift_to_zero`` truncates toward zero.
- the current stage's output is stored as ``int64 / 4096`` in the default dtype (float32),
  so the voltage stage sees the current rounded to float32 (only matters above 2**24,
  i.e. |current| >= 4096); the current state itself keeps all its bits.
- spike and reset: ``v_int >= (threshold + 0.01 / 4096) * 4096``; an int64 tensor compared
  with a Python float is compared in float32, so both sides are rounded to float32. For
  thresholds below 64 this is Loihi's strict ``v_int > vThMant * 64``. From 64 up the
  0.01 is lost to float32 rounding and slayer fires at ties too (Loihi does not); this
  module follows slayer.
- all of the above for float32 input with torch's default dtype float32, slayer's own
  setting. (For float64 input slayer's spike output is tested in float64 but its reset
  in float32; the two can disagree only at ties with thresholds >= 64.)
- hard reset of the voltage to 0 after a spike; every call starts from u = v = 0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fxlava.target import DECAY_SCALE, NEURON_SCALE, STATE_SCALE, V_TH_MANT_MAX

__all__ = ["CubaNeuron"]

#: Neuron (state) scale of slayer's CUBA neuron: threshold mantissa = threshold * 64.
W_SCALE = NEURON_SCALE
#: Fixed-point scale of the states and of the 12-bit decays (4096 == 1.0).
S_SCALE = STATE_SCALE
P_SCALE = DECAY_SCALE
#: slayer's threshold_eps, ``0.01 / s_scale``: turns its '>=' into Loihi's '>'.
THRESHOLD_EPS = 0.01 / S_SCALE


def _quantised_decay(decay: float) -> int:
    """slayer's 12-bit decay: float32(4096 * decay), clamped to [0, 4096], rounded half to even."""
    value = torch.tensor([P_SCALE * float(decay)], dtype=torch.float32)
    value.clamp_(0, P_SCALE)
    return int(torch.round(value).item())


def _firing_level(v_th_mant: int, dtype: torch.dtype) -> float:
    """The half-integer ``c`` such that slayer fires exactly when the integer voltage is >= c.

    slayer compares ``dtype(v_int) >= dtype((v_th_mant / 64 + 0.01 / 4096) * 4096)`` with
    ``dtype`` torch's default dtype (float32); dtype(v_int) is an integer, so this holds iff
    it is >= the ceiling of the right side.
    """
    threshold = v_th_mant / W_SCALE + THRESHOLD_EPS  # slayer: self.threshold + self.threshold_eps
    compared = torch.tensor(threshold * S_SCALE, dtype=dtype).item()
    return math.ceil(compared) - 0.5


class CubaNeuron(torch.nn.Module):
    """Quantised CUBA neuron matching slayer's ``cuba.Neuron`` spikes, trained with an SJ surrogate.

    Input: synaptic current ``[N, *, T]`` (lava-dl layout); output: spikes, same shape and dtype.
    Every call starts from rest (u = v = 0), like slayer's neuron without persistent state.

    ``surrogate_function`` (default: a new ``surrogate.Sigmoid()``) is called as SJ neurons
    call it, on ``v - threshold`` in real units; it must be elementwise with a Heaviside
    forward (``x >= 0``), as every ``SurrogateFunctionBase`` in spiking mode is. It is fed
    ``(v_int - c) / 4096`` with ``c`` half an integer step above the threshold, so that its
    ``>=`` reproduces Loihi's strict ``>``. It is called once per time step in the forward
    pass (no grad) and once on all steps in the backward pass for its derivative; parameters
    of a learnable surrogate get no gradient. ``detach_reset`` is SJ's: the spike in the hard
    reset ``v (1 - s)`` is detached. Gradients treat every truncation as identity.

    The constructor's arguments are kept in ``requested``; ``threshold``, ``current_decay``
    and ``voltage_decay`` are the quantised values slayer uses.

    ``coscale`` (default 1) says that this neuron is the model's neuron with its input, voltage
    and threshold multiplied by that factor (``fxlava.passes.coscale_layers``). It changes no
    spike; the surrogate is fed ``(v - threshold) / coscale``, the model's own units, so the
    gradients are the model's.
    """

    def __init__(
        self,
        threshold: float,
        current_decay: float,
        voltage_decay: float,
        surrogate_function: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        detach_reset: bool = False,
        coscale: float = 1.0,
    ):
        super().__init__()
        if surrogate_function is None:
            from spikingjelly.activation_based import surrogate

            surrogate_function = surrogate.Sigmoid()
        if not callable(surrogate_function):
            raise TypeError(
                f"surrogate_function must be callable (an SJ surrogate such as "
                f"surrogate.Sigmoid()); got {type(surrogate_function).__name__}."
            )
        for name, decay in (("current_decay", current_decay), ("voltage_decay", voltage_decay)):
            if not 0.0 <= float(decay) <= 1.0:
                raise ValueError(
                    f"{name}={decay} is outside [0, 1]; slayer would silently clamp it. "
                    f"Pass a fraction of decay per step (LIF: 1/tau)."
                )
        v_th_mant = int(float(threshold) * W_SCALE)  # slayer base.Neuron: int() truncates
        if not 0 <= v_th_mant <= V_TH_MANT_MAX:
            raise ValueError(
                f"threshold={threshold} gives vThMant={v_th_mant}, outside Loihi's 17-bit "
                f"range [0, {V_TH_MANT_MAX}] (threshold in [0, {V_TH_MANT_MAX / W_SCALE}])."
            )
        self.requested = {
            "threshold": float(threshold),
            "current_decay": float(current_decay),
            "voltage_decay": float(voltage_decay),
        }
        self._v_th_mant = v_th_mant
        self._i_decay = _quantised_decay(current_decay)
        self._v_decay = _quantised_decay(voltage_decay)
        if not float(coscale) > 0.0:
            raise ValueError(f"coscale={coscale}: a co-scaling factor must be positive")
        self.surrogate_function = surrogate_function
        self.detach_reset = bool(detach_reset)
        # The model's neuron with its input, voltage and threshold all multiplied by ``coscale``
        # (see fxlava.passes.coscale_layers): the surrogate still sees v - threshold in the
        # model's units, so the network trains as the model would.
        self.coscale = float(coscale)

    # Loihi / slayer parameters --------------------------------------------------------

    @property
    def v_th_mant(self) -> int:
        """Threshold mantissa (vThMant), ``int(threshold * 64)``."""
        return self._v_th_mant

    @property
    def i_decay(self) -> int:
        """12-bit current decay (iDecay), 4096 == 1.0."""
        return self._i_decay

    @property
    def v_decay(self) -> int:
        """12-bit voltage decay (vDecay), 4096 == 1.0."""
        return self._v_decay

    @property
    def firing_voltage(self) -> int:
        """The least voltage, in units of 1/4096, at which the neuron fires (Loihi: v > 64 vThMant)."""
        return int(_firing_level(self.v_th_mant, torch.get_default_dtype()) + 0.5)

    @property
    def ref_delay(self) -> int:
        """Refractory delay; slayer's CUBA neuron always reports 1."""
        return 1

    @property
    def device_params(self) -> dict:
        """Loihi device parameters, as slayer's ``cuba.Neuron.device_params``."""
        return {
            "type": "CUBA",
            "iDecay": self.i_decay,
            "vDecay": self.v_decay,
            "vThMant": self.v_th_mant,
            "refDelay": self.ref_delay,
            "gradedSpike": False,
        }

    @property
    def threshold(self) -> float:
        """Quantised threshold, slayer's ``Neuron.threshold`` (``vThMant / 64``)."""
        return self.v_th_mant / W_SCALE

    @property
    def current_decay(self) -> float:
        """Quantised current decay, ``iDecay / 4096``."""
        return self.i_decay / P_SCALE

    @property
    def voltage_decay(self) -> float:
        """Quantised voltage decay, ``vDecay / 4096``."""
        return self.v_decay / P_SCALE

    def neuron_params(self) -> dict:
        """``neuron_params`` for ``slayer.block.cuba.*`` / ``slayer.neuron.cuba.Neuron``; round-trips exactly."""
        return {
            "threshold": self.threshold,
            "current_decay": self.current_decay,
            "voltage_decay": self.voltage_decay,
        }

    def to_slayer(self, **kwargs):
        """Build the equal ``slayer.neuron.cuba.Neuron``; ``kwargs`` go to its constructor."""
        from lava.lib.dl import slayer

        return slayer.neuron.cuba.Neuron(**self.neuron_params(), **kwargs)

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold} (vThMant={self.v_th_mant}), "
            f"current_decay={self.current_decay} (iDecay={self.i_decay}), "
            f"voltage_decay={self.voltage_decay} (vDecay={self.v_decay}), "
            f"detach_reset={self.detach_reset}" + (f", coscale={self.coscale:g}" if self.coscale != 1.0 else "")
        )

    # dynamics -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spikes for synaptic current ``x`` of shape ``[N, *, T]``, starting from rest."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"CubaNeuron expects a floating-point tensor [N, *, T]; got {x!r:.80}.")
        if x.dim() < 2:
            raise ValueError(f"CubaNeuron expects input [N, *, T]; got shape {tuple(x.shape)}.")
        if getattr(self.surrogate_function, "spiking", True) is False:
            raise ValueError(
                "surrogate_function is in non-spiking mode (spiking=False): its forward is not a "
                "Heaviside step, so the spikes could not match Loihi. Call set_spiking_mode(True)."
            )
        return _CubaDynamics.apply(x, self)


def _decay_(state: torch.Tensor, keep: float, scratch: torch.Tensor) -> torch.Tensor:
    """In place, slayer's ``right_shift_to_zero(state * (4096 - decay), 12)`` on exact float64 integers."""
    scratch.copy_(state.mul_(keep))  # the cast to int64 truncates toward zero, like the shift
    return state.copy_(scratch)


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the surrogate's input and of the backward pass: x's, at least float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _exact_below(*dtypes: torch.dtype) -> float:
    """Magnitude below which every integer is exactly representable in all ``dtypes``."""
    return min(2.0 / torch.finfo(d).eps for d in dtypes)  # 2 ** (mantissa bits + 1)


class _CubaDynamics(torch.autograd.Function):
    """slayer's fixed-point CUBA forward; backward with straight-through truncations and the SJ surrogate.

    Forward (float64, every value an exact integer in units of 1/4096, time first):
        u[t] = trunc(keep_u * u[t-1]) + trunc(4096 x[t])      keep = (4096 - decay) / 4096
        v[t] = trunc(keep_v * v[t-1]) + u[t]                   (u as slayer stores it)
        s[t] = surrogate((v[t] - c) / 4096)                    c: half-integer firing level
        v[t] = v[t] (1 - s[t])
    Backward: the same recurrences with every truncation and rounding as identity, so
    du[t]/du[t-1] = keep_u, dv[t]/dv[t-1] = keep_v, dv[t]/du[t] = du[t]/dx[t] = 1, the spike's
    derivative taken from the user's surrogate (called on the saved levels), and the reset's
    dependence on the spike kept or dropped as SJ's ``detach_reset`` does. The time loop is
    written out by hand rather than left to autograd: it is several times faster.
    """

    @staticmethod
    def forward(ctx, x, neuron):
        f64 = torch.float64
        keep_u = (P_SCALE - neuron.i_decay) / P_SCALE  # exact dyadic fractions
        keep_v = (P_SCALE - neuron.v_decay) / P_SCALE
        num_steps = x.shape[-1]
        # slayer: (4096 * x).to(int64), i.e. truncation toward zero; 4096 * x is exact in x's
        # dtype, and so is its trunc. Time first and contiguous: every step is one slab.
        x_int = torch.empty((num_steps, *x.shape[:-1]), dtype=x.dtype, device=x.device)
        spikes = torch.empty_like(x_int)
        x_int.copy_(x.movedim(-1, 0)).mul_(S_SCALE)
        # trunc as copysign(floor(|x|), x): exact, and many times faster than torch.trunc on CPU.
        torch.copysign(torch.abs(x_int, out=spikes).floor_(), x_int, out=x_int)

        # slayer keeps both states in int64 but stores the current stage's output as
        # int64 / 4096, i.e. in torch's default dtype (float32) inside a tensor of x's dtype,
        # and the voltage stage reads that rounded value. Below 2**24 the rounding is the
        # identity, and a bound on |u| (truncation only shrinks it) usually skips it.
        # slayer also compares the voltage with its threshold in the default dtype; that
        # rounding of v cannot change the outcome: it is the identity below 2**24, and a
        # 17-bit vThMant keeps the threshold below 2**23.
        store = torch.get_default_dtype()
        firing_level = _firing_level(neuron.v_th_mant, store)
        bound_u = max(abs(m) for m in torch.aminmax(x_int)).item() if x_int.numel() else 0.0
        bound_u *= num_steps if keep_u == 1.0 else min(num_steps, 1.0 / (1.0 - keep_u))
        round_current = bound_u >= _exact_below(store, x.dtype)

        # The surrogate's input (v - c) / 4096, real units, rounded to the output dtype after
        # the exact subtraction: its sign, all the Heaviside sees, is exact (|v - c| >= 1/2).
        levels = torch.empty(x_int.shape, dtype=_grad_dtype(x.dtype), device=x.device)
        # In-place updates of preallocated states: large fresh tensors cost page faults.
        u = torch.zeros(x_int.shape[1:], dtype=f64, device=x.device)
        v = torch.zeros_like(u)
        scratch = torch.empty(u.shape, dtype=torch.int64, device=x.device)
        surrogate_function = neuron.surrogate_function
        for t in range(num_steps):
            if keep_u == 0.0:
                u = x_int[t]
            elif keep_u == 1.0:
                u.add_(x_int[t])
            else:
                _decay_(u, keep_u, scratch).add_(x_int[t])
            current = u.to(store).to(x.dtype).to(f64) if round_current else u
            if keep_v == 0.0:
                v.copy_(current)
            elif keep_v == 1.0:
                v.add_(current)
            else:
                _decay_(v, keep_v, scratch).add_(current)
            # firing_level is the half-integer that turns the surrogate's Heaviside (x >= 0)
            # into slayer's test, i.e. Loihi's strict v > vThMant * 64 for thresholds below 64.
            level = torch.sub(v, firing_level, out=levels[t]).mul_(1.0 / (S_SCALE * neuron.coscale))
            spikes[t].copy_(surrogate_function(level))
            v.addcmul_(v, spikes[t], value=-1.0)  # hard reset to 0: v - v s, exact for 0/1 spikes
        ctx.save_for_backward(levels, spikes)
        ctx.neuron = neuron
        ctx.keep = (keep_u, keep_v)
        ctx.firing_level = firing_level
        return spikes.movedim(0, -1).contiguous()  # back to [N, *, T]

    @staticmethod
    def backward(ctx, grad_spikes):
        levels, spikes = ctx.saved_tensors
        neuron = ctx.neuron
        keep_u, keep_v = ctx.keep
        with torch.enable_grad():
            level = levels.detach().requires_grad_(True)
            out = neuron.surrogate_function(level)
            try:
                (surrogate_grad,) = torch.autograd.grad(out, level, torch.ones_like(out))
            except RuntimeError as err:
                raise RuntimeError(
                    f"CubaNeuron could not differentiate its surrogate_function "
                    f"{neuron.surrogate_function!r}: it must be differentiable with respect to "
                    f"v - threshold (an SJ surrogate such as surrogate.Sigmoid())."
                ) from err
        surrogate_grad = surrogate_grad.expand_as(levels).contiguous()  # updated in place below
        # dv_after/dv_before of the reset v (1 - s): (1 - s) - v ds/dv unless the spike is
        # detached; with k = coscale, v = k level + c / 4096 and ds/dv = surrogate' / k.
        k = neuron.coscale
        carry = 1.0 - spikes.to(levels.dtype)
        if not neuron.detach_reset:
            carry.addcmul_(surrogate_grad, levels, value=-1.0)
            carry.add_(surrogate_grad, alpha=-ctx.firing_level / (S_SCALE * k))
        carry.mul_(keep_v)
        # grad wrt the voltage before reset, from the output and from the future (reverse scan).
        grad = surrogate_grad.mul_(grad_spikes.movedim(-1, 0))
        if k != 1.0:
            grad.mul_(1.0 / k)
        num_steps = grad.shape[0]
        if keep_v != 0.0:
            for t in range(num_steps - 2, -1, -1):
                grad[t].addcmul_(carry[t], grad[t + 1])
        # grad wrt the current: v[t] takes u[t] with weight 1, u[t + 1] takes u[t] with keep_u.
        if keep_u != 0.0:
            for t in range(num_steps - 2, -1, -1):
                grad[t].add_(grad[t + 1], alpha=keep_u)
        return grad.movedim(0, -1).to(grad_spikes.dtype), None
