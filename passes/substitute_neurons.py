"""substitute_neurons: SpikingJelly IF/LIF neurons -> fxlava's quantised CUBA neuron (Loihi's neuron).

* ``IFNode(v_reset=0)``                      = CUBA with current_decay=1, voltage_decay=0
* ``LIFNode(tau, decay_input=False, v_reset=0)`` = CUBA with current_decay=1, voltage_decay=1/tau

The user's surrogate function and ``detach_reset`` are kept, so the compiled graph trains as
the user's model did. Everything else is refused, all at once, with the reason and a fix.
"""
from __future__ import annotations

import torch.fx as fx

from fxlava.errors import UnsupportedModelError, issue_at
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_of, path_of, set_module

PASS = "substitute_neurons"


def _neuron_types():
    from spikingjelly.activation_based import base, neuron

    return base.MemoryModule, neuron.BaseNode, neuron.IFNode, neuron.LIFNode


def _is_neuron(m) -> bool:
    memory, base_node, *_ = _neuron_types()
    return isinstance(m, (base_node, memory)) and not isinstance(m, CubaNeuron)


def _value(x) -> float:
    return float(x.item() if hasattr(x, "item") else x)


def cuba_parameters(m):
    """(threshold, current_decay, voltage_decay) of the CUBA neuron equal to ``m``, or (None, reason, fix)."""
    _, base_node, if_node, lif_node = _neuron_types()
    if type(m) not in (if_node, lif_node):
        name = type(m).__name__
        return None, f"a neuron fxlava does not compile ({name})", (
            "use neuron.IFNode or neuron.LIFNode(decay_input=False) with v_reset=0.0; "
            f"{name} has no Loihi CUBA equivalent in fxlava yet")
    if m.v_reset is None:
        return None, "a soft-reset neuron (v_reset=None): Loihi resets the voltage to 0", \
            "construct the neuron with v_reset=0.0 and retrain"
    if _value(m.v_reset) != 0.0:
        return None, f"a neuron with v_reset={_value(m.v_reset)}: Loihi resets the voltage to 0", \
            "construct the neuron with v_reset=0.0 and retrain"
    if isinstance(m, lif_node):
        if m.decay_input:
            return None, "an LIFNode with decay_input=True (fxlava does not rescale its synapse yet)", \
                "construct it with decay_input=False and retrain"
        return (_value(m.v_threshold), 1.0, 1.0 / _value(m.tau)), None, None
    return (_value(m.v_threshold), 1.0, 0.0), None, None


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every stateful module that is not a neuron this pass can substitute."""
    issues = []
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is not None and _is_neuron(m):
            params, reason, fix = cuba_parameters(m)
            if params is None:
                issues.append(issue_at(node, reason, fix, module=m))
    return issues


def substitute_neurons(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Replace IF/LIF neurons by quantised CUBA neurons, keeping surrogate and detach_reset."""
    issues, changed = check(gm, ctx), []
    if issues:
        raise UnsupportedModelError(issues)
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is None or not _is_neuron(m):
            continue
        threshold, current_decay, voltage_decay = cuba_parameters(m)[0]
        cuba = CubaNeuron(threshold, current_decay, voltage_decay,
                          surrogate_function=m.surrogate_function, detach_reset=m.detach_reset)
        set_module(gm, node.target, cuba)
        changed.append(path_of(node))
        ctx.record(PASS, f"{path_of(node)}: {type(m).__name__} -> CUBA(vThMant={cuba.v_th_mant}, "
                         f"iDecay={cuba.i_decay}, vDecay={cuba.v_decay})")
    return PassResult(gm, bool(changed))


substitute_neurons.check = check
