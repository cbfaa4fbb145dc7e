"""Forward hooks: what a module computes besides its forward(), made plain or refused before tracing.

torch.fx traces ``forward()`` and never runs a module's forward hooks or pre-hooks, and fxlava's
passes replace modules by blocks that would not run them either; a model with hooks could compile
to something other than what it computes. The hooks that only reparametrise a weight compute it
from parameters, so on fxlava's copy of the model they are made permanent exactly as torch does it
(``prune.remove``, ``remove_weight_norm``, ``remove_spectral_norm`` in eval mode,
``parametrize.remove_parametrizations``); the weight the passes read is the one the model uses.
Any other hook, on a module or global, is refused, naming the module and the hook.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

from fxlava.errors import Issue

__all__ = ["lower_hooks"]

_FIX = ("remove the hook before compiling (the handle's .remove()), and fold what it computes into the "
        "model's weights or thresholds; for torch.nn.utils.prune call prune.remove(module, 'weight')")


def _where(hook) -> str:
    """'file:line: def name(...)' of a hook function (or of its class's __call__)."""
    fn = hook if inspect.isfunction(hook) or inspect.ismethod(hook) else getattr(type(hook), "__call__", hook)
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    try:
        lines, line = inspect.getsourcelines(fn)
        return f"{inspect.getsourcefile(fn)}:{line}: {lines[0].strip()}"
    except (OSError, TypeError):
        return ""


def _name(hook) -> str:
    if inspect.isfunction(hook) or inspect.ismethod(hook):
        return getattr(hook, "__qualname__", repr(hook))
    return f"{type(hook).__module__}.{type(hook).__qualname__}"


def _module_type(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _unparametrize(m: nn.Module, path: str) -> list[str]:
    """Replace each parametrized tensor of ``m`` by its value, as a plain parameter.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the module's class,
    which a deep copy shares with the user's model.
    """
    values = {name: getattr(m, name).detach().clone() for name in m.parametrizations.keys()}
    done = [f"{path or type(m).__name__}: parametrization of {name} "
            f"({', '.join(type(p).__name__ for p in m.parametrizations[name])})" for name in values]
    del m._modules["parametrizations"]
    m.__class__ = type(m).__bases__[0]  # parametrize's generated class derives from the module's own class only
    for name, value in values.items():
        m.register_parameter(name, nn.Parameter(value))
    return done


def lower_hooks(root: nn.Module) -> tuple[list[str], list[Issue]]:
    """Make weight reparametrisations of ``root`` (fxlava's copy) permanent; list every other forward hook.

    Returns (what was made permanent, one Issue per remaining hook). ``root`` must be in eval mode:
    spectral norm then uses its stored vectors, as the model does in eval mode.
    """
    done, issues = [], []
    for path, m in root.named_modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
                done.append(f"{path or type(m).__name__}: pruning of {hook._tensor_name} (weight * mask)")
            elif isinstance(hook, WeightNorm):
                remove_weight_norm(m, hook.name)
                done.append(f"{path or type(m).__name__}: weight_norm of {hook.name} (g * v / |v|)")
            elif isinstance(hook, SpectralNorm):
                remove_spectral_norm(m, hook.name)
                done.append(f"{path or type(m).__name__}: spectral_norm of {hook.name} (weight / sigma, eval mode)")
        if parametrize.is_parametrized(m):
            done += _unparametrize(m, path)
        hooks = [("forward pre-hook", h) for h in m._forward_pre_hooks.values()]
        hooks += [("forward hook", h) for h in m._forward_hooks.values()]
        for kind, hook in hooks:
            issues.append(Issue(
                reason="a module with a forward hook or pre-hook, which tracing does not run (torch.fx calls "
                       "forward() only) and Loihi could not run",
                fix=_FIX, path=path, module_type=f"{_module_type(m)}, {kind} {_name(hook)}", source=_where(hook)))
    from torch.nn.modules import module as torch_module

    for kind, table in (("global forward pre-hook", torch_module._global_forward_pre_hooks),
                        ("global forward hook", torch_module._global_forward_hooks)):
        for hook in table.values():
            issues.append(Issue(
                reason="a global forward hook (torch.nn.modules.module.register_module_forward_hook), which "
                       "tracing does not run",
                fix="remove the global hook (its handle's .remove()) while compiling", path="",
                module_type=f"{kind} {_name(hook)}", source=_where(hook)))
    return done, issues
