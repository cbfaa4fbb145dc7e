"""Trace a SpikingJelly model with torch.fx and put the graph in fxlava's canonical per-step form.

The canonical form is what the built-in passes read: one node per operation, executed once
per time step on ``[N, *]`` tensors (SpikingJelly's single-step semantics), with
* SpikingJelly containers (``SeqToANNContainer``, ``MultiStepContainer``,
  ``StepModeContainer``, ``BlockContainer``) expanded into their children (also through
  ``nn.Sequential`` children); neurons inside them count in the step mode the container
  feeds them from outside, and what SpikingJelly would run differently from this per-step
  form (a neuron in a container that merges time into the batch, nested step containers,
  multi-step modules inside a container, a module with its own forward() inside one) is
  refused at trace time,
* every SpikingJelly module set to single-step mode,
* reshapes that only merge or split the time and batch dimensions removed, reshapes that
  flatten one sample turned into ``nn.Flatten`` modules, and functional pooling / dropout
  calls turned into the equivalent modules.
Whatever cannot be put in that form is left in the graph as it is and reported by
``unsupported_nodes``. Each node keeps its user-facing module path (``meta['fxlava_path']``),
the user's source line (``meta['stack_trace']``) and its per-sample output shape
(``meta['fxlava_shape']``).
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from fxlava.errors import FxlavaError, Issue, UnsupportedModelError, issue_at

__all__ = ["SpikingTracer", "trace", "detect_step_mode", "chain_issues", "run_per_step", "reset_states", "Readout"]

log = logging.getLogger(__name__)


def _is_spikingjelly(m: nn.Module) -> bool:
    return type(m).__module__.startswith("spikingjelly.")


def _is_neuron_subclass(m: nn.Module) -> bool:
    """A user's subclass of a SpikingJelly neuron: a leaf, so that substitute_neurons names it."""
    from spikingjelly.activation_based import neuron

    return isinstance(m, (neuron.BaseNode, neuron.SimpleBaseNode))


class SpikingTracer(fx.Tracer):
    """Keeps SpikingJelly neurons, layers and containers (and torch.nn layers) as leaf modules."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_spikingjelly(m) or _is_neuron_subclass(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _container_types() -> tuple:
    from spikingjelly.activation_based import layer, lava_exchange

    types = (layer.SeqToANNContainer, layer.MultiStepContainer, layer.StepModeContainer)
    block = getattr(lava_exchange, "BlockContainer", None)  # only defined when slayer imports
    return types + ((block,) if block is not None else ())


def _is_plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order, with no forward() of its own."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _step_modules(model: nn.Module):
    from spikingjelly.activation_based import base

    return [(n, m) for n, m in model.named_modules() if isinstance(m, base.StepModule)]


def _is_stateful(m: nn.Module) -> bool:
    from spikingjelly.activation_based import base

    return isinstance(m, base.MemoryModule)


def _is_recurrent(m: nn.Module) -> bool:
    """SpikingJelly's recurrent containers (a leaf of the trace, whose output feeds back into its input)."""
    from spikingjelly.activation_based import layer

    return isinstance(m, (layer.ElementWiseRecurrentContainer, layer.LinearRecurrentContainer))


def _time_in_batch(m: nn.Module) -> bool:
    """Containers that run their children once on [T*N, *] (time merged into the batch)."""
    from spikingjelly.activation_based import layer

    if isinstance(m, layer.SeqToANNContainer):
        return True
    return isinstance(m, layer.StepModeContainer) and m.step_mode == "m" and not m.stateful


def _feeds_sequences(m: nn.Module) -> bool:
    """Containers whose children see the whole [T, N, *] sequence from outside, whatever their own step mode."""
    from spikingjelly.activation_based import layer

    if isinstance(m, (layer.MultiStepContainer, layer.SeqToANNContainer)):
        return True
    return isinstance(m, layer.StepModeContainer) and m.step_mode == "m"


def _step_container(m: nn.Module) -> bool:
    """SpikingJelly modules that take [T, N, *] and hand their children one step (or T*N samples) at a time."""
    from spikingjelly.activation_based import layer

    if isinstance(m, (layer.MultiStepContainer, layer.SeqToANNContainer, layer.TLastMultiStepContainer,
                      layer.TLastSeqToANNContainer)):
        return True
    # StepModeContainer and lava_exchange's BlockContainer: a plain sequence in single-step mode
    return isinstance(m, _container_types()) and getattr(m, "step_mode", "s") == "m"


def _walk_step_modes(model: nn.Module):
    """Stateful modules with the step mode in which they see time, and the containers that would misfeed them.

    Returns ``(found, issues)``: ``found`` lists (path, module, effective step mode); a neuron inside a
    MultiStepContainer is in single-step mode but receives [T, N, *] from the outside, so its effective
    step mode is 'm'. ``issues`` names modules inside a SpikingJelly container that SpikingJelly itself
    runs differently from the per-step form fxlava compiles: neurons in containers that merge time into
    the batch, containers nested in containers, multi-step modules inside a container.
    """
    from spikingjelly.activation_based import base

    found, issues = [], []

    def issue(path, m, reason, fix):
        issues.append(Issue(reason=reason, fix=fix, path=path, module_type=f"{type(m).__module__}.{type(m).__qualname__}"))

    def walk(m: nn.Module, prefix: str, inside: Optional[str], merged: Optional[str]):
        for name, child in m.named_children():
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if inside is not None and _step_container(child):
                issue(path, child, "a SpikingJelly step container inside another: it receives one time step "
                                   "[N, *] (or [T*N, *]) and would take its first dimension for time",
                      f"put its layers directly in the outer container ({inside}), or move it out of that one")
            elif inside is not None and isinstance(child, base.StepModule) and not _step_container(child) \
                    and getattr(child, "step_mode", "s") == "m":
                issue(path, child, "a multi-step module inside a SpikingJelly container, which feeds its children "
                                   "one time step at a time",
                      f"leave it in single-step mode (step_mode='s'), as the container ({inside}) expects")
            if _is_stateful(child) and not isinstance(child, _container_types()):
                found.append((path, child, "m" if inside is not None else child.step_mode))
                if merged is not None:
                    issue(path, child, "a neuron inside a container that merges time into the batch "
                                       "(SeqToANNContainer or StepModeContainer(stateful=False, 'm')): it would see "
                                       "all T steps at once, as one step",
                          f"move the neuron out of {merged}, or hold it in a layer.MultiStepContainer, which runs "
                          f"it step by step")
            if _is_recurrent(child):
                continue  # SpikingJelly runs its inner modules single-step; substitute_neurons refuses it whole
            walk(child, path, inside or (path if _feeds_sequences(child) else None),
                 merged or (path if _time_in_batch(child) else None))

    walk(model, "", None, None)
    return found, issues


def detect_step_mode(model: nn.Module) -> str:
    """'m' or 's': the step mode in which the model's stateful (neuron) modules see time, which must agree.

    Raises UnsupportedModelError, naming every offending module, for neurons in both modes and
    for modules that SpikingJelly's containers would feed differently from fxlava's per-step form
    (see ``_walk_step_modes``).
    """
    modes = {}
    found, issues = _walk_step_modes(model)
    for path, m, mode in found:
        modes.setdefault(mode, []).append(path)
    if len(modes) > 1:
        fix = "set one step mode for the whole model: functional.set_step_mode(model, 'm')"
        for mode in ("s", "m"):
            issues.extend(Issue(reason="neurons in both single-step and multi-step mode", path=p,
                                module_type=f"step_mode='{mode}'", fix=fix) for p in modes.get(mode, []))
    if issues:
        raise UnsupportedModelError(issues)
    if modes:
        return next(iter(modes))
    # no neuron at all: containers of SpikingJelly are multi-step by nature
    return "m" if any(isinstance(m, _container_types()) for m in model.modules()) else "s"


def reset_states(model: nn.Module) -> None:
    """Reset every SpikingJelly memory module (neuron state) in ``model``."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


def _set_single_step(model: nn.Module) -> None:
    for _, m in _step_modules(model):
        if "s" in m.supported_step_mode():
            m.step_mode = "s"


# functional forms a user writes in forward, and the module that does the same per sample
def _avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
    return nn.AvgPool2d(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    return nn.MaxPool2d(kernel_size, stride, padding, dilation, return_indices, ceil_mode)


def _dropout(x, p=0.5, training=False, inplace=False):
    return nn.Dropout(p)


_FUNCTIONAL_MODULES = {
    F.avg_pool2d: _avg_pool2d,
    torch._C._nn.avg_pool2d: _avg_pool2d,
    F.max_pool2d: _max_pool2d,
    torch.max_pool2d: _max_pool2d,
    F.dropout: _dropout,
}
_RESHAPES_FN = {torch.flatten, torch.reshape, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.flatten,
                torch.Tensor.contiguous, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"flatten", "unflatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "view_as",
                    "reshape_as"}


def _shape(node) -> Optional[torch.Size]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(tm, "shape", None)


class _Canonicalizer:
    def __init__(self, gm0: fx.GraphModule, root: nn.Module, lead: int, T: int, N: int):
        self.gm0, self.root, self.T, self.N = gm0, root, T, N
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.lead: dict[fx.Node, int] = {}  # leading (time/batch) dims of each node's value
        self.input_lead = lead
        self.modules = dict(root.named_modules())
        self.containers = _container_types()
        self.count = 0
        self.issues: list[Issue] = []

    def _copy_meta(self, new: fx.Node, old: fx.Node, path: str, shape, lead: int):
        if "stack_trace" in old.meta:
            new.meta["stack_trace"] = old.meta["stack_trace"]
        new.meta["fxlava_path"] = path
        if shape is not None:
            new.meta["fxlava_shape"] = tuple(shape[lead:])

    def _add_module(self, module: nn.Module, hint: str) -> str:
        self.count += 1
        name = f"_fxlava_{hint}_{self.count}"
        self.root.add_module(name, module)
        return name

    def _emit_module(self, target: str, arg: fx.Node, old: fx.Node, path: str, shape, lead: int) -> fx.Node:
        new = self.graph.call_module(target, (arg,))
        self._copy_meta(new, old, path, shape, lead)
        return new

    def _expand(self, target: str, arg: fx.Node, old: fx.Node, lead: int) -> fx.Node:
        """Emit a container's children in order (the container's own shape is the last child's)."""
        m = self.modules[target]
        children = [(n, c) for n, c in m.named_children() if c is not None]
        out = arg
        for i, (name, child) in enumerate(children):
            sub = f"{target}.{name}"
            shape = _shape(old) if i == len(children) - 1 else None
            if isinstance(child, self.containers) or _is_plain_sequential(child):
                out = self._expand(sub, out, old, lead)
            elif not _is_spikingjelly(child) and not SpikingTracer().is_leaf_module(child, sub):
                # a module with its own forward() inside a SpikingJelly container: the container is a
                # leaf of the trace, so that forward() was never traced
                issue = issue_at(old, "a module with its own forward() inside a SpikingJelly container, which "
                                      "fxlava expands child by child without tracing into the children",
                                 "call it outside the container in forward() (SpikingJelly layers take [T, N, *] "
                                 "in multi-step mode), or build it from torch.nn / SpikingJelly layers in an "
                                 "nn.Sequential", module=child)
                self.issues.append(dataclasses.replace(issue, path=sub))
                out = self._emit_module(sub, out, old, sub, shape, lead)
            else:
                out = self._emit_module(sub, out, old, sub, shape, lead)
        return out

    def _reshape(self, node: fx.Node) -> Optional[tuple]:
        """Classify a reshape: ('flatten'|'identity', new lead) or None if it mixes dims."""
        src = node.args[0]
        if not isinstance(src, fx.Node):
            return None
        si, so = _shape(src), _shape(node)
        if si is None or so is None:
            return None
        lead = self.lead.get(src, self.input_lead)
        if lead == 2 and len(so) >= 1 and so[0] == si[0] * si[1] and tuple(so[1:]) == tuple(si[2:]):
            return ("identity", 1)  # [T, N, *] -> [T*N, *]
        if lead == 1 and self.input_lead == 2 and len(so) >= 2 and tuple(so[:2]) == (self.T, self.N) \
                and tuple(so[2:]) == tuple(si[1:]) and si[0] == self.T * self.N:
            return ("identity", 2)  # [T*N, *] -> [T, N, *]
        if tuple(so[:lead]) == tuple(si[:lead]):
            if tuple(so) == tuple(si):
                return ("identity", lead)
            if len(so) == lead + 1 and so[lead] == math.prod(si[lead:]):
                return ("flatten", lead)
        return None

    def _lower_reshape(self, node: fx.Node, kind: tuple, path: str) -> None:
        """Drop a T/N merge or split; turn a per-sample flatten into nn.Flatten(1)."""
        what, lead = kind
        src = self.env[node.args[0]]
        if what == "identity":
            self.env[node] = src
        else:
            target = self._add_module(nn.Flatten(1), "flatten")
            self.env[node] = self._emit_module(target, src, node, path, _shape(node), lead)
        self.lead[node] = lead

    def run(self) -> fx.Graph:
        for node in self.gm0.graph.nodes:
            if node.op == "placeholder":
                new = self.graph.placeholder(node.name)
                new.meta.update(node.meta)
                self.env[node], self.lead[node] = new, self.input_lead
                shape = _shape(node)
                new.meta["fxlava_shape"] = tuple(shape[self.input_lead:]) if shape is not None else None
                new.meta["fxlava_path"] = ""
                continue
            if node.op == "output":
                self.graph.output(fx.map_arg(node.args[0], lambda n: self.env[n]))
                continue
            arg0 = node.args[0] if node.args else None
            lead = self.lead.get(arg0, self.input_lead) if isinstance(arg0, fx.Node) else self.input_lead
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
                m = self.modules[node.target]
                if isinstance(m, self.containers):
                    self.env[node] = self._expand(node.target, self.env[arg0], node, lead)
                elif isinstance(m, nn.Flatten) and (kind := self._reshape(node)) is not None:
                    # start_dim depends on the step mode (Flatten(2) on [T, N, C, H, W]); decide by shapes
                    self._lower_reshape(node, kind, node.target)
                    continue
                else:
                    self.env[node] = self._emit_module(node.target, self.env[arg0], node, node.target, _shape(node), lead)
                self.lead[node] = lead
                continue
            is_reshape = (node.op == "call_function" and node.target in _RESHAPES_FN) or (
                node.op == "call_method" and node.target in _RESHAPE_METHODS)
            if is_reshape:
                kind = self._reshape(node)
                if kind is not None:
                    self._lower_reshape(node, kind, "")
                    continue
            if node.op == "call_function" and node.target in _FUNCTIONAL_MODULES and isinstance(arg0, fx.Node):
                try:
                    bound = inspect.signature(_FUNCTIONAL_MODULES[node.target]).bind(*node.args, **node.kwargs)
                    consts = [v for k, v in bound.arguments.items() if k != "x"]
                    if not any(isinstance(v, fx.Node) for v in consts):
                        module = _FUNCTIONAL_MODULES[node.target](*node.args, **node.kwargs)
                        target = self._add_module(module, node.target.__name__)
                        self.env[node] = self._emit_module(target, self.env[arg0], node, "", _shape(node), lead)
                        self.lead[node] = lead
                        continue
                except TypeError:
                    pass
            # anything else stays as it is; unsupported_nodes() reports it
            new = self.graph.node_copy(node, lambda n: self.env[n])
            self._copy_meta(new, node, node.target if node.op == "call_module" else "", _shape(node), lead)
            self.env[node], self.lead[node] = new, lead
        return self.graph


class Readout(nn.Module):
    """The model's parameter-free ops after its last spiking layer (a firing-rate mean, a VotingLayer...).

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

    def forward(self, spikes: torch.Tensor):
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


def split_readout(gm0: fx.GraphModule, step_mode: str) -> Optional[Readout]:
    """Cut the parameter-free ops after the last spiking layer off ``gm0`` into a ``Readout``.

    Only a tail that reads nothing but the last spiking layer's output, and holds no parameters,
    buffers or state, is cut; anything else stays in the graph (and is compiled or refused).
    """
    nodes = list(gm0.graph.nodes)
    output = nodes[-1]
    spiking = [i for i, n in enumerate(nodes) if _is_spiking_node(gm0, n)]
    if not spiking or not isinstance(output.args[0], fx.Node):
        return None
    last = nodes[spiking[-1]]
    tail = nodes[spiking[-1] + 1:-1]
    # max pools (and dropout) of the last spikes compile to Loihi layers: the readout starts after them
    while tail and tail[0].all_input_nodes == [last] and _compiles_after_spikes(gm0, tail[0]):
        last, tail = tail[0], tail[1:]
    if not tail or output.args[0] not in tail:
        return None
    inside = set(tail) | {last}
    for n in tail:
        if n.op in ("placeholder", "get_attr") or any(a not in inside for a in n.all_input_nodes):
            return None
        if n.op == "call_module":
            m = gm0.get_submodule(n.target)
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()) or _is_stateful(m):
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


def trace(model: nn.Module, example_input: torch.Tensor) -> tuple[fx.GraphModule, str]:
    """Trace a copy of ``model`` and return its canonical per-step GraphModule and the model's step mode.

    The user's model is never modified: tracing, shape propagation and every rewrite act on a
    deep copy, whose neuron states are reset before and after the example run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxlava.compile expects a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 3:
        raise ValueError(
            f"example_input must be a tensor of spikes shaped [T, N, *] (SpikingJelly's multi-step layout); "
            f"got {tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__}"
        )
    step_mode = detect_step_mode(model)
    root = copy.deepcopy(model).eval()
    reset_states(root)
    try:
        graph = SpikingTracer().trace(root)
    except Exception as exc:
        raise FxlavaError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            f"fix: keep forward() free of data-dependent Python control flow (if/for on tensor values); "
            f"wrap such code in a module and keep it out of the network that goes to Loihi"
        ) from exc
    gm0 = fx.GraphModule(root, graph)
    T, N = example_input.shape[:2]
    lead = 2 if step_mode == "m" else 1
    x0 = example_input if step_mode == "m" else example_input[0]
    try:
        with torch.no_grad():
            ShapeProp(gm0).propagate(x0.to(torch.float32))
    except Exception as exc:
        raise FxlavaError(
            f"running {type(model).__name__} on the example input {tuple(example_input.shape)} failed "
            f"({type(exc).__name__}: {exc}); fix: pass an example input shaped [T, N, *] that the model accepts "
            f"in its step mode ('{step_mode}')"
        ) from exc
    finally:
        reset_states(root)
    readout = split_readout(gm0, step_mode)
    canonicalizer = _Canonicalizer(gm0, root, lead, T, N)
    graph = canonicalizer.run()
    if canonicalizer.issues:
        raise UnsupportedModelError(canonicalizer.issues)
    _set_single_step(root)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.graph.eliminate_dead_code()  # shape queries (x.shape[0]) that only fed removed reshapes
    gm.recompile()
    _fill_shapes(gm, example_input[0])
    gm.meta["fxlava_step_mode"] = step_mode
    gm.meta["fxlava_readout"] = readout or Readout(step_mode=step_mode)
    return gm, step_mode


def _fill_shapes(gm: fx.GraphModule, x0: torch.Tensor) -> None:
    """Per-sample shapes for the nodes the canonical form made up (children inside containers), from one step."""
    missing = [n for n in gm.graph.nodes if n.op != "output" and n.meta.get("fxlava_shape") is None]
    if not missing:
        return
    reset_states(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x0.to(torch.float32))
    except Exception:  # left to the checks: a graph that cannot run per step is reported there
        return
    finally:
        reset_states(gm)
    for n in missing:
        shape = _shape(n)
        if shape is not None:
            n.meta["fxlava_shape"] = tuple(shape[1:])


def chain_issues(gm: fx.GraphModule) -> list[Issue]:
    """netx needs a straight chain of layers: report every branch, merge or extra input/output."""
    g = nx.DiGraph()
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    for n in nodes:
        g.add_node(n)
        for u in n.users:
            if u.op != "get_attr":
                g.add_edge(n, u)
    issues = []
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        issues.extend(issue_at(n, "the network must have exactly one input", "give forward() a single tensor argument")
                      for n in placeholders[1:])
    for n in nodes:
        if n.op == "output":
            if any(isinstance(a, (tuple, list, dict)) for a in n.args):
                issues.append(issue_at(n, "the network must return a single tensor",
                                       "return one tensor from forward(); compute extra outputs outside the model"))
            continue
        if g.out_degree(n) > 1:
            users = ", ".join(u.meta.get("fxlava_path") or u.name for u in n.users)
            issues.append(issue_at(n, "a branch: netx runs only a straight chain of layers",
                                   f"this output feeds {g.out_degree(n)} nodes ({users}); "
                                   f"rewrite the model as a single chain (residual and branching graphs are not lowered yet)",
                                   module=gm.get_submodule(n.target) if n.op == "call_module" else None))
        node_inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if len(node_inputs) > 1:
            ins = ", ".join(a.meta.get("fxlava_path") or a.name for a in node_inputs)
            issues.append(issue_at(n, "a merge: netx runs only a straight chain of layers",
                                   f"this node combines {len(node_inputs)} inputs ({ins}); rewrite the model as a single chain",
                                   module=gm.get_submodule(n.target) if n.op == "call_module" else None))
    for cycle in list(nx.simple_cycles(g))[:1]:  # fx graphs are acyclic; kept as a guard for user passes
        issues.append(Issue(reason="a loop in the graph", fix="remove the cycle",
                            node=" -> ".join(n.name for n in cycle)))
    return issues


def run_per_step(gm: fx.GraphModule, x_seq: torch.Tensor) -> torch.Tensor:
    """Run a canonical (per-step) graph over a [T, N, *] sequence from the resting state."""
    reset_states(gm)
    try:
        return torch.stack([gm(x_seq[t]) for t in range(x_seq.shape[0])])
    finally:
        reset_states(gm)
