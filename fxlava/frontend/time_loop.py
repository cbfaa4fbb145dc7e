"""Time loops: a forward() that calls modules once per time step and gathers the outputs.

    out = [self.net(x[t]) for t in range(x.shape[0])]     # single-step modules; or: for x_t in x: ...
    return torch.stack(out)

    out = [self.net(x[t:t + 1]) for t in range(T)]         # multi-step modules, one step at a time
    return torch.cat(out)                                  # (or x[t].unsqueeze(0), and torch.stack(out))

    out = 0                                                # a spike count over the steps, then a rate:
    for t in range(T):                                     # the chain of adds is rewritten first as
        out = out + self.net(x[t])                         # stack([...]).sum(0), whose sum and whatever
    return out / T                                         # follows it then run as net.readout

Traced on the example (T known), the loop is unrolled into T copies of the same per-step chain,
each starting at ``x[t]`` (or ``x[t:t+1]``) and ending in one ``torch.stack`` (or ``torch.cat``)
along the time axis. A SpikingJelly module keeps its state between calls in either step mode, so
that is exactly the per-step graph fxlava's canonical form runs once per step: the T copies are
folded into the first one. ``x[0]`` (``x[0:1]``) and ``stack([y_0])`` (``cat([y_0])``) remain, and
the canonical form reads them as a step select and its inverse.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxlava.frontend.shapes import record_shape

__all__ = ["fold_time_loops", "is_step_select", "is_step_stack", "static_input_loop"]


def _data_inputs(n: fx.Node, live: set) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a in live]


def _step_index(n: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(sequence, t) for ``seq[t]`` with an integer t, ``seq[t:t+1]`` or ``seq.select(0, t)``, else None.

    SpikingJelly's ``functional.multi_step_forward`` takes each step with ``x_seq.select(0, t)``.
    """
    if (n.op == "call_method" and n.target == "select") or (n.op == "call_function" and n.target is torch.select):
        if len(n.args) == 3 and not n.kwargs and isinstance(n.args[0], fx.Node) and n.args[1] == 0 \
                and isinstance(n.args[2], int) and not isinstance(n.args[2], bool):
            return n.args[0], n.args[2]
        return None
    if n.op != "call_function" or n.target is not operator.getitem or not isinstance(n.args[0], fx.Node):
        return None
    i = n.args[1]
    if isinstance(i, int) and not isinstance(i, bool):
        return n.args[0], i
    if isinstance(i, slice) and isinstance(i.start, int) and i.stop == i.start + 1 and i.step in (None, 1):
        return n.args[0], i.start
    return None


_GATHERS = (torch.stack, torch.cat, torch.concat)


def _stack_dim(n: fx.Node) -> Optional[int]:
    """The axis of a ``torch.stack`` / ``torch.cat`` of a list, else None."""
    if n.op != "call_function" or n.target not in _GATHERS or not n.args or not isinstance(n.args[0], (list, tuple)):
        return None
    return n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)


def _depends_on_input(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes computed from the model's input (the rest are constants: parameters, ``torch.zeros(...)``)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _signature(n: fx.Node, prev: Optional[fx.Node]):
    def arg(a):
        if isinstance(a, fx.Node):
            return "<prev>" if a is prev else (a.op, str(a.target))
        return repr(a)

    return n.op, n.target, tuple(fx.node.map_aggregate(n.args, arg)), repr(sorted(
        (k, fx.node.map_aggregate(v, arg)) for k, v in n.kwargs.items()))


def _chain(end: fx.Node, live: set) -> Optional[tuple[fx.Node, int, list[fx.Node]]]:
    """Walk back from one stacked element to ``seq[t]``: (seq, t, [seq[t], ..., end]) if it is a plain chain."""
    nodes = [end]
    n = end
    # the select of the loop's step reads the sequence every copy reads; a y[0] inside the chain (of a
    # one-step sequence [1, N, *]) reads a node of this copy alone and is part of the chain
    while (idx := _step_index(n)) is None or len(idx[0].users) == 1:
        ins = _data_inputs(n, live)
        if len(ins) != 1 or len(ins[0].users) != 1:
            return None
        n = ins[0]
        nodes.append(n)
    return idx[0], idx[1], nodes[::-1]


_ADDS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_", "__add__", "__iadd__", "__radd__")
_ZEROS = (torch.zeros, torch.zeros_like)


def _is_add(n) -> bool:
    """``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add_(b)`` (no ``alpha``)."""
    return isinstance(n, fx.Node) and len(n.args) == 2 and not n.kwargs and (
        (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in _ADD_METHODS))


def _is_zero(gm: fx.GraphModule, a, live: set) -> bool:
    """The start of an accumulation: the number 0, or zeros that read no input (``torch.zeros(...)``, or the
    constant tensor that a ``torch.zeros(x.shape[1], ...)`` of known shape becomes when traced)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a == 0
    if not isinstance(a, fx.Node) or a in live:
        return False
    if a.op == "get_attr":
        value = getattr(gm, a.target, None)
        return isinstance(value, torch.Tensor) and not value.any()
    return a.op == "call_function" and a.target in _ZEROS


def _accumulation(gm: fx.GraphModule, last: fx.Node, live: set) -> Optional[tuple[list[fx.Node], list[fx.Node]]]:
    """``((0 + y_0) + y_1) + ...`` ending at ``last``: (the adds, first to last; the y_t), else None."""
    adds, ys, n = [], [], last
    while _is_add(n):
        a, b = n.args
        # the running sum is the operand that is itself such an add (used by this one only), or the start
        prev = next((o for o in (a, b) if _is_add(o) and len(o.users) == 1), None)
        if prev is not None:
            adds.append(n)
            ys.append(b if prev is a else a)
            n = prev
            continue
        adds.append(n)
        if _is_zero(gm, a, live) and isinstance(b, fx.Node):
            ys.append(b)
        elif _is_zero(gm, b, live) and isinstance(a, fx.Node):
            ys.append(a)
        elif isinstance(a, fx.Node) and isinstance(b, fx.Node):
            ys.extend([b, a])  # out = y_0 (no start), then out = out + y_1
        else:
            return None
        return adds[::-1], ys[::-1]
    return None


def _every_step_once(chains: list) -> bool:
    """The chains (from ``_chain``) start at steps 0, 1, ..., T-1 of one sequence of T steps, in order."""
    if len(chains) < 2 or any(c is None for c in chains):
        return False
    seq = chains[0][0]
    shape = getattr(seq.meta.get("tensor_meta"), "shape", None)
    return shape is not None and shape[0] == len(chains) and all(c[0] is seq for c in chains) \
        and [c[1] for c in chains] == list(range(len(chains)))


def _stack_accumulations(gm: fx.GraphModule, live: set) -> int:
    """Rewrite a running sum over the steps, ``out = out + f(x[t])``, as ``stack([f(x[0]), ...]).sum(0)``.

    A forward() that accumulates its output spikes over a loop (a spike count, then a rate) computes
    the same numbers: the spikes are whole numbers, so the order of the sums changes nothing. Only a
    sum over every step of one sequence, each term a plain chain from its own step, is rewritten;
    fold_time_loops then folds the stack like any other.
    """
    rewritten, seen = 0, set()
    for last in reversed(list(gm.graph.nodes)):  # the last add of a sum comes first
        if last in seen or not _is_add(last) or last not in live:
            continue
        found = _accumulation(gm, last, live)
        if found is None:
            continue
        adds, ys = found
        seen.update(adds)
        y_meta = ys[-1].meta.get("tensor_meta")
        if y_meta is None or not _every_step_once([_chain(y, live) if y in live else None for y in ys]):
            continue
        with gm.graph.inserting_after(last):
            stack = gm.graph.call_function(torch.stack, (list(ys),))
        with gm.graph.inserting_after(stack):
            total = gm.graph.call_method("sum", (stack, 0))
        y = torch.empty(tuple(y_meta.shape), dtype=y_meta.dtype, device="meta")
        for node, value in ((stack, torch.stack([y] * len(ys))), (total, y)):
            node.meta.update({k: v for k, v in last.meta.items() if k in ("stack_trace", "nn_module_stack")})
            record_shape(node, value)
        last.replace_all_uses_with(total)
        for n in reversed(adds):
            start = [a for a in n.args if isinstance(a, fx.Node) and a not in live]
            gm.graph.erase_node(n)
            for a in start:  # the zeros it started from
                if not a.users:
                    gm.graph.erase_node(a)
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten


def fold_time_loops(gm: fx.GraphModule) -> int:
    """Fold every unrolled per-step loop ``stack([f(x[0]), ..., f(x[T-1])])`` into ``stack([f(x[0])])``.

    Likewise ``cat([f(x[0:1]), ..., f(x[T-1:T])])``. Only exact copies are folded: the same modules and
    operations in the same order, each reading only its own step of the same sequence (and constants),
    and covering every step of it. Returns how many loops were folded.
    """
    folded, live = 0, _depends_on_input(gm)
    _stack_accumulations(gm, live)
    for stack in [n for n in gm.graph.nodes if _stack_dim(n) == 0]:
        ends = list(stack.args[0])
        chains = [_chain(e, live) if isinstance(e, fx.Node) else None for e in ends]
        if not _every_step_once(chains):
            continue
        if stack.target is not torch.stack and any(getattr(e.meta.get("tensor_meta"), "shape", (None,))[0] != 1
                                                    for e in ends):
            continue  # a cat of whole steps [1, N, *] is a gather over time; of anything else it is not
        sigs = [[_signature(n, c[2][i - 1] if i else None) for i, n in enumerate(c[2][1:], 1)] for c in chains]
        if any(s != sigs[0] for s in sigs[1:]):
            continue
        stack.args = ([ends[0]],) + tuple(stack.args[1:])
        for _, _, nodes in reversed(chains[1:]):
            for n in reversed(nodes):
                gm.graph.erase_node(n)
        folded += 1
    if folded:
        gm.recompile()
    return folded


def static_input_loop(gm: fx.GraphModule) -> Optional[tuple[fx.Node, int]]:
    """(first call, copies) when forward() runs the same chain of operations several times on its input itself.

    That is a loop over time steps that feeds every step the same static input
    (``for t in range(self.T): out = out + self.net(x)``): the first layer reads real values each
    step. Only identical chains of at least two operations, each starting at the input, count.
    """
    x = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if x is None:
        return None
    groups: dict = {}
    for u in x.users:
        groups.setdefault(_signature(u, x), []).append(u)
    for starts in groups.values():
        if len(starts) < 2:
            continue
        sigs = []
        for start in starts:
            chain, n = [_signature(start, x)], start
            while len(n.users) == 1 and len(chain) < 64:
                (nxt,) = n.users
                if len(nxt.all_input_nodes) != 1:
                    break
                chain.append(_signature(nxt, n))
                n = nxt
            sigs.append(chain)
        common = min(len(c) for c in sigs)  # the chains end where the loop's own bookkeeping starts
        if common >= 2 and all(c[:common] == sigs[0][:common] for c in sigs[1:]):
            return starts[0], len(starts)
    return None


def is_step_select(node: fx.Node) -> bool:
    """``seq[0]`` or ``seq[0:1]`` left by fold_time_loops (one step of the sequence)."""
    idx = _step_index(node)
    return idx is not None and idx[1] == 0 and any(
        _stack_dim(u) == 0 and len(u.args[0]) == 1 for u in _descendants(node))


def is_step_stack(node: fx.Node) -> bool:
    """``stack([y])`` or ``cat([y])`` left by fold_time_loops (the per-step output, gathered over time)."""
    return _stack_dim(node) == 0 and len(node.args[0]) == 1 and isinstance(node.args[0][0], fx.Node)


def _descendants(node: fx.Node):
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
                yield u
