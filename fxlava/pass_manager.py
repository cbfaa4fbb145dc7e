"""The pass API: a pass is a function ``(gm, ctx) -> result``; a Pipeline is an ordered, printable list."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx

from fxlava.errors import FxlavaError, Issue, PassError, UnsupportedModelError

__all__ = ["CompileContext", "PassResult", "Pass", "Pipeline", "as_pass"]

log = logging.getLogger(__name__)


@dataclass
class CompileContext:
    """What every pass may read: the example input, the model's step mode and shapes, and a log."""

    example_input: torch.Tensor  # [T, N, *] spikes, SpikingJelly's multi-step layout
    step_mode: str  # the user's model: 's' (single-step) or 'm' (multi-step)
    input_shape: tuple  # per-sample shape of the input, e.g. (C, H, W)
    options: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # (pass name, message) lines, for the CLI and debugging

    def record(self, pass_name: str, message: str) -> None:
        """Note what a pass did; shown by the CLI and logged at debug level."""
        self.records.append((pass_name, message))
        log.debug("%s: %s", pass_name, message)


@dataclass
class PassResult:
    """What a pass returns: the graph module and whether it changed anything."""

    graph_module: fx.GraphModule
    modified: bool = True


PassFn = Callable[[fx.GraphModule, CompileContext], Union[None, fx.GraphModule, PassResult]]
CheckFn = Callable[[fx.GraphModule, CompileContext], Iterable[Issue]]


@dataclass(frozen=True)
class Pass:
    """A named pass; ``check`` lists, before anything runs, every node the pass will refuse."""

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

    def issues(self, gm: fx.GraphModule, ctx: CompileContext) -> list[Issue]:
        """Every problem the passes' up-front checks find, in pipeline order."""
        return [i for p in self._passes if p.check is not None for i in p.check(gm, ctx)]

    def check(self, gm: fx.GraphModule, ctx: CompileContext, extra: Iterable[Issue] = ()) -> None:
        """Run every pass's up-front check and raise one error listing every problem found."""
        issues = list(extra) + self.issues(gm, ctx)
        if issues:
            raise UnsupportedModelError(issues)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        """Run the passes in order, linting and recompiling the graph after each."""
        ran: list[str] = []
        for p in self._passes:
            try:
                result = p(gm, ctx)
                gm = result.graph_module
                gm.graph.lint()
                gm.recompile()
            except FxlavaError as exc:
                if isinstance(exc, UnsupportedModelError):
                    exc.add_note(f"(raised by pass '{p.name}'; passes run before it: {', '.join(ran) or 'none'})")
                    raise
                raise PassError(p.name, ran, exc) from exc
            except Exception as exc:
                raise PassError(p.name, ran, exc) from exc
            ctx.record(p.name, "changed the graph" if result.modified else "no change")
            ran.append(p.name)
        return gm
