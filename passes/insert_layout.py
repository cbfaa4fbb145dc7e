"""insert_layout: [T, N, *] -> [N, *, T] at the input, and back at the output.

The blocks compute in lava-dl's layout; with these two permutes the graph module takes and
returns SpikingJelly's multi-step layout, while the blocks in between map one to one onto
the lava-dl Sequential.
"""
from __future__ import annotations

import torch.fx as fx

from fxlava.layout import NXT_to_TNX, TNX_to_NXT
from fxlava.pass_manager import CompileContext, PassResult


def insert_layout(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Permute SpikingJelly's [T, N, *] to lava-dl's [N, *, T] at the input and back at the output."""
    graph = gm.graph
    (inp,) = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_after(inp):
        to_nxt = graph.call_function(TNX_to_NXT, (inp,))
    inp.replace_all_uses_with(to_nxt, delete_user_cb=lambda n: n is not to_nxt)
    result = out.args[0]
    with graph.inserting_before(out):
        to_tnx = graph.call_function(NXT_to_TNX, (result,))
    out.args = (to_tnx,)
    gm.meta["fxlava_layout"] = "sequence"  # the graph itself now takes [T, N, *] (fxlava.run_graph)
    gm.recompile()
    return PassResult(gm, True)
