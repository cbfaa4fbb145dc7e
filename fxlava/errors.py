"""Typed errors. Each problem names the node, the module's path and type, the source line and a fix."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch.fx as fx

__all__ = ["Issue", "FxlavaError", "UnsupportedModelError", "PassError", "LavaRunError", "QuantizationWarning",
           "user_stacklevel", "issue_at", "model_order", "in_model_order"]


@dataclass(frozen=True)
class Issue:
    """One reason a model cannot be compiled, located in the user's model."""

    reason: str
    fix: str
    path: str = ""  # qualified module path in the user's model ("" for a function call)
    module_type: str = ""
    node: str = ""
    source: str = ""  # the user's source line, from torch.fx's recorded stack trace
    # position in the model (the traced node's index), so that an error lists problems in model order
    order: Optional[float] = field(default=None, compare=False)
    fx_node: Optional[fx.Node] = field(default=None, compare=False, repr=False)  # the node, while it is in a graph

    def format(self) -> str:
        where = self.path or f"<{self.node}>"
        kind = f" ({self.module_type})" if self.module_type else ""
        lines = [f"  - {where}{kind}"]
        if self.source:
            lines.append(f"      at {self.source}")
        lines.append(f"      fix: {self.fix}")
        return "\n".join(lines)


def _library_frame(frame: str) -> bool:
    if "/torch/" in frame:
        return True
    return "/spikingjelly/" in frame and not any(f"/activation_based/{d}/" in frame for d in ("model", "examples"))


def _source_line(node: fx.Node) -> str:
    """The innermost user frame of the node's recorded stack trace, as 'file:line: code'."""
    trace = node.meta.get("stack_trace") or ""
    frames = [ln.strip() for ln in trace.strip().splitlines()]
    # torch.fx records a Python traceback: 'File "x.py", line N, in f' followed by the code line.
    for i in range(len(frames) - 1, -1, -1):
        # the innermost frame outside torch and SpikingJelly's own plumbing (functional.seq_to_ann_forward,
        # its containers) is the user's line; SpikingJelly's model zoo and examples are a user's models
        if frames[i].startswith("File ") and not _library_frame(frames[i]):
            code = frames[i + 1] if i + 1 < len(frames) and not frames[i + 1].startswith("File ") else ""
            loc = frames[i][len("File "):].replace('", line ', ":").replace('"', "")
            loc = loc.split(", in ")[0]
            return f"{loc}: {code}".rstrip(": ")
    return ""


def issue_at(node: fx.Node, reason: str, fix: str, module=None) -> Issue:
    """An Issue located at ``node`` (its module path, type and source line)."""
    path = node.meta.get("fxlava_path", node.target if node.op == "call_module" else "")
    mtype = ""
    if module is not None:
        mtype = f"{type(module).__module__}.{type(module).__qualname__}"
    elif node.op in ("call_function", "call_method"):
        target = node.target
        mtype = target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))
        mtype = f"{'method' if node.op == 'call_method' else 'function'} {mtype}"
    return Issue(reason=reason, fix=fix, path=str(path), module_type=mtype, node=node.name, source=_source_line(node),
                 order=model_order(node), fx_node=node)


def model_order(node: fx.Node) -> Optional[float]:
    """Where ``node`` sits in the user's model: its index in the traced graph (kept through rewrites)."""
    order = node.meta.get("fxlava_order")
    if order is None and node.graph is not None:
        # a node a pass made without copying meta: just after the nearest traced node before it
        prev = node.prev
        while prev.op != "root" and prev.meta.get("fxlava_order") is None:
            prev = prev.prev
        order = prev.meta.get("fxlava_order", -1) + 0.5 if prev.op != "root" else None
    return order


def in_model_order(issues: Iterable[Issue]) -> list[Issue]:
    """``issues`` sorted by their place in the model (issues without one first, in their given order)."""
    issues = list(issues)
    return sorted(issues, key=lambda i: -1 if i.order is None else i.order)


class FxlavaError(Exception):
    """Base class of every error fxlava raises on purpose."""


class UnsupportedModelError(FxlavaError):
    """The model uses something Loihi (through netx) cannot express; lists every offending module."""

    def __init__(self, issues: Iterable[Issue], header: Optional[str] = None):
        self.issues = in_model_order(issues)
        n = len(self.issues)
        head = header or f"fxlava cannot compile this model: {n} unsupported item{'s' if n != 1 else ''}"
        parts = [head + "."]
        # grouped by reason; the groups in the order their first item appears in the model
        groups: dict[str, list[Issue]] = {}
        for issue in self.issues:
            groups.setdefault(issue.reason, []).append(issue)
        for reason, group in groups.items():
            parts.append(f"\n{reason}:")
            parts.extend(issue.format() for issue in group)
        super().__init__("\n".join(parts))


class PassError(FxlavaError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, ran_before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.ran_before = list(ran_before)
        before = ", ".join(ran_before) if ran_before else "none"
        super().__init__(
            f"pass '{pass_name}' failed (passes run before it: {before}): {type(cause).__name__}: {cause}"
        )


class LavaRunError(FxlavaError):
    """Lava could not run a netx file: netx refused it, a Lava process died, or the run overran its time budget.

    ``path`` is the file, ``layer`` the netx layer index (``/layer/<layer>``) when one is to blame.
    """

    def __init__(self, message: str, path: str = "", layer: Optional[int] = None):
        self.path = path
        self.layer = layer
        super().__init__(message)


class QuantizationWarning(UserWarning):
    """Loihi's fixed-point formats lose much of a layer (e.g. many weights round to zero); it still compiles."""


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the caller that names the user's line calling into fxlava.

    The warning is attributed to the caller of the outermost fxlava frame on the stack (the user's
    ``fxlava.compile(...)`` line, or the line calling a pass directly), however deep inside the
    pipeline it is raised and whatever frames (decorators, a user's pass) lie in between: the same
    aim as pandas' ``find_stack_level`` and Python 3.12's ``skip_file_prefixes``.
    """
    frame, level, outermost = sys._getframe(1), 1, 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "fxlava" or name.startswith("fxlava."):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1
