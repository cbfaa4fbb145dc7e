"""Time loops: a forward() that calls modules once per time step and gathers the outputs.

    out = [self.net(x[t]) for t in range(x.shape[0])]     # single-step modules; or: for x_t in x: ...
    return torch.stack(out)

    out = [self.net(x[t:t + 1]) for t in range(T)]         # multi-step modules, one step at a time
    return torch.cat(out)                                  # (or x[t].unsqueeze(0), and torch.stack(out))

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

__all__ = ["fold_time_loops", "is_step_select", "is_step_stack"]


def _data_inputs(n: fx.Node, live: set) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if a in live]


def _step_index(n: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(sequence, t) for ``seq[t]`` with an integer t, or ``seq[t:t+1]``, else None."""
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


def fold_time_loops(gm: fx.GraphModule) -> int:
    """Fold every unrolled per-step loop ``stack([f(x[0]), ..., f(x[T-1])])`` into ``stack([f(x[0])])``.

    Likewise ``cat([f(x[0:1]), ..., f(x[T-1:T])])``. Only exact copies are folded: the same modules and
    operations in the same order, each reading only its own step of the same sequence (and constants),
    and covering every step of it. Returns how many loops were folded.
    """
    folded, live = 0, _depends_on_input(gm)
    for stack in [n for n in gm.graph.nodes if _stack_dim(n) == 0]:
        ends = list(stack.args[0])
        chains = [_chain(e, live) if isinstance(e, fx.Node) else None for e in ends]
        if len(ends) < 2 or any(c is None for c in chains):
            continue
        seq = chains[0][0]
        shape = getattr(seq.meta.get("tensor_meta"), "shape", None)
        if shape is None or shape[0] != len(ends) or any(c[0] is not seq for c in chains) \
                or [c[1] for c in chains] != list(range(len(ends))):
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
