"""The pass API: a pass is a function ``(gm, ctx) -> result``; a Pipeline is an ordered, printable list."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx

from fxlava.errors import Issue, PassError, UnsupportedModelError, issue_at
from fxlava.options import CompileOptions

__all__ = ["CompileContext", "PassResult", "Pass", "Pipeline", "as_pass"]

log = logging.getLogger(__name__)


@dataclass
class CompileContext:
    """What every pass may read (example input, step mode, shapes, options) and where it refuses nodes."""

    example_input: torch.Tensor  # [T, N, *] spikes, SpikingJelly's multi-step layout
    step_mode: str  # the user's model: 's' (single-step) or 'm' (multi-step)
    input_shape: tuple  # per-sample shape of the input, e.g. (C, H, W)
    options: CompileOptions = field(default_factory=CompileOptions)
    records: list = field(default_factory=list)  # (pass name, message) lines, for the CLI and debugging
    issues: list = field(default_factory=list)  # every node refused so far, as Issues

    def __post_init__(self):
        if isinstance(self.options, dict):
            self.options = CompileOptions.from_kwargs(**self.options)

    def record(self, pass_name: str, message: str) -> None:
        """Note what a pass did; shown by the CLI and logged at debug level."""
        self.records.append((pass_name, message))
        log.debug("%s: %s", pass_name, message)

    def refuse(self, what: Union[fx.Node, Issue, Iterable[Issue]], reason: str = "", fix: str = "",
               module: Optional[torch.nn.Module] = None) -> None:
        """Refuse a node: ``refuse(node, reason, fix, module)``, or ``refuse(issues)`` with Issues from issue_at.

        The node stays in the graph, marked; later passes leave it alone and do not report what
        follows from it, and compile raises one UnsupportedModelError with every refusal at the end.
        """
        if isinstance(what, fx.Node):
            issues = [issue_at(what, reason, fix, module=module)]
        elif isinstance(what, Issue):
            issues = [what]
        else:
            issues = list(what)
        for issue in issues:
            if issue not in self.issues:  # the same problem found twice (a check and its pass) counts once
                self.issues.append(issue)
            if issue.fx_node is not None:
                issue.fx_node.meta.setdefault(_REFUSED, issue.reason)

    def leave(self, node: fx.Node, because: fx.Node) -> None:
        """Leave ``node`` unlowered because a node it depends on (``because``) was refused; not reported."""
        node.meta.setdefault(_LEFT, because.name)

    @staticmethod
    def is_refused(node: fx.Node) -> bool:
        """True for a node some pass refused."""
        return _REFUSED in node.meta

    @staticmethod
    def is_settled(node: fx.Node) -> bool:
        """True for a node refused, or left unlowered because of a refused node: nothing more to report."""
        return _REFUSED in node.meta or _LEFT in node.meta


_REFUSED = "fxlava_refused"  # node.meta key: the reason it was refused
_LEFT = "fxlava_left_for"  # node.meta key: the refused node it was left in place for


@dataclass
class PassResult:
    """What a pass returns: the graph module and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool = True


PassFn = Callable[[fx.GraphModule, CompileContext], Union[None, fx.GraphModule, PassResult]]
CheckFn = Callable[[fx.GraphModule, CompileContext], Iterable[Issue]]


@dataclass(frozen=True)
class Pass:
    """A named pass. ``check``, if given, lists what the pass would refuse on a graph, changing nothing.

    The pipeline runs ``fn`` alone: a pass decides legality on the graph it receives and refuses
    nodes through ``ctx.refuse``; ``check`` is for tools and tests that ask without rewriting.
    """

    name: str
    fn: PassFn
    check: Optional[CheckFn] = None

    @property
    def doc(self) -> str:
        text = (self.fn.__doc__ or "").strip()
        return text.splitlines()[0] if text else ""

    def __call__(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        out = self.fn(gm, ctx)
        if out is None:  # a pass that edits gm in place and returns nothing
            return PassResult(gm, True)
        if isinstance(out, fx.GraphModule):
            return PassResult(out, True)
        if isinstance(out, PassResult):
            return out
        raise TypeError(f"pass '{self.name}' returned {type(out).__name__}; expected None, a GraphModule or PassResult")


def as_pass(p: Union[Pass, PassFn], name: Optional[str] = None) -> Pass:
    """Wrap a plain function as a Pass named after it (or ``name``)."""
    if isinstance(p, Pass):
        return p if name is None else Pass(name, p.fn, p.check)
    if not callable(p):
        raise TypeError(f"a pass must be callable as fn(graph_module, ctx); got {p!r}")
    return Pass(name or getattr(p, "__name__", type(p).__name__), p, getattr(p, "check", None))


class Pipeline:
    """An ordered list of passes. Editing returns a new Pipeline; nothing global is mutated."""

    def __init__(self, passes: Iterable[Union[Pass, PassFn]] = ()):
        self._passes: tuple[Pass, ...] = tuple(as_pass(p) for p in passes)
        names = [p.name for p in self._passes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pass names must be unique in a pipeline; repeated: {sorted(dup)}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._passes]

    def __iter__(self):
        return iter(self._passes)

    def __len__(self):
        return len(self._passes)

    def __getitem__(self, name: str) -> Pass:
        return self._passes[self._index(name)]

    def __str__(self) -> str:
        width = max((len(p.name) for p in self._passes), default=0)
        return "\n".join(f"{i + 1:2d}. {p.name:<{width}}  {p.doc}" for i, p in enumerate(self._passes))

    def __repr__(self) -> str:
        return f"Pipeline({self.names})"

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no pass named '{name}' in the pipeline; passes: {', '.join(self.names)}") from None

    def _with(self, passes: Sequence[Pass]) -> "Pipeline":
        return Pipeline(passes)

    def insert_before(self, name: str, p: Union[Pass, PassFn]) -> "Pipeline":
        """A copy with ``p`` inserted before the pass called ``name``."""
        i = self._index(name)
        return self._with(self._passes[:i] + (as_pass(p),) + self._passes[i:])

    def insert_after(self, name: str, p: Union[Pass, PassFn]) -> "Pipeline":
        """A copy with ``p`` inserted after the pass called ``name``."""
        i = self._index(name) + 1
        return self._with(self._passes[:i] + (as_pass(p),) + self._passes[i:])

    def append(self, p: Union[Pass, PassFn]) -> "Pipeline":
        """A copy with ``p`` added at the end."""
        return self._with(self._passes + (as_pass(p),))

    def replace(self, name: str, p: Union[Pass, PassFn]) -> "Pipeline":
        """A copy with the pass called ``name`` replaced by ``p``."""
        i = self._index(name)
        return self._with(self._passes[:i] + (as_pass(p),) + self._passes[i + 1:])

    def remove(self, name: str) -> "Pipeline":
        """A copy without the pass called ``name``."""
        i = self._index(name)
        return self._with(self._passes[:i] + self._passes[i + 1:])

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        """Run the passes in order, linting and recompiling the graph after each.

        A pass refuses nodes through ``ctx.refuse`` and the pipeline goes on, so every problem of the
        model is found in one run; at the end one UnsupportedModelError lists them all, in model
        order. (A pass that raises UnsupportedModelError itself has its issues collected the same way.)
        """
        ran: list[str] = []
        for p in self._passes:
            try:
                try:
                    result = p(gm, ctx)
                except UnsupportedModelError as exc:  # a pass that raises its refusals instead of ctx.refuse
                    ctx.refuse(exc.issues)
                    result = PassResult(gm, False)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
            except Exception as exc:
                error = PassError(p.name, ran, exc)
                if ctx.issues:  # most likely a consequence of a refused node: report the refusals
                    refused = UnsupportedModelError(ctx.issues)
                    refused.add_note(f"(then {error})")
                    raise refused from exc
                raise error from exc
            ctx.record(p.name, "changed the graph" if result.modified else "no change")
            ran.append(p.name)
        if ctx.issues:
            raise UnsupportedModelError(ctx.issues)
        return gm
