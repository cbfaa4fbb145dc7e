"""maxpool_to_or: on spikes a max over a window is an OR, which one layer of Loihi neurons computes exactly.

Each ``nn.MaxPool2d`` (SpikingJelly's ``layer.MaxPool2d`` and ``F.max_pool2d``, which the frontend
turns into modules) whose input is spikes becomes a pooling layer of its own:

* a grouped conv (``groups=C``) with the pool's kernel, stride, padding and dilation and every
  weight ``OR_WEIGHT`` (1.0, weight mantissa 64), and
* a CUBA neuron with ``current_decay = voltage_decay = 1`` (no memory across steps) and threshold
  ``OR_THRESHOLD`` (0.5, vThMant 32): its voltage at step t is exactly the number of spikes in the
  window at step t, and Loihi fires when that is > 0.5, i.e. when at least one input spiked.

The max pool's output at step t is that neuron's output at step t; like every other netx layer
it adds one step of latency in Lava (``fxlava.run_lava`` removes it).

Exact, and so compiled: any kernel, stride (also != kernel), dilation and padding. MaxPool2d pads
with -inf, the conv with 0; both give the OR of the real inputs in a window as long as every
window holds at least one real input (torch guarantees this; it is checked anyway). ``ceil_mode``
is compiled when it does not change the output size, and refused when it adds partial windows.

Refused, naming the module: a max pool whose input is not spikes (after a synapse, an average
pool or anything else; of the network input when the example input is not all 0/1), one that
returns indices, one that feeds a spiking neuron with no synapse in between, and the partial
windows of ``ceil_mode``.

The pass runs after ``substitute_neurons``: the pooling neuron is a ``fxlava.neuron.CubaNeuron``
like every other neuron at that point, and it trains with the surrogate of the neuron whose
spikes it pools.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fxlava.blocks import window_conv
from fxlava.errors import Issue, issue_at
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import add_module, module_of, next_module_node, path_of, set_module
from fxlava.target import MAX_POOLS, is_neuron

PASS = "maxpool_to_or"
#: Weight of every synapse of the pooling layer (on lava-dl's 2/64 grid: mantissa 64).
OR_WEIGHT = 1.0
#: Threshold of the pooling neuron: one spike (voltage 1.0) exceeds it, no spike (0) does not.
OR_THRESHOLD = 0.5

_FIX_SOURCE = ("put the max pool after a spiking neuron (synapse -> neuron -> max pool): a max over spikes "
               "is an OR, which Loihi computes exactly; a max over other values has no Loihi equivalent")


@dataclass
class _Plan:
    pool: fx.Node
    channels: int
    surrogate_from: Optional[fx.Node]  # the neuron whose spikes are pooled (None: the network input)


def _window(pool: nn.MaxPool2d):
    """(kernel, stride, padding, dilation), each a pair (stride defaults to the kernel, as torch does)."""
    k = _pair(pool.kernel_size)
    return k, _pair(pool.stride or k), _pair(pool.padding), _pair(pool.dilation)


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _spike_source(gm: fx.GraphModule, node: fx.Node, ctx: CompileContext):
    """(True, neuron node or None) if ``node``'s input is spikes, (None, refused node) if that depends on a
    refused node, else (False, (reason, fix))."""
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return False, ("a max pool of a constant", _FIX_SOURCE)
    m = module_of(gm, src)
    if src.op == "placeholder":
        if _is_binary(ctx.example_input):
            return True, None
        return False, ("a max pool of the network input, and the example input is not binary (0/1): "
                       "only a max over spikes is an OR",
                       "compile with spike input (0/1), which is all Lava takes, or " + _FIX_SOURCE)
    if ctx.is_settled(src):
        return None, src
    if is_neuron(m):
        return True, src
    if isinstance(m, MAX_POOLS):  # a max pool of spikes gives spikes; its own plan covers its input
        ok, found = _spike_source(gm, src, ctx)
        if ok is None:
            return None, found
        return True, (found if ok else None)
    what = f"{path_of(src)} ({type(m).__name__})" if m is not None else f"<{src.name}>"
    return False, (f"a max pool of values that are not spikes (its input comes from {what}, not from a "
                   f"spiking neuron)", _FIX_SOURCE)


def _window_issue(pool: nn.MaxPool2d, shape_in) -> Optional[tuple]:
    """(reason, fix) if the grouped conv would not reproduce the pool's windows on this input shape."""
    k, s, p, d = _window(pool)
    probe = torch.zeros(1, 1, *shape_in[1:])
    floor_shape = F.max_pool2d(probe, k, s, p, d, ceil_mode=False).shape
    if pool.ceil_mode and F.max_pool2d(probe, k, s, p, d, ceil_mode=True).shape != floor_shape:
        return ("a max pool whose ceil_mode adds partial windows at the border (netx convs have no such windows)",
                "use ceil_mode=False, or an input size for which ceil_mode does not change the output size")
    # every window must hold at least one real input: MaxPool2d pads with -inf, the conv with 0
    covered = F.conv2d(torch.ones(1, 1, *shape_in[1:]), torch.ones(1, 1, *k), stride=s, padding=p, dilation=d)
    if covered.shape[-2:] != floor_shape[-2:] or not bool((covered > 0).all()):
        return ("a max pool with windows that lie entirely in its padding",
                "reduce the padding of the max pool")
    return None


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[_Plan], list[Issue], list[tuple]]:
    """(plans, issues, left): ``left`` pairs a max pool with the refused node its input depends on."""
    plans, issues, left = [], [], []
    for node in gm.graph.nodes:
        pool = module_of(gm, node)
        if not isinstance(pool, MAX_POOLS) or ctx.is_refused(node):
            continue
        found = []
        if pool.return_indices:
            found.append(("a max pool that returns indices (Loihi layers output spikes only)",
                          "construct it with return_indices=False; unpooling has no netx equivalent"))
        shape_in = node.args[0].meta.get("fxlava_shape") if isinstance(node.args[0], fx.Node) else None
        if shape_in is not None and len(shape_in) != 3:
            found.append((f"a max pool of a per-sample shape {shape_in} (fxlava pools [C, H, W] spikes)",
                          "apply the max pool to conv feature maps [N, C, H, W] per time step"))
        elif shape_in is not None and not pool.return_indices:
            problem = _window_issue(pool, shape_in)
            if problem is not None:
                found.append(problem)
        ok, source = _spike_source(gm, node, ctx)
        if ok is False:
            found.append(source)
        user = next_module_node(node)
        if user is not None and is_neuron(module_of(gm, user)):
            found.append(("a max pool that feeds a spiking neuron with no synapse in between (each Loihi layer "
                          "is synapse + neuron)",
                          "remove that neuron (the max of spikes already is spikes), or put a conv or linear "
                          "layer between the max pool and the neuron"))
        if shape_in is None and not found:  # unknown only when the graph cannot run per step: said elsewhere too
            found.append(("a max pool of a per-sample shape fxlava could not determine (fxlava pools [C, H, W] "
                          "spikes)", "apply the max pool to conv feature maps [N, C, H, W] per time step"))
        issues.extend(issue_at(node, reason, fix, module=pool) for reason, fix in found)
        if found:
            continue
        if ok is None:
            left.append((node, source))
        else:
            plans.append(_Plan(node, shape_in[0], source))
    return plans, issues, left


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for max pools that have no exact OR-neuron form."""
    return _plan(gm, ctx)[1]


def or_pool(channels: int, pool: nn.MaxPool2d) -> nn.Conv2d:
    """The pooling layer's synapse: a grouped conv over each channel's window, every weight OR_WEIGHT."""
    k, s, p, d = _window(pool)
    return window_conv(channels, k, s, p, d, weight=OR_WEIGHT)


def or_neuron(surrogate_function=None, detach_reset: bool = False) -> CubaNeuron:
    """The pooling neuron: no memory across steps, fires when its window held at least one spike."""
    return CubaNeuron(OR_THRESHOLD, current_decay=1.0, voltage_decay=1.0,
                      surrogate_function=surrogate_function, detach_reset=detach_reset)


def maxpool_to_or(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Turn max pools of spikes into OR layers: a grouped ones conv and a memoryless neuron with threshold 0.5."""
    plans, issues, left = _plan(gm, ctx)
    ctx.refuse(issues)
    for node, refused in left:  # whether its input is spikes is known once that node is fixed
        ctx.leave(node, because=refused)
    for plan in plans:
        node, pool = plan.pool, module_of(gm, plan.pool)
        upstream = module_of(gm, plan.surrogate_from) if plan.surrogate_from is not None else None
        if isinstance(upstream, CubaNeuron):
            neuron = or_neuron(copy.deepcopy(upstream.surrogate_function), upstream.detach_reset)
        else:
            neuron = or_neuron()
        set_module(gm, node.target, or_pool(plan.channels, pool))
        node.meta["fxlava_kind"] = "maxpool"
        target = add_module(gm, "_fxlava_or_neuron", neuron)
        with gm.graph.inserting_after(node):
            fire = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(fire, delete_user_cb=lambda u: u is not fire)
        for key in ("stack_trace", "fxlava_path", "fxlava_shape", "fxlava_order"):
            if key in node.meta:
                fire.meta[key] = node.meta[key]
        k, s, p, d = _window(pool)
        ctx.record(PASS, f"{path_of(node)} -> OR layer (grouped ones conv k={k} s={s} p={p} d={d}, "
                         f"CUBA vThMant={neuron.v_th_mant}, iDecay={neuron.i_decay}, vDecay={neuron.v_decay})")
    gm.recompile()
    return PassResult(gm, bool(plans))


maxpool_to_or.check = check
