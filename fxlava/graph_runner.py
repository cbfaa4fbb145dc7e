"""Run the graph at any point of the pipeline on [T, N, *] spikes, with the compiled semantics of what is lowered.

From tracing until ``insert_layout`` the graph is in fxlava's per-step form: its SpikingJelly
modules, convs, pools and functions run once per time step on ``[N, *]``. The modules passes
put in are whole-sequence modules in lava-dl's ``[N, *, T]`` layout (``CubaNeuron`` from
``substitute_neurons`` and ``maxpool_to_or``, the blocks of ``fuse_blocks``), as they will run in
lava-dl and on Loihi. ``run_graph`` executes such a mixed graph node by node: a per-step node
is called once per time step (a stateful SpikingJelly neuron keeps its state from one step to
the next), a whole-sequence node once on the stacked sequence, with the layout changed around
it. After ``insert_layout`` (``gm.meta['fxlava_layout'] == 'sequence'``) the graph takes
``[T, N, *]`` itself. So a pass author tests a pass by running the graph before and after it.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.blocks import is_block
from fxlava.layout import NXT_to_TNX, TNX_to_NXT
from fxlava.neuron import CubaNeuron

__all__ = ["run_graph", "takes_sequences"]


def takes_sequences(m: nn.Module) -> bool:
    """True for modules that run on a whole [N, *, T] sequence: CUBA neurons and fused blocks."""
    return isinstance(m, CubaNeuron) or is_block(m)


def run_graph(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """``gm`` run on ``x`` ([T, N, *] spikes) from the resting state; returns [T, N, *]."""
    from fxlava.frontend import reset_states

    reset_states(gm)
    try:
        if gm.meta.get("fxlava_layout") == "sequence":
            return gm(x)
        return _run_mixed(gm, x)
    finally:
        reset_states(gm)


def _run_mixed(gm: fx.GraphModule, x: torch.Tensor):
    from fxlava.target import is_stateful

    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    shared = [t for t, k in calls.items() if k > 1 and is_stateful(gm.get_submodule(t))]
    if shared:  # node by node, its calls would not interleave step by step as SpikingJelly's do
        raise ValueError(f"run_graph runs each node over all time steps in turn; the stateful module(s) "
                         f"{', '.join(shared)} are called from several places, whose steps would not interleave")
    steps = x.shape[0]
    env: dict[fx.Node, list] = {}  # node -> its value at each time step
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = list(x.unbind(0))
        elif node.op == "get_attr":
            value = gm
            for name in node.target.split("."):
                value = getattr(value, name)
            env[node] = [value] * steps
        elif node.op == "output":
            return fx.map_arg(node.args[0], lambda n: torch.stack(env[n]))
        else:
            m = gm.get_submodule(node.target) if node.op == "call_module" else None
            if m is not None and takes_sequences(m):
                (src,) = node.args
                y = NXT_to_TNX(m(TNX_to_NXT(torch.stack(env[src]))))
                env[node] = list(y.unbind(0))
                continue
            values = []
            for t in range(steps):
                args = fx.map_arg(node.args, lambda n: env[n][t])
                kwargs = fx.map_arg(node.kwargs, lambda n: env[n][t])
                if node.op == "call_module":
                    values.append(m(*args, **kwargs))
                elif node.op == "call_function":
                    values.append(node.target(*args, **kwargs))
                else:  # call_method
                    values.append(getattr(args[0], node.target)(*args[1:], **kwargs))
            env[node] = values
    raise ValueError("the graph has no output node")
