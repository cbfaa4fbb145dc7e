"""Readout: the ops after the last spiking layer (a rate, a classification head without a neuron), run on the host."""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.errors import Issue, issue_at
from fxlava.frontend.canonical import _FUNCTIONAL_MODULES, _dropout, _max_pool2d
from fxlava.frontend.step_modes import _is_stateful
from fxlava.frontend.time_loop import is_step_stack
from fxlava.frontend.tracer import _is_neuron_subclass

__all__ = ["Readout", "split_readout", "output_issues"]


class Readout(nn.Module):
    """The model's ops after its last spiking layer (a firing-rate mean, a VotingLayer, a head without a neuron).

    They read the output spikes; they are not part of the network that runs on Loihi, so fxlava
    runs them on the host: ``net.readout(spikes)`` takes ``[T, N, *]`` output spikes (of ``net(x)``
    or of Lava) and returns what the model returns. In single-step mode they run per time step.
    """

    def __init__(self, graph_module: Optional[fx.GraphModule] = None, step_mode: str = "m", ops: tuple = (),
                 after: str = ""):
        super().__init__()
        self.graph_module = graph_module
        self.step_mode = step_mode
        self.ops = tuple(ops)  # a description of each op, for tables and records
        self.after = after  # path of the last spiking layer, whose output the readout reads
        # a residual merge feeding the output, summing channel groups of the output spikes (lower_residuals)
        self.merge: Optional[nn.Module] = None

    def forward(self, spikes: torch.Tensor):
        if self.merge is not None:
            spikes = self.merge(spikes)
        if self.graph_module is None:
            return spikes
        if self.step_mode == "m":
            return self.graph_module(spikes)
        return torch.stack([self.graph_module(s) for s in spikes])

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode!r}, ops={list(self.ops)}"


def _is_spiking_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    return any(_is_stateful(sub) or _is_neuron_subclass(sub) for sub in m.modules())


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}()" if node.op == "call_function" else f".{name}()"


def _compiles_after_spikes(gm: fx.GraphModule, node: fx.Node) -> bool:
    from fxlava.rules import IDENTITIES, MAX_POOLS

    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), MAX_POOLS + IDENTITIES + (nn.AdaptiveMaxPool2d,))
    return node.op == "call_function" and _FUNCTIONAL_MODULES.get(node.target) in (_max_pool2d, _dropout)


def _is_add(node: fx.Node) -> bool:
    import operator

    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)


def _unit_step(tail: list[fx.Node]) -> bool:
    """``y[0]`` of a one-step sequence, stacked by a folded time loop: the spikes themselves."""
    import operator

    n = tail[0]
    return (len(tail) > 1 and n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0
            and is_step_stack(tail[1]) and tail[1].args[0][0] is n)


def _host_module(m: nn.Module) -> bool:
    """A module the readout may run on the host: torch's or SpikingJelly's own stateless layers, not a user's
    class (a hand-written neuron, a subclass with its own forward), which the passes name instead."""
    if _is_stateful(m):
        return False
    if type(m).__module__.startswith(("torch.nn.", "spikingjelly.activation_based.layer")):
        return True
    return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())


_REDUCTIONS = {"mean", "sum", "softmax", "log_softmax"}
_SCALINGS = {operator.truediv, operator.mul, torch.div, torch.mul}


def _reduces_scores(n: fx.Node) -> bool:
    """A mean or sum (over time), a softmax, or a scaling by a number: what turns a head's output into scores."""
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if n.op in ("call_method", "call_function") and name in _REDUCTIONS:
        return True
    if n.op == "call_method" and name in ("div", "mul", "__truediv__", "__mul__") or (
            n.op == "call_function" and n.target in _SCALINGS):
        return len(n.all_input_nodes) == 1 and all(isinstance(a, (int, float)) for a in n.args[1:])
    return False


def split_readout(gm0: fx.GraphModule, step_mode: str) -> Optional[Readout]:
    """Cut the ops after the last spiking layer off ``gm0`` into a ``Readout``.

    Only a tail that reads nothing but one node (the last spiking layer's output, or a merge of
    spikes) and holds no state is cut: parameter-free ops (a rate, a VotingLayer) and a trailing
    classification head without a neuron (SpikingJelly's ResNets end in avgpool -> flatten -> fc),
    which runs on the host in float. Anything else stays in the graph (and is compiled or refused).
    """
    nodes = list(gm0.graph.nodes)
    output = nodes[-1]
    spiking = [i for i, n in enumerate(nodes) if _is_spiking_node(gm0, n)]
    if not spiking or not isinstance(output.args[0], fx.Node):
        return None
    # the longest run of nodes after the last spiking layer that reads a single node from before it (the
    # last spiking layer, or a residual merge of spikes, which lower_residuals lowers)
    for start in range(spiking[-1] + 1, len(nodes) - 1):
        tail = nodes[start:-1]
        inside = set(tail)
        outside = {a for n in tail for a in n.all_input_nodes if a not in inside}
        if len(outside) == 1 and (_is_spiking_node(gm0, next(iter(outside))) or _is_add(next(iter(outside)))):
            (last,) = outside
            break
    else:
        return None
    # max pools (and dropout) of the last spikes compile to Loihi layers: the readout starts after them
    # (and a folded time loop's stack([y]) is the spikes themselves, stacked over time)
    while tail and tail[0].all_input_nodes == [last] and (_compiles_after_spikes(gm0, tail[0])
                                                          or is_step_stack(tail[0]) or _unit_step(tail)):
        last, tail = tail[0], tail[1:]
    if not tail or output.args[0] not in tail:
        return None
    inside = set(tail) | {last}
    for n in tail:
        if n.op in ("placeholder", "get_attr") or any(a not in inside for a in n.all_input_nodes):
            return None
        if n.op == "call_module" and not _host_module(gm0.get_submodule(n.target)):
            return None
    weighted = [n for n in tail if n.op == "call_module" and any(True for _ in gm0.get_submodule(n.target).parameters())]
    if weighted and not all(_reduces_scores(n) for n in tail[tail.index(weighted[-1]) + 1:]):
        # a head with weights ends the model (its fc), or feeds only a rate or class scores (fc(x).mean(0),
        # a softmax); more arithmetic after it may be a hand-written neuron, which stays to be named
        return None
    graph = fx.Graph()
    env = {last: graph.placeholder("spikes")}
    for n in tail:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[output.args[0]])
    # a copy: the traced modules are switched to single-step below, the readout keeps the model's mode
    readout = Readout(copy.deepcopy(fx.GraphModule(gm0, graph, class_name="Readout")), step_mode,
                      [_describe(n, gm0) for n in tail], last.target if last.op == "call_module" else last.name)
    output.args = (last,)
    for n in reversed(tail):
        gm0.graph.erase_node(n)
    gm0.recompile()
    return readout


def output_issues(gm: fx.GraphModule) -> list[Issue]:
    """The compiled network outputs the last spiking layer's spikes: report an output that is anything else.

    Run on the canonical graph, after the readout was cut off: what forward() returns must be a
    spiking neuron's output, or a max pool / dropout of one (which compile to Loihi layers too).
    """
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list, dict)):
        return []  # chain_issues reports several outputs
    fix = ("return the spikes of the last spiking neuron (and compute anything else from them outside the "
           "model or in parameter-free ops after it, which run on the host as net.readout)")
    if not isinstance(value, fx.Node):
        return [issue_at(output, f"forward() returns {value!r}, not spikes computed from its input", fix)]
    n = value
    while (n.op == "call_module" and len(n.all_input_nodes) == 1 and _compiles_after_spikes(gm, n)):
        n = n.all_input_nodes[0]
    if _is_spiking_node(gm, n):
        return []
    if n.op == "get_attr" or (n.op == "call_function" and n.target is getattr):
        return [issue_at(n, "forward() returns a module's attribute or a constant (such as a neuron's v or v_seq), "
                            "not spikes", fix)]
    if n.op == "placeholder":
        return [issue_at(output, "forward() returns its input (or a reshape of it), not spikes of a neuron", fix)]
    module = gm.get_submodule(n.target) if n.op == "call_module" else None
    return [issue_at(n, f"forward() returns the output of {_describe(n, gm)}, which is not spikes: Loihi's "
                        f"output layer is a layer of spiking neurons",
                     "end the network with a spiking neuron after this layer, or move it out of the model and run "
                     "it on the output spikes on the host", module=module)]
