"""Dimension arguments: ops that name tensor axes, rewritten for the per-step graph, and permutations.

A multi-step model's ops see ``[T, N, *]``; the canonical graph runs them once per step on ``[N, *]``.
An axis given as a non-negative number therefore moves down by one (``torch.cat(..., dim=2)`` on
``[T, N, C, H, W]`` is ``dim=1`` per step); a negative one counts from the end and stays. An op along
the time or batch axis itself has no per-step form.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

__all__ = ["DimArgs", "dim_args", "permutation", "PERMUTES"]

# op name -> ((position, keyword, default), ...) of its axis arguments; positions count the tensor
# (a method's self) as 0, so a function and the method of the same name share a row
_AXES = {
    "cat": ((1, "dim", 0),), "concat": ((1, "dim", 0),), "concatenate": ((1, "axis", 0),),
    "stack": ((1, "dim", 0),),
    "chunk": ((2, "dim", 0),), "split": ((2, "dim", 0),), "tensor_split": ((2, "dim", 0),),
    "sum": ((1, "dim", None),), "mean": ((1, "dim", None),), "amax": ((1, "dim", ()),),
    "amin": ((1, "dim", ()),), "softmax": ((1, "dim", None),), "log_softmax": ((1, "dim", None),),
    "transpose": ((1, "dim0", None), (2, "dim1", None)), "swapaxes": ((1, "axis0", None), (2, "axis1", None)),
    "swapdims": ((1, "dim0", None), (2, "dim1", None)),
    "movedim": ((1, "source", None), (2, "destination", None)),
    "moveaxis": ((1, "source", None), (2, "destination", None)),
    "flatten": ((1, "start_dim", 0), (2, "end_dim", -1)), "unflatten": ((1, "dim", None),),
    "unsqueeze": ((1, "dim", None),), "squeeze": ((1, "dim", None),),
}
# the functions whose __name__ is their row (torch.cat, F.softmax, ...); methods are matched by name
_FUNCTIONS = {getattr(torch, k) for k in _AXES if hasattr(torch, k)} | {F.softmax, F.log_softmax}
PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})


def _name(node: fx.Node) -> Optional[str]:
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target
    if node.op == "call_function" and node.target in _FUNCTIONS | {torch.permute}:
        return node.target.__name__
    return None


class DimArgs:
    """The axis arguments of one node: read them, and write them back shifted for the per-step graph."""

    def __init__(self, node: fx.Node, rank: int):
        self.node, self.rank = node, rank
        self.name = _name(node)
        self.slots: list[tuple[Optional[int], str, Any]] = []  # (position or None, keyword, value)
        if self.name == "permute":
            dims = node.kwargs.get("dims", node.args[1:] if len(node.args) > 2 else
                                   (node.args[1] if len(node.args) > 1 else None))
            self.slots.append((None if "dims" in node.kwargs else (1 if len(node.args) == 2 else "*"), "dims",
                               tuple(dims) if dims is not None else None))
            return
        for pos, kw, default in _AXES.get(self.name, ()):
            if pos < len(node.args):
                self.slots.append((pos, kw, node.args[pos]))
            elif kw in node.kwargs:
                self.slots.append((None, kw, node.kwargs[kw]))
            elif default is not None:
                self.slots.append((None, kw, default))  # the default: written out when shifted
            elif self.name in ("sum", "mean", "softmax", "log_softmax"):
                self.slots.append((None, kw, None))  # every axis (or the implicit one): T and N among them

    def axes(self) -> Optional[list[int]]:
        """Every axis the op names, non-negative; None if one is not a constant (or all axes are meant)."""
        out = []
        for _, _, v in self.slots:
            vs = v if isinstance(v, (tuple, list)) else (v,)
            for d in vs:
                if not isinstance(d, int) or isinstance(d, bool):
                    return None
                out.append(d + self.rank if d < 0 else d)
        return out

    def touches(self, lead: int) -> bool:
        """Whether the op acts along one of the ``lead`` leading axes (T, N), or along axes it does not name."""
        axes = self.axes()
        if axes is None:
            return True
        if self.name == "permute":  # names every axis: the leading ones must stay where they are
            return axes[:lead] != list(range(lead))
        return any(a < lead for a in axes)

    def shifted(self, lead: int) -> tuple[tuple, dict]:
        """(args, kwargs) with every non-negative axis moved down by ``lead - 1`` (to one leading axis, N)."""
        args, kwargs = list(self.node.args), dict(self.node.kwargs)
        shift = lead - 1

        def move(v):
            if isinstance(v, (tuple, list)):
                return type(v)(move(d) for d in v)
            return v - shift if isinstance(v, int) and v >= 0 else v

        for pos, kw, v in self.slots:
            if pos == "*":
                args[1:] = [move(d) for d in args[1:]]
            elif pos is not None:
                args[pos] = move(v)
            elif v is not None:
                kwargs[kw] = move(v)
        if self.name == "permute":  # a permutation of the per-step axes: the leading ones dropped, one for N
            dims = self.axes()
            new = [0] + [d - shift for d in dims[lead:]]
            if self.slots[0][0] == "*":
                args[1:] = new
            elif self.slots[0][0] == 1:
                args[1] = tuple(new)
            else:
                kwargs["dims"] = tuple(new)
        return tuple(args), kwargs


def dim_args(node: fx.Node, rank: Optional[int]) -> Optional[DimArgs]:
    """The axis arguments of ``node`` if it is an op that names axes of its first input, else None."""
    if rank is None or _name(node) not in set(_AXES) | {"permute"}:
        return None
    if node.target is operator.getitem:
        return None
    d = DimArgs(node, rank)
    return d if d.slots else None


def permutation(node: fx.Node, rank: Optional[int]) -> Optional[list[int]]:
    """For a permute / transpose / swapaxes / movedim with constant axes, ``perm`` with out.shape[i] = in.shape[perm[i]]."""
    if rank is None or _name(node) not in PERMUTES:
        return None
    sizes = [2 + i for i in range(rank)]  # distinct sizes identify where each axis went
    probe = torch.empty(sizes, device="meta")
    rest, found = node.args[1:], []
    fx.node.map_arg((rest, node.kwargs), found.append)
    if found:  # an axis computed at run time
        return None
    try:
        if node.op == "call_method":
            out = getattr(probe, node.target)(*rest, **node.kwargs)
        else:
            out = node.target(probe, *rest, **node.kwargs)
    except Exception:
        return None
    return [sizes.index(s) for s in out.shape]
