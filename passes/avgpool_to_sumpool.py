"""avgpool_to_sumpool: Loihi sums, it does not average. Move each pool's 1/k^2 where it is exact.

* pool -> conv: merged into one conv (kernel = the conv kernel spread over the pool windows,
  stride and padding multiplied by the pool stride), weights scaled by 1/k^2.
* pool -> flatten -> linear: merged into one dense layer over the unpooled input, weights
  scaled by 1/k^2 (the flatten moves before it).
* conv -> pool -> spiking neuron (a conv block that pools before its neuron): merged into one
  conv (the conv kernel placed at each window offset times the conv stride, stride multiplied
  by the pool stride), weights scaled by 1/k^2; the bias, averaged, is unchanged.
* pool -> spiking neuron: a sum pool (a grouped conv with a ones kernel, which netx loads)
  and the neuron's threshold multiplied by k^2; for a neuron with reset to 0 whose dynamics
  are linear in its input (IF, LIF) this is the same neuron in real arithmetic.

Unlike SpikingJelly's ``to_lava_blocks``, the factor comes from the pool itself and reaches
conv and dense layers alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fxlava.blocks import window_conv
from fxlava.errors import FxlavaError, Issue, issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import bypass, module_of, next_module_node, path_of, set_module
from fxlava.target import AVG_POOLS, FLATTENS, is_attention, is_neuron

PASS = "avgpool_to_sumpool"


@dataclass
class _Plan:
    pool: fx.Node
    action: str  # 'conv', 'dense', 'conv_before' (into the conv that feeds the pool) or 'neuron'
    factor: float
    consumer: Optional[fx.Node] = None
    flatten: Optional[fx.Node] = None


_CUBA_LIF_AFTER_POOL = (
    "a CubaLIFNode fed by an average pool: its fixed-point arithmetic does not allow moving the pool's 1/k^2 "
    "into its threshold",
    "put a conv or linear layer after the pool (the pool merges into it), or use IFNode / LIFNode after the pool")


def _fixed_point_neuron(m) -> bool:
    """SpikingJelly's lava_exchange.CubaLIFNode: quantised in its own arithmetic, so not linear in its threshold."""
    from spikingjelly.activation_based import lava_exchange

    return isinstance(m, lava_exchange.CubaLIFNode)


def _out_size(n, k, s, p, ceil):
    f = math.ceil if ceil else math.floor
    return f((n + 2 * p - k) / s) + 1


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[_Plan], list[Issue]]:
    """What to do with each average pool, and the pools (or their neurons) that cannot be lowered.

    A plan whose consumer is refused (a biased synapse, say) is returned too; the pass leaves that
    pool in place rather than report a consequence.
    """
    plans, issues = [], []
    for node in gm.graph.nodes:
        pool = module_of(gm, node)
        if not isinstance(pool, AVG_POOLS) or ctx.is_refused(node):
            continue
        if len(node.users) > 1:
            continue  # a fork: fuse_blocks refuses the branch, naming the fork, its paths and the merge
        k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
        shape_in = node.args[0].meta.get("fxlava_shape")
        if pool.ceil_mode and shape_in is not None and any(
                _out_size(shape_in[1 + d], k[d], s[d], p[d], True) != _out_size(shape_in[1 + d], k[d], s[d], p[d], False)
                for d in range(2)):
            issues.append(issue_at(node, "an average pool whose ceil_mode makes partial windows (not a constant 1/k^2)",
                                   "use ceil_mode=False, or input sizes the pool divides exactly", module=pool))
            continue
        if any(p) and not pool.count_include_pad:
            issues.append(issue_at(node, "a padded average pool with count_include_pad=False (not a constant 1/k^2)",
                                   "use count_include_pad=True or padding=0", module=pool))
            continue
        factor = 1.0 / (pool.divisor_override or k[0] * k[1])
        user = next_module_node(node)
        um = module_of(gm, user) if user is not None else None
        conv_before = _conv_feeding(gm, node)
        if isinstance(um, nn.Conv2d) and not any(p):
            plans.append(_Plan(node, "conv", factor, user))
        elif isinstance(um, FLATTENS) and not any(p):
            user2 = next_module_node(user)
            if isinstance(module_of(gm, user2) if user2 is not None else None, nn.Linear):
                plans.append(_Plan(node, "dense", factor, user2, flatten=user))
            else:
                issues.append(issue_at(node, "an average pool followed by flatten but not by a linear layer",
                                       "follow pool -> flatten with nn.Linear(..., bias=False)", module=pool))
        elif is_neuron(um) and conv_before is not None and not any(p):
            plans.append(_Plan(node, "conv_before", factor, conv_before))
        elif is_neuron(um) and hasattr(um, "v_threshold"):
            if _fixed_point_neuron(um) and not ctx.is_refused(user):
                issues.append(issue_at(user, *_CUBA_LIF_AFTER_POOL, module=um))
            else:
                plans.append(_Plan(node, "neuron", factor, user))
        elif is_attention(um):
            ctx.leave(node, because=user)  # fuse_blocks names the attention layer, the pool's only problem
        else:
            what = "a padded pool before a synapse" if um is not None and any(p) else "a pool that feeds no synapse or neuron"
            feeds = f"it feeds {path_of(user)} ({type(um).__name__}); " if um is not None else ""
            issues.append(issue_at(node, f"an average pool that cannot become a Loihi layer ({what})",
                                   f"{feeds}an average pool must feed a conv, a flatten + linear, or a spiking "
                                   f"neuron (with padding=0 if it feeds a synapse)", module=pool))
    return plans, issues


def _conv_feeding(gm: fx.GraphModule, pool: fx.Node) -> Optional[fx.Node]:
    """The conv node whose output only this pool reads, or None."""
    src = pool.args[0] if pool.args else None
    if isinstance(src, fx.Node) and isinstance(module_of(gm, src), nn.Conv2d) and list(src.users) == [pool]:
        return src
    return None


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for average pools that have no exact sum-pool form."""
    return _plan(gm, ctx)[1]


def _spread(w: torch.Tensor, k, stride) -> torch.Tensor:
    """w[..., j] -> w'[..., stride*j + a] summed over the pool window a < k (per spatial dim)."""
    lead = w.shape[:-2]
    flat = w.reshape(-1, 1, *w.shape[-2:])
    ones = torch.ones(1, 1, *k, dtype=w.dtype)
    out = F.conv_transpose2d(flat, ones, stride=stride)
    return out.reshape(*lead, *out.shape[-2:])


def _merge_conv(pool: nn.AvgPool2d, conv: nn.Conv2d, factor: float, shape_in) -> nn.Conv2d:
    k, s = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise FxlavaError(f"conv with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} after a pool")
    P, S, D = _pair(conv.padding), _pair(conv.stride), _pair(conv.dilation)
    if any(P):
        hp = [(shape_in[1 + d] - k[d]) // s[d] + 1 for d in range(2)]
        if any(s[d] * hp[d] < shape_in[1 + d] for d in range(2)):
            raise FxlavaError("the pool drops a border of its input and the conv pads; the merged conv would read "
                              "that border")
    with torch.no_grad():
        w = _spread(conv.weight.detach(), k, (s[0] * D[0], s[1] * D[1])) * factor
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, tuple(w.shape[-2:]), stride=(s[0] * S[0], s[1] * S[1]),
                       padding=(s[0] * P[0], s[1] * P[1]), groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        merged.weight.copy_(w)
        if conv.bias is not None:  # the pool is before the conv: its bias is unchanged
            merged.bias.copy_(conv.bias.detach())
    return merged


def _merge_conv_before(conv: nn.Conv2d, pool: nn.AvgPool2d, factor: float) -> nn.Conv2d:
    """pool(conv(x)) as one conv: the conv's kernel added in at each window offset a, at a * the conv's stride."""
    k, s = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    K, S, P, D = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    size = tuple(D[d] * (K[d] - 1) + S[d] * (k[d] - 1) + 1 for d in range(2))
    w = conv.weight.detach()
    merged_w = w.new_zeros(*w.shape[:2], *size)
    for a0 in range(k[0]):
        for a1 in range(k[1]):
            merged_w[:, :, S[0] * a0:S[0] * a0 + D[0] * (K[0] - 1) + 1:D[0],
                     S[1] * a1:S[1] * a1 + D[1] * (K[1] - 1) + 1:D[1]] += w
    merged = nn.Conv2d(conv.in_channels, conv.out_channels, size, stride=(S[0] * s[0], S[1] * s[1]), padding=P,
                       groups=conv.groups, bias=conv.bias is not None)
    with torch.no_grad():
        merged.weight.copy_(merged_w * factor)
        if conv.bias is not None:  # the average of a constant
            merged.bias.copy_(conv.bias.detach())
    return merged


def _merge_dense(pool: nn.AvgPool2d, linear: nn.Linear, factor: float, shape_in) -> nn.Linear:
    k, s = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    c, h, w_ = shape_in
    hp, wp = (h - k[0]) // s[0] + 1, (w_ - k[1]) // s[1] + 1
    with torch.no_grad():
        w = linear.weight.detach().reshape(linear.out_features, c, hp, wp)
        w = _spread(w, k, s)
        # the border a pool drops (input size not a multiple of its stride) gets zero weight
        w = F.pad(w, (0, w_ - w.shape[-1], 0, h - w.shape[-2])) * factor
    merged = nn.Linear(c * h * w_, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        merged.weight.copy_(w.reshape(linear.out_features, -1))
        if linear.bias is not None:
            merged.bias.copy_(linear.bias.detach())
    return merged


def _merge_problem(plan: _Plan, pool: nn.AvgPool2d, consumer: nn.Module) -> str:
    """Why the pool cannot merge into ``consumer`` ('' if it can), without changing anything."""
    if plan.action != "conv":
        return ""
    try:
        _merge_conv(pool, consumer, plan.factor, plan.pool.args[0].meta["fxlava_shape"])
    except FxlavaError as exc:
        return str(exc)
    return ""


def _self_check(before, after, shape_in, name):
    """The merge is exact in real arithmetic; check it on random data so a wrong merge cannot pass silently."""
    x = torch.rand(2, *shape_in, dtype=torch.float64)
    with torch.no_grad():
        a, b = before(x), after(x)
    # float32 weights times 1/k^2 (not a binary fraction for k=3) round at ~1e-8
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        raise FxlavaError(f"internal error: merging the pool into {name} changed the result")


def avgpool_to_sumpool(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Turn average pools into sum pools, moving 1/k^2 into the next synapse or threshold."""
    plans, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    for pool_node in {i.fx_node.args[0] for i in issues if i.reason == _CUBA_LIF_AFTER_POOL[0]}:
        ctx.leave(pool_node, because=next_module_node(pool_node))  # the neuron is refused, the pool stays
    lowered = []
    for plan in plans:
        if ctx.is_refused(plan.consumer):  # lowered once the consumer is fixed, if the merge can be done
            problem = _merge_problem(plan, module_of(gm, plan.pool), module_of(gm, plan.consumer))
            if problem:
                ctx.refuse(plan.pool, "an average pool that cannot be merged into the next synapse",
                           f"{problem}; change the padding of {path_of(plan.consumer)} or the pool",
                           module=module_of(gm, plan.pool))
            else:
                ctx.leave(plan.pool, because=plan.consumer)
            continue
        lowered.append(plan)
        pool = module_of(gm, plan.pool)
        shape_in = plan.pool.args[0].meta["fxlava_shape"]
        if plan.action == "conv_before":
            old = module_of(gm, plan.consumer)
            new = _merge_conv_before(old, pool, plan.factor)
            before = lambda x: F.avg_pool2d(F.conv2d(x, old.weight.double(), None, old.stride, old.padding,  # noqa: E731
                                                     old.dilation, old.groups), pool.kernel_size, pool.stride, 0,
                                            divisor_override=pool.divisor_override)
            after = lambda x: F.conv2d(x, new.weight.double(), None, new.stride, new.padding, 1, new.groups)  # noqa: E731
            _self_check(before, after, plan.consumer.args[0].meta["fxlava_shape"], path_of(plan.consumer))
            set_module(gm, plan.consumer.target, new)
            plan.consumer.meta["fxlava_shape"] = plan.pool.meta["fxlava_shape"]
            plan.consumer.meta["fxlava_merged_pool"] = path_of(plan.pool)
            ctx.record(PASS, f"merged {path_of(plan.pool)} into {path_of(plan.consumer)} before it (kernel "
                             f"{'x'.join(map(str, new.kernel_size))}, stride {'x'.join(map(str, new.stride))}, weights x "
                             f"{plan.factor:g})")
            bypass(gm, plan.pool)
        elif plan.action in ("conv", "dense"):
            old = module_of(gm, plan.consumer)
            try:
                if plan.action == "conv":
                    new = _merge_conv(pool, old, plan.factor, shape_in)
                    before = lambda x: F.conv2d(F.avg_pool2d(x, pool.kernel_size, pool.stride, 0,
                                                             divisor_override=pool.divisor_override),
                                                old.weight.double(), None, old.stride, old.padding, old.dilation, old.groups)
                    after = lambda x: F.conv2d(x, new.weight.double(), None, new.stride, new.padding, 1, new.groups)
                else:
                    new = _merge_dense(pool, old, plan.factor, shape_in)
                    before = lambda x: F.linear(F.avg_pool2d(x, pool.kernel_size, pool.stride, 0,
                                                             divisor_override=pool.divisor_override).flatten(1),
                                                old.weight.double())
                    after = lambda x: F.linear(x.flatten(1), new.weight.double())
            except FxlavaError as exc:
                ctx.refuse(plan.pool, "an average pool that cannot be merged into the next synapse",
                           f"{exc}; change the padding of {path_of(plan.consumer)} or the pool", module=pool)
                continue
            _self_check(before, after, shape_in, path_of(plan.consumer))
            set_module(gm, plan.consumer.target, new)
            plan.consumer.meta["fxlava_merged_pool"] = path_of(plan.pool)
            if plan.flatten is not None:
                plan.flatten.meta["fxlava_shape"] = (math.prod(shape_in),)
            ctx.record(PASS, f"merged {path_of(plan.pool)} into {path_of(plan.consumer)} (weights x {plan.factor:g})")
            bypass(gm, plan.pool)
        else:
            k, s, p = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
            c = shape_in[0]
            sumpool = window_conv(c, k, s, p)
            set_module(gm, plan.pool.target, sumpool)
            plan.pool.meta["fxlava_kind"] = "sumpool"
            neuron = module_of(gm, plan.consumer)
            neuron.v_threshold = neuron.v_threshold / plan.factor
            ctx.record(PASS, f"{path_of(plan.pool)} -> sum pool; threshold of {path_of(plan.consumer)} x {1 / plan.factor:g}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, bool(lowered))


avgpool_to_sumpool.check = check
