"""Stage 1: torch.fx tracing of a copy of the user's model.

Leaves of the trace are the modules fxlava lowers as a whole: SpikingJelly neurons (and user
subclasses of them), every other stateful module, SpikingJelly's layers and step containers, and
torch.nn's own layers. Everything else (SpikingJelly's model classes such as
``spiking_resnet.BasicBlock``, the examples' blocks, ``nn.Sequential`` subclasses with a forward of
their own, the user's blocks) is traced into, so that each operation inside becomes a node.

Shape queries are answered from the example input while tracing, the way HuggingFace
transformers' fx tracer answers them from meta tensors: every proxy carries the value its
operation has on the example, so ``x.shape``, ``x.ndim``, ``x.dim()``, ``x.size()``, ``len(x)``
and iterating over ``x`` give plain Python numbers (or, for iteration, one proxy per slice). Static
shape checks (``if x.ndim == 5``) and Python loops over a known T then trace; the graph is
specialised to the example's rank and T, which ``trace`` records.
"""
from __future__ import annotations

import os
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_aggregate

from fxlava.frontend.shapes import record_shape

__all__ = ["SpikingTracer", "UntraceableError", "user_frame"]

_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


def _is_spikingjelly(m: nn.Module) -> bool:
    return type(m).__module__.startswith("spikingjelly.")


def _is_neuron_subclass(m: nn.Module) -> bool:
    """A user's subclass of a SpikingJelly neuron: a leaf, so that substitute_neurons names it."""
    from fxlava.target import is_neuron

    return is_neuron(m)


def _compiled_by_type(m: nn.Module) -> bool:
    """A module (or a user's subclass of one) that a pass compiles by its type: a leaf, so that the pass
    sees it and lower_module_subclasses can check that it computes what its type computes."""
    from fxlava.target import ADAPTIVE_POOLS, AVG_POOLS, FLATTENS, IDENTITIES, MAX_POOLS, NORMS, SYNAPSES

    return isinstance(m, SYNAPSES + AVG_POOLS + MAX_POOLS + ADAPTIVE_POOLS + FLATTENS + NORMS + IDENTITIES)


def is_sj_leaf(m: nn.Module) -> bool:
    """SpikingJelly modules fxlava lowers (or refuses) whole: stateful modules, layers and step containers."""
    from spikingjelly.activation_based import base

    from fxlava.target import is_stateful

    if _is_neuron_subclass(m) or isinstance(m, base.MemoryModule) or is_stateful(m):
        return True
    # SpikingJelly's layers and containers are step modules; its model classes and blocks are not
    return _is_spikingjelly(m) and isinstance(m, base.StepModule)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRONTEND_DIR = os.path.dirname(__file__) + os.sep


def _in_torch(filename: str) -> bool:
    return filename.startswith(_TORCH_DIR)


def user_frame(tb) -> str:
    """'file:line: code' of the innermost frame of a traceback outside torch and fxlava (the user's line)."""
    for frame in reversed(traceback.extract_tb(tb)):
        if _in_torch(frame.filename) or frame.filename.startswith(_FRONTEND_DIR):
            continue
        return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}".rstrip(": ")
    return ""


class UntraceableError(Exception):
    """A construct in the user's forward() that torch.fx cannot trace, even with shapes answered."""

    def __init__(self, construct: str, source: str, cause: BaseException):
        self.construct, self.source, self.cause = construct, source, cause
        super().__init__(f"{construct} at {source or '<unknown line>'}: {type(cause).__name__}: {cause}")


class _ValueProxy(fx.Proxy):
    """A proxy that also holds its operation's value on the example input, to answer shape queries."""

    def _value(self) -> Optional[torch.Tensor]:
        v = self.__dict__.get("_fxlava_value")
        return v if isinstance(v, torch.Tensor) else None

    def __getattr__(self, k: str):
        v = self.__dict__.get("_fxlava_value")
        if k in _SHAPE_ATTRS and isinstance(v, torch.Tensor):
            self.tracer.shape_queries.append(k)
            return getattr(v, k)
        return super().__getattr__(k)

    def size(self, dim: Optional[int] = None):
        v = self._value()
        if v is None:
            return self.tracer.create_proxy("call_method", "size", (self,) + ((dim,) if dim is not None else ()), {})
        self.tracer.shape_queries.append("size()")
        return v.size() if dim is None else v.size(dim)

    def dim(self):
        v = self._value()
        if v is None:
            return self.tracer.create_proxy("call_method", "dim", (self,), {})
        self.tracer.shape_queries.append("dim()")
        return v.dim()

    def __len__(self) -> int:
        v = self._value()
        if v is None:
            return super().__len__()
        self.tracer.shape_queries.append("len()")
        return len(v)

    def __iter__(self):
        v = self.__dict__.get("_fxlava_value")
        if isinstance(v, (tuple, list)):  # q, k, v = x.chunk(3): one proxy per element
            return iter([self[i] for i in range(len(v))])
        if isinstance(v, torch.Tensor) and v.dim() > 0:  # for x_t in x_seq: one proxy per time step
            self.tracer.shape_queries.append("iteration")
            return iter([self[i] for i in range(v.shape[0])])
        return self.tracer.iter(self)  # raises: a value tracing does not know


def _value_of(a: Any) -> Any:
    if isinstance(a, fx.proxy.Attribute):
        root = _value_of(a.root)
        return getattr(root, a.attr) if root is not None else None
    if isinstance(a, fx.Proxy):
        return a.__dict__.get("_fxlava_value")
    return a


class _NoValue(Exception):
    pass


class SpikingTracer(fx.Tracer):
    """Keeps SpikingJelly neurons, layers and containers (and torch.nn layers) as leaf modules; traces into the rest.

    Given ``example_inputs`` (the values of forward()'s arguments), it runs every operation on them
    while tracing and answers shape queries from the results.
    """

    def __init__(self, example_inputs: tuple = ()):
        super().__init__()
        self.record_stack_traces = True
        self.example_inputs = list(example_inputs)
        self.shape_queries: list[str] = []
        self.complete = True  # every operation ran on the example: the nodes' shapes are all recorded
        # True while an operation runs on the example's values: fx's patched Module.__call__ and
        # __getattr__ then call and return as plain PyTorch, instead of recording (see create_proxy)
        self._plain = False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_sj_leaf(m) or _compiled_by_type(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _filter_traceback_frames(self, summary):
        # the recorded stack ends in the user's line, not in this tracer's overrides
        summary = super()._filter_traceback_frames(summary)
        return traceback.StackSummary.from_list([f for f in summary if f.filename != __file__])

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._plain:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache):
        if self._plain:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def _run(self, kind: str, target, args, kwargs) -> Any:
        """The value of one operation on the example's values (None where it cannot be computed)."""
        if kind == "placeholder":
            return self.example_inputs.pop(0) if self.example_inputs else None
        if kind == "get_attr":
            obj = self.root
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        if kind not in ("call_function", "call_method", "call_module"):
            return None

        def value(a):
            v = _value_of(a)
            if v is None and isinstance(a, fx.Proxy):
                raise _NoValue
            return v

        a, kw = map_aggregate(args, value), map_aggregate(kwargs, value)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **kw)
        if kind == "call_method":
            if target.endswith("_") and not target.endswith("__") and isinstance(args[0], torch.Tensor):
                # an in-place op on a constant (count = torch.zeros(...); count += y): the graph keeps that
                # tensor as its constant, so running it here must not change it
                a = (a[0].clone(),) + tuple(a[1:])
            return getattr(a[0], target)(*a[1:], **kw)
        return target(*a, **kw)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, fx.Proxy):
            try:
                # run the op as plain PyTorch: fx's patches stay in place (reverting and reapplying them
                # around every op cost more than a large model's convolutions), and pass calls through
                self._plain = True
                with torch.no_grad():
                    value = self._run(kind, target, args, kwargs)
            except Exception:  # no value: shape queries on it fall back to torch.fx (and fail there, named)
                value = None
                self.complete = False
            finally:
                self._plain = False
            proxy.__dict__["_fxlava_value"] = value
            if kind != "placeholder" or value is not None:
                record_shape(proxy.node, value)
        return proxy

    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        except Exception as exc:
            raise UntraceableError(_construct(exc), user_frame(exc.__traceback__), exc) from exc


def _construct(exc: BaseException) -> str:
    """What in the user's code torch.fx could not trace, in words."""
    text = str(exc)
    if not isinstance(exc, fx.proxy.TraceError) and "Proxy" not in text and "symbolic" not in text:
        return f"forward() raised {type(exc).__name__} on the example input ({text})"
    if "iterated" in text:
        return "iterating over a value whose length tracing does not know"
    if "control flow" in text:
        return "Python control flow (if, while, bool()) on a tensor's values"
    if "iterable" in text or "iteration" in text:
        return "iterating over a tensor whose value tracing does not know"
    if "len" in text:
        return "len() of a value tracing does not know"
    return f"a Python construct torch.fx cannot trace ({type(exc).__name__})"
