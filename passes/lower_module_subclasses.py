"""lower_module_subclasses: a subclass is compiled as its base class only when it computes what that computes.

The passes after this one match modules by type. A subclass of ``Conv2d``, ``Linear``, a pool,
``Flatten``, ``Identity`` or ``Dropout`` passes those tests whatever its ``forward`` does, so this
pass runs first and looks at each one (``fxlava.subclasses``: a subclass that overrides ``forward``
or a method ``forward`` reaches, such as ``Conv2d._conv_forward``, computes something else):

- SpikingJelly's weight-standardised ``layer.WSConv2d`` and ``layer.WSLinear`` (and subclasses that
  change none of their compute methods) compute ``conv2d(x, get_weight())`` /
  ``linear(x, get_weight())``, where ``get_weight()`` standardises each output channel's weights
  and multiplies them by the learnable ``gain``. The weight depends on parameters only, so in eval
  mode the layer *is* a plain ``Conv2d`` / ``Linear`` with weight ``get_weight()``: it is replaced by
  one, computed by the module's own ``get_weight()`` (bit for bit what its forward uses). Its
  ``forward`` calls ``F.conv2d`` with zero padding whatever ``padding_mode`` says, and so does the
  replacement. The bias is kept as it is.
- Any other subclass whose compute methods differ is refused, naming its class and the methods.
  SpikingJelly's own step-mode wrappers (``layer.Conv2d``, ``layer.MaxPool2d``, ...) are trusted.

Neurons and normalisations are checked where they are substituted and folded (``substitute_neurons``,
``fold_batchnorm``), by the same rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.errors import Issue, issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_of, path_of, set_module
from fxlava.target import ADAPTIVE_POOLS, AVG_POOLS, FLATTENS, IDENTITIES, MAX_POOLS, SYNAPSES
from fxlava.subclasses import changed_methods, computes_as, nearest_base

PASS = "lower_module_subclasses"

# what the passes after this one compile by type
ROLE_TYPES = SYNAPSES + AVG_POOLS + MAX_POOLS + ADAPTIVE_POOLS + FLATTENS + IDENTITIES


@dataclass
class _Fold:
    node: fx.Node
    module: nn.Module


def _weight_standardised() -> tuple[type, ...]:
    from spikingjelly.activation_based import layer

    return tuple(getattr(layer, n) for n in ("WSConv2d", "WSLinear") if hasattr(layer, n))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plan(gm: fx.GraphModule) -> tuple[list[_Fold], list[Issue]]:
    folds, issues = [], []
    ws_types = _weight_standardised()
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is None:
            continue
        if ws_types and computes_as(m, ws_types) is not None:
            folds.append(_Fold(node, m))
            continue
        base = nearest_base(m, ws_types) if ws_types and isinstance(m, ws_types) else (
            nearest_base(m, ROLE_TYPES) if isinstance(m, ROLE_TYPES) else None)
        if base is None:
            continue
        changed = changed_methods(m, base)
        if changed:
            issues.append(issue_at(
                node, "a subclass of a module fxlava compiles by its type, whose forward computes something else",
                f"{type(m).__name__} overrides {', '.join(changed)} of {_name(base)}, so it is not compiled as "
                f"{base.__name__}: use {base.__name__} itself, or write a pass (before {PASS}) that replaces "
                f"{type(m).__name__} with what it computes", module=m))
    return folds, issues


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every subclass of a compiled module type whose forward differs and that this pass cannot lower."""
    return _plan(gm)[1]


def _plain_equivalent(m: nn.Module) -> nn.Module:
    """The plain Conv2d / Linear that computes what the weight-standardised ``m`` computes in eval mode."""
    with torch.no_grad():
        weight = m.get_weight().detach().clone()
        if isinstance(m, nn.Conv2d):
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                              m.groups, bias=m.bias is not None, padding_mode="zeros",
                              device=weight.device, dtype=weight.dtype)
        else:
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if m.bias is not None:
            plain.bias.copy_(m.bias.detach())
    return plain.train(m.training)


def lower_module_subclasses(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Replace weight-standardised convs/linears by plain ones; refuse other subclasses whose forward differs."""
    folds, issues = _plan(gm)
    ctx.refuse(issues)  # refused nodes stay, marked; the passes after this one leave them alone
    done = {}
    for fold in folds:
        if fold.node.target not in done:  # a module called from several places is lowered once
            done[fold.node.target] = _plain_equivalent(fold.module)
            set_module(gm, fold.node.target, done[fold.node.target])
            gain = "with its gain" if getattr(fold.module, "gain", None) is not None else "without gain"
            ctx.record(PASS, f"{path_of(fold.node)}: {type(fold.module).__name__} -> "
                             f"{type(done[fold.node.target]).__name__} with the standardised weight "
                             f"({gain}, eps={fold.module.eps:g})")
    gm.recompile()
    return PassResult(gm, bool(folds))


lower_module_subclasses.check = check
