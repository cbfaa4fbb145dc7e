"""lower_adaptive_pools: an adaptive 2-d pool whose output size divides its input size is a plain pool.

``AdaptiveAvgPool2d((oh, ow))`` on an ``H x W`` input with ``H % oh == 0`` and ``W % ow == 0``
averages disjoint ``H/oh x W/ow`` windows: it is ``AvgPool2d(kernel=stride=(H/oh, W/ow))``, which
``avgpool_to_sumpool`` then lowers; the same holds for ``AdaptiveMaxPool2d`` and ``MaxPool2d``
(lowered by ``maxpool_to_or``). Other sizes use overlapping windows of unequal sizes, which
no netx layer computes: refused, naming the module.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from fxlava.errors import issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import bypass, module_nodes, path_of, set_module

PASS = "lower_adaptive_pools"
ADAPTIVE = {nn.AdaptiveAvgPool2d: nn.AvgPool2d, nn.AdaptiveMaxPool2d: nn.MaxPool2d}


def _plan(gm: fx.GraphModule, ctx: CompileContext):
    plans, issues = [], []
    for node, m in module_nodes(gm, tuple(ADAPTIVE)):
        if ctx.is_refused(node):
            continue
        shape = node.args[0].meta.get("fxlava_shape") if isinstance(node.args[0], fx.Node) else None
        if getattr(m, "return_indices", False) or shape is None or len(shape) != 3:
            issues.append(issue_at(node, "an adaptive pool fxlava cannot size (return_indices, or no [C, H, W] input)",
                                   "use AvgPool2d/MaxPool2d with an explicit kernel_size", module=m))
            continue
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
        hw = tuple(shape[1:])
        out = tuple(i if o is None else o for o, i in zip(size, hw))
        if any(i % o for i, o in zip(hw, out)):
            issues.append(issue_at(
                node, f"an adaptive pool to {out} of a {hw[0]}x{hw[1]} input: unequal, overlapping windows",
                f"choose an output size that divides {hw[0]}x{hw[1]}, or use AvgPool2d/MaxPool2d", module=m))
            continue
        kernel = tuple(i // o for i, o in zip(hw, out))
        plans.append((node, next(v for k, v in ADAPTIVE.items() if isinstance(m, k))(kernel, stride=kernel)))
    return plans, issues


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every adaptive 2-d pool whose output size does not divide its input size."""
    return _plan(gm, ctx)[1]


def lower_adaptive_pools(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Turn adaptive 2-d pools with evenly dividing sizes into AvgPool2d / MaxPool2d."""
    plans, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    for node, pool in plans:
        old = type(gm.get_submodule(node.target)).__name__
        if pool.kernel_size == (1, 1):
            # 1x1 windows (VGG's AdaptiveAvgPool2d((7, 7)) on a 7x7 map): the identity; merging it
            # into the next synapse would only copy its weights, slowly for a large linear layer
            bypass(gm, node)
            ctx.record(PASS, f"{path_of(node)}: {old} over 1x1 windows is the identity, removed")
            continue
        set_module(gm, node.target, pool)
        ctx.record(PASS, f"{path_of(node)}: {old} -> {type(pool).__name__}(kernel_size={pool.kernel_size})")
    gm.recompile()
    return PassResult(gm, bool(plans))


lower_adaptive_pools.check = check
