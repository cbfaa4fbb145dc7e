"""substitute_neurons: SpikingJelly neurons -> fxlava's quantised CUBA neuron (Loihi's neuron).

Loihi's CUBA neuron with a hard reset to 0 is, in real arithmetic,

    u[t] = (1 - current_decay) u[t-1] + x[t]
    v[t] = (1 - voltage_decay) v[t-1] + u[t];   spike and v[t] = 0 when v[t] > threshold

and each SpikingJelly neuron below, with ``v_reset=0.0``, is that neuron:

| SpikingJelly neuron                                | current_decay | voltage_decay | input         |
|----------------------------------------------------|---------------|---------------|---------------|
| IFNode, SimpleIFNode                               | 1             | 0             | x             |
| LIFNode, SimpleLIFNode (decay_input=False)         | 1             | 1/tau         | x             |
| LIFNode, SimpleLIFNode (decay_input=True)          | 1             | 1/tau         | x / tau       |
| ParametricLIFNode (decay_input=False / True)       | 1             | sigmoid(w)    | x, x sigmoid(w) |
| CUBALIFNode(c_decay, v_decay)                      | 1 - c_decay   | 1 - v_decay   | x             |
| lava_exchange.CubaLIFNode                          | its own 12-bit decays, bit for bit (below)    |

An input scale (``decay_input=True``) goes into the weights of the conv or linear layer that
feeds the neuron. When nothing of that kind feeds it alone (the sum pool that
``avgpool_to_sumpool`` makes, whose weights are fixed ones; a synapse module called from
several places), or with ``fxlava.compile(..., decay_input_scale="threshold")``, the threshold
is divided by the scale instead: with reset to 0 the neuron is linear in its input, voltage and
threshold together, so it is the same neuron. Scaled weights keep their range ([-4 tau, 4 tau)
in the trained weights) and lose resolution (steps of tau * 2/64); a scaled threshold keeps the
weights' resolution and range [-4, 4).

A ``ParametricLIFNode``'s tau and a learnable ``CubaLIFNode``'s decays are frozen at their
trained values (recorded, and logged at INFO). ``lava_exchange.CubaLIFNode`` is already Loihi's
fixed-point neuron: its rounded decays ``round(current_decay) / 4096`` are taken as they are,
and it is compiled only when it fires at the same integer voltage as Loihi's threshold
``int(64 v_threshold) / 64`` (true when v_threshold is a multiple of 1/64), with
``scale=1 << 6`` (netx's) and no ``norm``. SpikingJelly keeps its states in float32: bit for
bit while they stay below 4096 in magnitude (2**24 units of 1/4096).

The user's surrogate function and ``detach_reset`` are kept, so the compiled graph trains as
the user's model did. Every other neuron and every other stateful module is refused, all at
once, with the reason and a fix.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

import torch
import torch.fx as fx

from fxlava.errors import Issue, issue_at
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_of, path_of, set_module
from fxlava.target import NEURON_SCALE, SYNAPSES, is_stateful
from fxlava.subclasses import changed_methods, computes_as

PASS = "substitute_neurons"
OPTION = "decay_input_scale"  # fxlava.compile(..., decay_input_scale="weights" | "threshold")

log = logging.getLogger(__name__)

#: Neuron (state) scale of Loihi's CUBA neuron in netx: threshold mantissa = 64 * threshold (fxlava.target).
LOIHI_SCALE = NEURON_SCALE

_FIX_NEURON = ("use neuron.IFNode, LIFNode, ParametricLIFNode, CUBALIFNode or lava_exchange.CubaLIFNode "
               "with v_reset=0.0 and retrain")

# SpikingJelly neurons (matched by class name along the MRO) and why Loihi's CUBA neuron is not them
_NO_CUBA_EQUIVALENT = {
    "QIFNode": "quadratic integrate-and-fire: its charge is quadratic in the voltage",
    "EIFNode": "exponential integrate-and-fire: its charge is exponential in the voltage",
    "IzhikevichNode": "an adaptation current and a quadratic voltage term",
    "AdaptBaseNode": "an adaptation current driven by its own spikes",
    "RAFNode": "resonate-and-fire: a two-dimensional oscillator, not an integrator",
    "KLIFNode": "a learnable scale and a ReLU on the voltage before firing",
    "GatedLIFNode": "learnable gates that mix integration, leak and reset modes",
    "ComplementaryLIFNode": "a second, complementary membrane potential",
    "LIAFNode": "it outputs an analog activation, not spikes",
    "ILIFNode": "integer-valued firing (several spikes per step) with a soft reset",
    "MPBNBaseNode": "a BatchNorm on the membrane potential",
    "PSN": "parallel spiking neuron: a learned weighted sum over time steps, not a leaky integrator",
    "MaskedPSN": "parallel spiking neuron: a learned weighted sum over time steps, not a leaky integrator",
    "SlidingPSN": "parallel spiking neuron: a learned weighted sum over time steps, not a leaky integrator",
    "TernaryIFNode": "signed -1/0/+1 spikes; Loihi's spikes are 0/1",
    "TernaryLIFNode": "signed -1/0/+1 spikes; Loihi's spikes are 0/1",
    "STBIFNode": "signed, scaled outputs, not 0/1 spikes",
    "HalfThresholdIFNode": "soft reset and an initial voltage of v_threshold / 2",
    "ActivationAwareIFNode": "a membrane offset and per-channel thresholds (ANN-to-SNN conversion)",
    "DSRIFNode": "differentiation-on-spike-representation neuron built for a fixed number of steps",
    "DSRLIFNode": "differentiation-on-spike-representation neuron built for a fixed number of steps",
    "NonSpikingBaseNode": "it outputs its membrane potential, not spikes",
    "NoisyNonSpikingBaseNode": "it outputs its membrane potential, not spikes",
    "NoisyBaseNode": "random noise in its dynamics",
    "ILCBaseNode": "its spikes pass through a learnable Conv1d to the next layer",
    "FewSpikeNode": "few-spike coding: a coding table over several steps",
    "FlexSN": "user-defined dynamics",
}

def _recurrent(name: str, state: str) -> tuple[str, str]:
    return (f"a recurrent container ({name}, a spiking recurrent layer): {state} feed{'' if ' and ' in state else 's'} back into the next time "
            f"step through weights, and netx runs a straight feed-forward chain of layers (fxlava does not lower "
            f"recurrence)", "run the recurrent layer off Loihi, or replace it by feed-forward layers and retrain")


# stateful SpikingJelly modules that are not neurons
_STATEFUL = {
    "ElementWiseRecurrentContainer": (
        "a recurrent container: its output feeds back into its input, and netx runs a straight "
        "feed-forward chain of layers (fxlava does not lower recurrence)",
        "remove the recurrence (use the wrapped neuron directly), or run this part of the network off Loihi"),
    "LinearRecurrentContainer": (
        "a recurrent container: its output feeds back into its input, and netx runs a straight "
        "feed-forward chain of layers (fxlava does not lower recurrence)",
        "remove the recurrence (a Linear layer followed by the wrapped neuron), or run this part of the "
        "network off Loihi"),
    "SpikingLSTM": _recurrent("SpikingLSTM", "its hidden state h and cell state c"),
    "SpikingLSTMCell": _recurrent("SpikingLSTMCell", "its hidden state h and cell state c"),
    "SpikingGRU": _recurrent("SpikingGRU", "its hidden state h"),
    "SpikingGRUCell": _recurrent("SpikingGRUCell", "its hidden state h"),
    "SpikingVanillaRNN": _recurrent("SpikingVanillaRNN", "its hidden state h"),
    "SpikingVanillaRNNCell": _recurrent("SpikingVanillaRNNCell", "its hidden state h"),
    "SynapseFilter": (
        "a synaptic current filter, which fxlava does not merge into the next neuron",
        "remove it, or use neuron.CUBALIFNode or lava_exchange.CubaLIFNode, whose current decay filters the input"),
    "Delay": ("a delay line, which fxlava does not lower", "remove it from the network that goes to Loihi"),
}


@dataclass
class CubaMapping:
    """The CUBA neuron equal to a SpikingJelly neuron, fed its input times ``input_scale``."""

    threshold: float
    current_decay: float
    voltage_decay: float
    input_scale: Fraction = Fraction(1)  # exact, so that threshold / input_scale rounds once
    frozen: str = ""  # trained parameters the compiled neuron keeps fixed


@dataclass
class Refusal:
    reason: str
    fix: str


def _value(x) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def _sj():
    from spikingjelly.activation_based import base, lava_exchange, neuron

    return base, lava_exchange, neuron


def _is_stateful(m) -> bool:
    """A SpikingJelly neuron or other stateful module that this pass must substitute or refuse."""
    from fxlava.target import role_of

    if isinstance(m, CubaNeuron) or role_of(m) == "identity":  # SpikingJelly's Dropout: remove_identities
        return False
    if type(m).__module__.startswith("spikingjelly.activation_based.layer.bn"):  # normalisations: fold_batchnorm
        return False
    return is_stateful(m)


def _reset_refusal(m):
    v_reset = getattr(m, "v_reset", 0.0)
    if v_reset is None:
        return Refusal("a soft-reset neuron (v_reset=None): Loihi resets the voltage to 0",
                       "construct the neuron with v_reset=0.0 and retrain")
    if _value(v_reset) != 0.0:
        return Refusal(f"a neuron with v_reset={_value(v_reset)}: Loihi resets the voltage to 0",
                       "construct the neuron with v_reset=0.0 and retrain")
    return None


def _decay(name, value, lo=0.0, hi=1.0):
    if not lo <= value <= hi:
        return Refusal(f"a neuron with {name}={value:g} outside [{lo:g}, {hi:g}]: no Loihi decay equals it",
                       f"keep {name} in [{lo:g}, {hi:g}]")
    return None


def _cuba_lif_node(m) -> Union[CubaMapping, Refusal]:
    """lava_exchange.CubaLIFNode: already Loihi's fixed-point neuron; take its integers as they are."""
    name = type(m).__name__
    if int(m.scale) != LOIHI_SCALE:
        return Refusal(f"a CubaLIFNode with scale={m.scale}: netx's CUBA blocks use scale {LOIHI_SCALE}",
                       f"construct it with scale=1 << 6 ({LOIHI_SCALE}) and retrain")
    if m.norm is not None:
        return Refusal(f"a CubaLIFNode with norm={type(m.norm).__name__} (a weight-scale BatchNorm on its "
                       f"current), which netx does not export", "construct it with norm=None")
    decays = {}
    for attr in ("current_decay", "voltage_decay"):
        d = getattr(m, attr).detach()
        if d.numel() != 1:
            return Refusal(f"a CubaLIFNode with one {attr} per neuron (shape {tuple(d.shape)}): Loihi's CUBA "
                           f"layers share one decay", f"construct it with a scalar {attr}")
        if m.requires_grad:  # its forward clamps learnable decays
            d = d.clamp(0.0, float(m.p_scale))
        integer = torch.round(d.float()).item()  # as its forward: step_quantize(decay), 4096 == 1.0
        bad = _decay(f"{attr} (in 1/{m.p_scale})", integer, 0.0, float(m.p_scale))
        if bad:
            return bad
        decays[attr] = integer / m.p_scale
    threshold = _value(m.v_threshold)
    try:
        cuba = CubaNeuron(threshold, decays["current_decay"], decays["voltage_decay"])
    except ValueError as exc:
        return Refusal(f"a {name} whose threshold Loihi cannot represent ({exc})", "use a threshold in (0, 2048)")
    # it fires when the float32 voltage v_int / s_scale reaches float32(v_threshold + v_threshold_eps)
    compared = torch.tensor(threshold + _value(m.v_threshold_eps), dtype=torch.float32).item()
    fires_at = math.ceil(compared * m.s_scale)
    if fires_at != cuba.firing_voltage:
        lo, hi = math.floor(threshold * LOIHI_SCALE), math.floor(threshold * LOIHI_SCALE) + 1
        return Refusal(f"a CubaLIFNode with v_threshold={threshold:g}, not a multiple of 1/{LOIHI_SCALE}: it fires "
                       f"from voltage {fires_at}/{m.s_scale}, Loihi (vThMant={cuba.v_th_mant}) from "
                       f"{cuba.firing_voltage}/{m.s_scale}",
                       f"use a multiple of 1/{LOIHI_SCALE}, e.g. v_threshold={lo / LOIHI_SCALE:g} or "
                       f"{hi / LOIHI_SCALE:g}, and retrain")
    frozen = "learnable decays frozen" if m.requires_grad else ""
    return CubaMapping(threshold, decays["current_decay"], decays["voltage_decay"], frozen=frozen)


# SpikingJelly neurons whose forward in eval mode is their base's (compiled networks are the model in eval
# mode): the online-training LIFs (OTTT, SLTT) call functional.lif_step with LIFNode's arguments, the
# Heaviside step for the surrogate and no trace (spikingjelly/activation_based/neuron/online_learning.py)
_SAME_IN_EVAL = {("spikingjelly.activation_based.neuron.online_learning", "OTTTLIFNode"): "LIFNode",
                 ("spikingjelly.activation_based.neuron.online_learning", "SLTTLIFNode"): "LIFNode"}


def _same_in_eval(cls):
    """LIFNode for SpikingJelly's own OTTTLIFNode / SLTTLIFNode (not for a user's subclass of them)."""
    from spikingjelly.activation_based import neuron

    base = _SAME_IN_EVAL.get((cls.__module__, cls.__qualname__))
    return getattr(neuron, base) if base else None


def cuba_mapping(m) -> Union[CubaMapping, Refusal]:
    """The CUBA neuron equal to the SpikingJelly module ``m``, or why there is none and a fix."""
    from spikingjelly.activation_based import neuron

    _, lava_exchange, _ = _sj()
    cls, name = type(m), type(m).__name__
    supported = (neuron.IFNode, neuron.SimpleIFNode, neuron.LIFNode, neuron.SimpleLIFNode,
                 neuron.ParametricLIFNode, neuron.CUBALIFNode, lava_exchange.CubaLIFNode)
    # a subclass that overrides none of its base's compute methods (forward, neuronal_charge, ...) is its base
    cls = computes_as(m, supported) or _same_in_eval(cls) or cls
    if cls not in supported:
        for base_cls in cls.__mro__:
            if base_cls.__name__ in _STATEFUL:
                return Refusal(*_STATEFUL[base_cls.__name__])
            if base_cls.__name__ in _NO_CUBA_EQUIVALENT:
                return Refusal(f"a neuron with no Loihi CUBA equivalent ({name}: "
                               f"{_NO_CUBA_EQUIVALENT[base_cls.__name__]})", _FIX_NEURON)
            if base_cls in supported:
                changed = ", ".join(changed_methods(m, base_cls))
                return Refusal(f"a subclass of {base_cls.__name__} ({name}) that changes its dynamics: it overrides "
                               f"{changed}, so it is not a {base_cls.__name__}",
                               f"use {base_cls.__name__} itself, or write a pass that substitutes {name} with "
                               f"the neuron it computes")
        if cls.__module__.startswith("spikingjelly.activation_based.neuron") or isinstance(
                m, (neuron.BaseNode, neuron.SimpleBaseNode)):
            return Refusal(f"a neuron with no Loihi CUBA equivalent ({name})", _FIX_NEURON)
        return Refusal(f"a stateful module fxlava does not compile ({name})",
                       "remove it from the network that goes to Loihi, or write a pass that lowers it")
    refusal = _reset_refusal(m)
    if refusal:
        return refusal
    if cls is lava_exchange.CubaLIFNode:
        return _cuba_lif_node(m)
    if getattr(m, "lava_s_cale", LOIHI_SCALE) != LOIHI_SCALE:
        return Refusal(f"a neuron with lava_s_cale={m.lava_s_cale} (the scale of SpikingJelly's own Lava "
                       f"conversion): netx's CUBA blocks use scale {LOIHI_SCALE}",
                       f"leave lava_s_cale at 1 << 6 ({LOIHI_SCALE})")
    threshold = _value(m.v_threshold)
    if cls in (neuron.IFNode, neuron.SimpleIFNode):
        mapping = CubaMapping(threshold, 1.0, 0.0)
    elif cls in (neuron.LIFNode, neuron.SimpleLIFNode):
        tau = _value(m.tau)
        if not tau > 1.0:
            return Refusal(f"an LIF neuron with tau={tau:g} (<= 1)", "use tau > 1")
        mapping = CubaMapping(threshold, 1.0, 1.0 / tau, 1 / Fraction(tau) if m.decay_input else Fraction(1))
    elif cls is neuron.ParametricLIFNode:
        with torch.no_grad():
            q = _value(m.w.detach().sigmoid())  # SJ: H = V - (V - V_reset) q + X (q X with decay_input)
        mapping = CubaMapping(threshold, 1.0, q, Fraction(q) if m.decay_input else Fraction(1),
                              frozen=f"tau = 1/sigmoid(w) frozen at {1.0 / q:.6g}")
    else:  # neuron.CUBALIFNode: c = c_decay c + x, v = v_decay v + c (decays are the kept fractions)
        c_decay, v_decay = _value(m.c_decay), _value(m.v_decay)
        refusal = _decay("c_decay", c_decay) or _decay("v_decay", v_decay)
        if refusal:
            return refusal
        mapping = CubaMapping(threshold, 1.0 - c_decay, 1.0 - v_decay)
    try:
        CubaNeuron(mapping.threshold, mapping.current_decay, mapping.voltage_decay)
    except ValueError as exc:
        return Refusal(f"a neuron whose parameters Loihi cannot represent ({exc})",
                       "use a threshold in (0, 2048) and decays in [0, 1]")
    return mapping


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[tuple[fx.Node, CubaMapping]], list[Issue]]:
    """(node, mapping) for every neuron to substitute, and an issue for every other stateful module."""
    plans, issues = [], []
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is None or not _is_stateful(m) or ctx.is_refused(node):
            continue
        result = cuba_mapping(m)
        if isinstance(result, Refusal):
            issues.append(issue_at(node, result.reason, result.fix, module=m))
        else:
            plans.append((node, result))
    return plans, issues


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every neuron this pass cannot substitute and every other stateful module."""
    return _plan(gm, ctx)[1]


def _scale_synapse(gm: fx.GraphModule, node: fx.Node, scale: Fraction) -> bool:
    """Multiply the weights of the conv/linear feeding ``node`` by ``scale``; False if it is not that simple."""
    src = node.args[0] if node.args else None
    syn = module_of(gm, src) if isinstance(src, fx.Node) else None
    if not isinstance(syn, SYNAPSES) or src.meta.get("fxlava_kind") == "sumpool" or len(src.users) != 1:
        return False
    if any(n is not src and n.op == "call_module" and n.target == src.target for n in gm.graph.nodes):
        return False  # a module called from several places: its weights are shared
    with torch.no_grad():
        syn.weight.copy_((syn.weight.double() * scale.numerator / scale.denominator).to(syn.weight.dtype))
        if syn.bias is not None:  # the neuron's input is (w x + b) times the scale
            syn.bias.copy_((syn.bias.double() * scale.numerator / scale.denominator).to(syn.bias.dtype))
    return True


def substitute_neurons(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Replace SpikingJelly neurons by quantised CUBA neurons, keeping surrogate and detach_reset."""
    plans, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    where, changed = ctx.options.decay_input_scale, []
    _, lava_exchange, _ = _sj()
    for node, mapping in plans:
        m = module_of(gm, node)
        threshold, notes = mapping.threshold, []
        scale = mapping.input_scale
        if scale != 1:
            src = path_of(node.args[0])
            if where == "weights" and _scale_synapse(gm, node, scale):
                notes.append(f"decay_input: weights of {src} x {float(scale):.6g}")
            else:
                threshold = float(Fraction(threshold) / scale)
                notes.append(f"decay_input: threshold x {float(1 / scale):.6g} (input from {src})")
        try:
            cuba = CubaNeuron(threshold, mapping.current_decay, mapping.voltage_decay,
                              surrogate_function=m.surrogate_function, detach_reset=m.detach_reset)
        except ValueError as exc:
            ctx.refuse(node, f"a neuron whose threshold Loihi cannot represent after rescaling ({exc})",
                       f"lower the threshold or tau, or compile with {OPTION}='weights'", module=m)
            continue
        set_module(gm, node.target, cuba)
        # SpikingJelly's float neurons fire at v >= threshold, its fixed-point CubaLIFNode (like Loihi) at
        # v > threshold; coscale_layers aligns the first kind where it can
        node.meta["fxlava_fires_at_threshold"] = not isinstance(m, lava_exchange.CubaLIFNode)
        changed.append(path_of(node))
        if mapping.frozen:
            notes.append(mapping.frozen)
            log.info("%s: %s (%s)", path_of(node), mapping.frozen, type(m).__name__)
        ctx.record(PASS, f"{path_of(node)}: {type(m).__name__} -> CUBA(vThMant={cuba.v_th_mant}, "
                         f"iDecay={cuba.i_decay}, vDecay={cuba.v_decay})" + "".join(f"; {n}" for n in notes))
    return PassResult(gm, bool(changed))


substitute_neurons.check = check
