"""Whether a module computes what the class fxlava compiles it as computes.

fxlava matches modules by type (a ``Conv2d`` becomes a conv synapse, an ``LIFNode`` a CUBA neuron).
A subclass inherits that type but may compute something else: SpikingJelly's ``WSConv2d``
standardises its weight in ``forward``; a user's ``LIFNode`` subclass may override
``neuronal_charge``. A subclass computes what its base computes when it overrides none of the
base's *compute methods*: ``forward`` and every method of the base that ``forward`` reaches, found
by following the attribute names its bytecode loads (``Conv2d.forward`` -> ``_conv_forward``).
That closure over-approximates (a name that is loaded is counted whether or not it is called), so
a subclass is never taken for its base wrongly; SpikingJelly's documented neuron hooks count too,
whether or not this SpikingJelly version's ``forward`` calls them.

SpikingJelly's own layer wrappers (``layer.Conv2d``, ``layer.Linear``, ``layer.MaxPool2d``, ...)
override ``forward`` only to run the torch layer per step or on [T*N, *]; they are trusted as
their torch base.
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Iterable, Optional

__all__ = ["compute_methods", "changed_methods", "computes_as", "nearest_base", "step_mode_wrappers"]

# SpikingJelly's neuron API: methods a subclass overrides to change the dynamics
NEURON_HOOKS = frozenset({
    "forward", "single_step_forward", "multi_step_forward", "single_step_functional_forward",
    "multi_step_functional_forward", "neuronal_charge", "neuronal_fire", "neuronal_reset",
    "neuronal_adaptation", "jit_hard_reset", "jit_soft_reset", "v_float_to_tensor",
})


@functools.lru_cache(maxsize=None)
def compute_methods(base: type) -> frozenset[str]:
    """``forward`` and every method (or property) of ``base`` whose name its code loads, transitively."""
    seen, stack = set(), ["forward"]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        attr = inspect.getattr_static(base, name, None)
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        elif isinstance(attr, property):
            attr = attr.fget
        code = getattr(attr, "__code__", None)
        if code is None:
            continue
        seen.add(name)
        codes = [code]
        while codes:
            c = codes.pop()
            stack.extend(c.co_names)
            codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    if _is_neuron_class(base):
        seen |= NEURON_HOOKS
    return frozenset(seen)


def _is_neuron_class(cls: type) -> bool:
    try:
        from spikingjelly.activation_based import base
    except ImportError:
        return False
    return issubclass(cls, base.MemoryModule)


@functools.lru_cache(maxsize=None)
def step_mode_wrappers() -> tuple[type, ...]:
    """SpikingJelly's layers whose own ``forward`` only adds step-mode plumbing around their torch base's."""
    from spikingjelly.activation_based import layer

    names = ("Conv1d", "Conv2d", "Conv3d", "Linear", "Flatten", "MaxPool1d", "MaxPool2d", "MaxPool3d",
             "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
             "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "Upsample")
    return tuple(getattr(layer, n) for n in names if hasattr(layer, n))


def changed_methods(module_or_class, base: type, trusted: Iterable[type] = ()) -> list[str]:
    """Compute methods of ``base`` that the module's class (or a class between it and ``base``) overrides."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    if cls is base:
        return []
    if not issubclass(cls, base):
        raise TypeError(f"{cls.__qualname__} is not a subclass of {base.__qualname__}")
    trusted = tuple(trusted) + step_mode_wrappers()
    methods = compute_methods(base)
    changed = []
    for klass in cls.__mro__:
        if klass is base:
            break
        if klass in trusted:
            continue
        changed += [name for name in klass.__dict__ if name in methods and name not in changed]
    return changed


def computes_as(module, candidates: Iterable[type], trusted: Iterable[type] = ()) -> Optional[type]:
    """The nearest class among ``candidates`` in the module's MRO, if the module computes what it computes."""
    candidates = tuple(candidates)
    base = next((k for k in type(module).__mro__ if k in candidates), None)
    if base is None or changed_methods(module, base, trusted):
        return None
    return base


def nearest_base(module, candidates: Iterable[type]) -> Optional[type]:
    """The nearest class among ``candidates`` in the module's MRO (whatever the module overrides)."""
    candidates = tuple(candidates)
    return next((k for k in type(module).__mro__ if k in candidates), None)
