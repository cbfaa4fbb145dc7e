"""Canonical form: the traced graph rewritten to one node per operation, run once per time step on [N, *]."""
from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxlava.errors import Issue, _source_line, issue_at
from fxlava.rules import IDENTITIES
from fxlava.target import ENCODING_OPS
from fxlava.frontend.dims import dim_args, permutation
from fxlava.frontend.shapes import ShapeRunError, propagate_shapes
from fxlava.frontend.time_loop import is_step_select, is_step_stack
from fxlava.frontend.step_modes import _container_types, _is_plain_sequential, _is_stateful, reset_states
from fxlava.frontend.tracer import SpikingTracer, _is_spikingjelly


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


def _is_identity(m: nn.Module) -> bool:
    """Identity and every Dropout: the compiled network is the model in eval mode, where they pass x through."""
    from spikingjelly.activation_based import layer

    from fxlava.subclasses import changed_methods, nearest_base

    types = IDENTITIES + (layer.Dropout,)  # layer.Dropout2d subclasses layer.Dropout
    # a subclass whose forward does something else is no identity: lower_module_subclasses refuses it
    return isinstance(m, types) and not changed_methods(m, nearest_base(m, types))


def _scope(node: fx.Node) -> str:
    """The path of the module whose forward() called this function or method ('' for the model's own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    return paths[-1] if paths else ""


def _first_tensor(node: fx.Node) -> Optional[fx.Node]:
    """The op's first tensor input: ``x`` of ``f(x, ...)``, ``a`` of ``torch.cat([a, b])`` or ``cat(tensors=...)``."""
    a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensors"))
    if isinstance(a, (list, tuple)) and a:
        a = a[0]
    return a if isinstance(a, fx.Node) else None


def _shape(node) -> Optional[torch.Size]:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(tm, "shape", None)


class _Canonicalizer:
    def __init__(self, gm0: fx.GraphModule, root: nn.Module, lead: int, T: int, N: int, folded_loops: bool = False):
        self.gm0, self.root, self.T, self.N = gm0, root, T, N
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.lead: dict[fx.Node, int] = {}  # leading (time/batch) dims of each node's value
        self.input_lead = lead
        self.modules = dict(root.named_modules())
        self.containers = _container_types()
        self.count = 0
        self.issues: list[Issue] = []
        self.unit_close: set[fx.Node] = set()
        self.unit_shapes: dict[fx.Node, tuple] = {}  # per-sample shapes of the nodes between a unit-axes pair
        self.folded_loops = folded_loops  # fold_time_loops left x[0] ... stack([y]) in the graph
        self.dropped: list[str] = []  # Identity and Dropout modules, identities in eval mode
        self.input_transposed = False  # forward() takes [N, T, *] and transposes it to [T, N, *] itself
        self.temporal: set[nn.Module] = set()  # convolutions over an axis forward() later makes the time axis
        self.later: list[tuple] = []  # (traced node, reason, fix, module) refused in the canonical graph

    def _copy_meta(self, new: fx.Node, old: fx.Node, path: str, shape, lead: int):
        if "stack_trace" in old.meta:
            new.meta["stack_trace"] = old.meta["stack_trace"]
        new.meta["fxlava_path"] = path
        if old in self.unit_shapes:
            new.meta["fxlava_shape"] = self.unit_shapes[old]
        elif shape is not None:
            new.meta["fxlava_shape"] = tuple(shape[lead:])

    def _add_module(self, module: nn.Module, hint: str) -> str:
        from fxlava.rewrite import add_module

        self.count += 1
        return add_module(self.root, f"_fxlava_{hint}_{self.count}", module)  # never a name the model has

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
            if _is_identity(child):
                self.dropped.append(sub)
            elif isinstance(child, self.containers) or _is_plain_sequential(child):
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

    def _unit_axes_pair(self, node: fx.Node, lead: int) -> bool:
        """``x.unsqueeze(-1)`` -> BatchNorm1d / neurons -> ``.squeeze(-1)``: layout only, both reshapes dropped.

        ``node`` adds or removes size-1 axes of one sample and keeps the channel axis first; the
        modules after it (a single-user chain of BatchNorm1d, neurons) work per channel either way;
        and a reshape after them restores the per-sample shape ``node`` started from.
        """
        src = node.args[0]
        si, so = _shape(src), _shape(node)
        if not isinstance(src, fx.Node) or si is None or so is None or tuple(si[:lead]) != tuple(so[:lead]):
            return False
        before, after = tuple(si[lead:]), tuple(so[lead:])
        if before == after or [d for d in before if d != 1] != [d for d in after if d != 1] \
                or not before or not after or before[0] != after[0]:
            return False
        between, n = [], node
        while len(n.users) == 1:
            n = next(iter(n.users))
            if n.op == "call_module" and self._per_channel(self.modules[n.target], before[0]):
                between.append(n)
                continue
            shape = _shape(n)
            is_reshape = (n.op == "call_function" and n.target in _RESHAPES_FN) or (
                n.op == "call_method" and n.target in _RESHAPE_METHODS)
            if is_reshape and between and shape is not None and tuple(shape[lead:]) == before \
                    and tuple(shape[:lead]) == tuple(si[:lead]):
                self.unit_close.add(n)
                self.unit_shapes.update((b, before) for b in between)
                return True
            return False
        return False

    @staticmethod
    def _per_channel(m: nn.Module, channels: int) -> bool:
        """Modules that act on each channel (axis 1) alone, whatever axes of size 1 follow it."""
        if isinstance(m, nn.BatchNorm1d):
            return m.num_features == channels
        return _is_stateful(m) or _is_identity(m)

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
        # the same, flattening each sample at once: x.view(T * N, -1) and y.view(T, N, -1)
        if lead == 2 and len(so) == 2 and so[0] == si[0] * si[1] and so[1] == math.prod(si[2:]):
            return ("flatten", 1)
        if lead == 1 and self.input_lead == 2 and len(so) == 3 and tuple(so[:2]) == (self.T, self.N) \
                and si[0] == self.T * self.N and so[2] == math.prod(si[1:]):
            return ("flatten", 2)
        if self.folded_loops and lead == 1 and self.input_lead == 2 and tuple(so) == (1,) + tuple(si):
            return ("identity", 2)  # x[t].unsqueeze(0) in a folded loop: one time step, as a sequence of length 1
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

    def _refuse(self, node: fx.Node, reason: str, fix: str, module: Optional[nn.Module] = None) -> None:
        """Refuse ``node`` (of the traced graph) once it is in the canonical graph: compile reports it with
        the passes' refusals, all at once (``later_issues``)."""
        self.later.append((node, reason, fix, module))

    def later_issues(self) -> list[Issue]:
        """The refusals of ``_refuse``, located at the canonical graph's nodes (for ``ctx.refuse``)."""
        out = []
        for node, reason, fix, module in self.later:
            new = self.env[node]
            issue = issue_at(new, reason, fix, module=module)
            out.append(issue if issue.path else dataclasses.replace(issue, path=_scope(node)))
        if self.temporal:  # time taken from a conv's axis: the layout ops after it follow from that (left_after)
            out = [i for i in out if " along the time or batch axis" not in i.reason
                   and "a transpose of the time and batch axes" not in i.reason]
        return out

    def left_after(self) -> list[tuple[fx.Node, fx.Node]]:
        """(node, conv): the parameter-free ops after a convolution over time, whose axes mean nothing per step.

        They are consequences of that refusal, left unreported (``ctx.leave``)."""
        convs = [self.env[n] for n, reason, _, _ in self.later if reason.startswith("a convolution across time")]
        out, seen = [], set()
        for conv in convs:
            todo = list(conv.users)
            while todo:
                n = todo.pop()
                if n in seen:
                    continue
                seen.add(n)
                todo.extend(n.users)
                if n.op in ("call_function", "call_method"):
                    out.append((n, conv))
        return out

    def _copy_per_step(self, node: fx.Node, lead: int) -> Optional[fx.Node]:
        """Copy ``node`` into the per-step graph, its axis arguments moved to the per-step numbering.

        Returns None (and refuses the node) for an op along the time or batch axis, which has no
        per-step form.
        """
        arg0 = _first_tensor(node)
        dims = dim_args(node, len(_shape(arg0))) if isinstance(arg0, fx.Node) and _shape(arg0) is not None else None
        if dims is None:
            return self.graph.node_copy(node, lambda n: self.env[n])
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        if dims.name in ("stack", "cat", "concat") and isinstance(parts, (list, tuple)) and len(parts) == self.T > 1 \
                and lead == 2 and dims.axes() == [0] and (dims.name == "stack" or all(
                    isinstance(p, fx.Node) and _shape(p) is not None and _shape(p)[0] == 1 for p in parts)):
            # T steps gathered along time: an unrolled loop that fold_time_loops could not fold
            self._refuse(node, f"a loop over the time steps that fxlava cannot fold into one step: {dims.name}() "
                               f"gathers {len(parts)} steps whose computations differ, or read other steps than "
                               f"their own",
                         "compute every step with the same modules and operations from its own step x[t] (or "
                         "x[t:t+1]) and gather them in order, or use the layers in multi-step mode on the whole "
                         "sequence")
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
            self._copy_meta(self.env[node], node, _scope(node), _shape(node), lead)
            return None
        if dims.touches(lead) and dims.name in ENCODING_OPS:
            return self.graph.node_copy(node, lambda n: self.env[n])  # the passes name it as an input encoding
        if dims.touches(lead):
            what = "time or batch axis" if lead == 2 else "batch axis"
            self._refuse(node, f"{dims.name}() along the {what} (the compiled network runs one time step of each "
                               f"sample at a time)",
                         "act on the axes of one sample only (dim >= 2 on [T, N, *], or a negative dim), or "
                         "do this on the host, before the network or after its last spiking layer")
            self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
            self._copy_meta(self.env[node], node, _scope(node), _shape(node), lead)
            return None
        new = self.graph.node_copy(node, lambda n: self.env[n])
        if lead != 1:
            args, kwargs = dims.shifted(lead)
            new.args, new.kwargs = fx.map_arg(args, lambda n: self.env[n]), fx.map_arg(kwargs, lambda n: self.env[n])
        return new

    def _lower_permute(self, node: fx.Node, lead: int) -> bool:
        """Layout-only permutations, dropped: the input's [N, T, *] -> [T, N, *], and a pair that cancels out.

        A permute / transpose / movedim that only exchanges T and N of the model's input means forward()
        takes [N, T, *]: the compiled network takes [T, N, *] (recorded). One that permutes the axes of a
        sample, followed through elementwise modules (neurons, identities) by its inverse, changes
        nothing those modules compute.
        """
        arg0 = node.args[0] if node.args else None
        shape = _shape(arg0) if isinstance(arg0, fx.Node) else None
        perm = permutation(node, len(shape) if shape is not None else None)
        if perm is None or perm == list(range(len(perm))):
            return False
        rank = len(perm)
        if perm[0] >= lead and self._temporal_conv(node, arg0, perm[0], rank):
            self.env[node], self.lead[node] = self.graph.node_copy(node, lambda n: self.env[n]), lead
            self._copy_meta(self.env[node], node, _scope(node), _shape(node), lead)
            return True
        if perm[lead:] == list(range(lead, rank)):  # only T and N move
            if lead == 2 and self._is_input(arg0) and not self.input_transposed:
                self.input_transposed = True
                self.T, self.N = self.N, self.T
                self.env[node], self.lead[node] = self.env[arg0], lead
                return True
            self._refuse(node, "a transpose of the time and batch axes inside the network (SpikingJelly's "
                               "multi-step modules after it would take the batch for time)",
                         "transpose the input before the network (or once, at the start of forward()), or "
                         "after its last spiking layer")
            self.env[node], self.lead[node] = self.graph.node_copy(node, lambda n: self.env[n]), lead
            self._copy_meta(self.env[node], node, _scope(node), _shape(node), lead)
            return True
        if perm[:lead] != list(range(lead)):
            return False  # mixes T or N with a sample's axes: _copy_per_step refuses it
        between, n = [], node
        while len(n.users) == 1:
            n = next(iter(n.users))
            if n.op == "call_module" and (_is_stateful(self.modules[n.target]) or _is_identity(self.modules[n.target])):
                between.append(n)
                continue
            back = permutation(n, rank) if n.args and n.args[0] is (between[-1] if between else node) else None
            if back is not None and [perm[i] for i in back] == list(range(rank)):
                self.unit_close.add(n)
                before = tuple(shape[lead:])
                self.unit_shapes.update((b, before) for b in between)
                self.env[node], self.lead[node] = self.env[arg0], lead
                return True
            return False
        return False

    def _temporal_conv(self, node: fx.Node, src: fx.Node, axis: int, rank: int) -> bool:
        """Refuse the conv whose spatial axis ``axis`` this permute turns into the time axis (a conv over time).

        SpikingJelly's speech_commands example convolves [N, C, T, n_mel] with a kernel 4 steps long in T,
        then transposes T to the front for its neurons: each output step reads several input steps.
        """
        n = src
        while n.op != "placeholder":
            m = self.modules.get(n.target) if n.op == "call_module" else None
            if isinstance(m, nn.Conv2d):
                if axis < rank - 2 or len(_shape(n) or ()) != rank:
                    return False
                k = m.kernel_size[axis - (rank - 2)]
                if m in self.temporal:
                    return True
                self.temporal.add(m)
                self._refuse(
                    n, f"a convolution across time steps: axis {axis} of its output becomes the time axis at "
                       f"{_source_line(node) or node.name}, and its kernel spans {k} steps of it. Loihi's layers "
                       f"see one time step at a time (a netx conv has no synaptic delays), so a temporal "
                       f"convolution is not a per-step feed-forward layer", "give the model [T, N, *] input with "
                       "time first and convolve only the axes of one step (kernel 1 along time), or run the "
                       "temporal convolution off Loihi", module=m)
                return True
            if not n.args or not isinstance(n.args[0], fx.Node):
                return False
            n = n.args[0]
        return False

    def _is_input(self, node: fx.Node) -> bool:
        """The model's input, or a reshape of it that keeps its shape (``x.contiguous()``)."""
        while node.op != "placeholder":
            if node in self.env and self.env[node].op == "placeholder" and node.args:
                node = node.args[0]
                continue
            return False
        return True

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
            first = _first_tensor(node)
            lead = self.lead.get(first, self.input_lead) if first is not None else self.input_lead
            if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
                m = self.modules[node.target]
                if _is_identity(m):
                    self.env[node], self.lead[node] = self.env[arg0], lead
                    self.dropped.append(node.target)
                    continue
                if isinstance(m, self.containers):
                    self.env[node] = self._expand(node.target, self.env[arg0], node, lead)
                elif isinstance(m, nn.Flatten) and (kind := self._reshape(node)) is not None:
                    # start_dim depends on the step mode (Flatten(2) on [T, N, C, H, W]); decide by shapes
                    self._lower_reshape(node, kind, node.target)
                    continue
                else:
                    if lead == 1 and self.input_lead == 2 and _is_stateful(m) and getattr(m, "step_mode", "s") == "m":
                        self._refuse(
                            node, "a multi-step neuron given one time step [N, *] (x[t], or time merged into the "
                                  "batch): SpikingJelly runs it over the first axis as if it were time",
                            "give it x[t:t+1] or x[t].unsqueeze(0) (one step as a sequence), or set it to "
                            "step_mode='s'", module=m)
                    self.env[node] = self._emit_module(node.target, self.env[arg0], node, node.target, _shape(node), lead)
                self.lead[node] = lead
                continue
            if self.folded_loops and isinstance(arg0, (fx.Node, list, tuple)):
                # the folded loop's step select x[0] and stack([y]): per step, both are the identity
                if is_step_select(node) and lead == 2:  # x[0] is one step [N, *]; x[0:1] is [1, N, *]
                    self.env[node], self.lead[node] = self.env[arg0], 1 if isinstance(node.args[1], int) else 2
                    continue
                if is_step_stack(node) and self.lead.get(node.args[0][0]) == (1 if node.target is torch.stack else 2):
                    self.env[node], self.lead[node] = self.env[node.args[0][0]], 2
                    continue
            if self.folded_loops and node.op == "call_function" and node.target is operator.getitem \
                    and node.args[1] in (0, -1) and lead == 2 and _shape(arg0) is not None and _shape(arg0)[0] == 1:
                self.env[node], self.lead[node] = self.env[arg0], 1  # y[0] of a one-step sequence [1, N, *]
                continue
            if node in self.unit_close:  # the reshape or permute that restores the layout a pair's first one changed
                self.env[node], self.lead[node] = self.env[arg0], lead
                continue
            is_reshape = (node.op == "call_function" and node.target in _RESHAPES_FN) or (
                node.op == "call_method" and node.target in _RESHAPE_METHODS)
            if is_reshape:
                kind = self._reshape(node)
                if kind is not None:
                    self._lower_reshape(node, kind, "")
                    continue
                if self._unit_axes_pair(node, lead):
                    self.env[node], self.lead[node] = self.env[arg0], lead
                    continue
            if node.op == "call_function" and _FUNCTIONAL_MODULES.get(node.target) is _dropout \
                    and isinstance(arg0, fx.Node):
                self.env[node], self.lead[node] = self.env[arg0], lead
                self.dropped.append(f"{node.target.__name__}()")
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
            if self._lower_permute(node, lead):
                continue
            # anything else stays as it is (its axes renumbered per step); the passes lower or refuse it
            new = self._copy_per_step(node, lead)
            if new is None:  # refused; kept as it was, for the issue's sake
                self.lead[node] = lead
                continue
            self._copy_meta(new, node, node.target if node.op == "call_module" else _scope(node), _shape(node), lead)
            self.env[node], self.lead[node] = new, lead
        return self.graph



def _fill_shapes(gm: fx.GraphModule, x0: torch.Tensor) -> None:
    """Per-sample shapes for the nodes the canonical form made up (children inside containers), from one step."""
    missing = [n for n in gm.graph.nodes if n.op != "output" and n.meta.get("fxlava_shape") is None]
    if not missing:
        return
    reset_states(gm)
    try:
        propagate_shapes(gm, x0.to(torch.float32))
    except ShapeRunError:  # left to the checks: a graph that cannot run per step is reported there
        return
    finally:
        reset_states(gm)
    for n in missing:
        shape = _shape(n)
        if shape is not None:
            n.meta["fxlava_shape"] = tuple(shape[1:])

