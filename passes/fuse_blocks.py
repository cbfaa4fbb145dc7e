"""fuse_blocks: synapse + neuron -> one block (one netx layer); flatten -> a flatten block.

After this pass the graph is a chain of blocks in lava-dl's [N, *, T] layout; insert_layout
makes it speak SpikingJelly's [T, N, *] again at its boundaries.

This is the pass that needs everything else gone, so it refuses what no pass lowered, whatever
the pipeline: a graph that still branches (naming the fork, the merge and both paths), modules
the target lacks (with the target description's fix), and synapses or neurons without their
partner. What follows from a node an earlier pass refused is not reported again.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from fxlava.blocks import FlattenBlock, SynapseBlock
from fxlava.chain import chain_issues
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.passes.bias_to_current import bias_currents_on
from fxlava.passes.reject_bias import FIX_OPT_IN, REASON
from fxlava.rewrite import fresh_name, module_of, next_module_node, path_of, replace_with_module
from fxlava.target import fix_for_op, role_of, unlowered

PASS = "fuse_blocks"

_SYNAPSE_ALONE = ("a synapse not followed by a spiking neuron (each Loihi layer is synapse + neuron)",
                  "put a spiking neuron (IFNode/LIFNode) directly after it; a ReLU, pool or second synapse "
                  "in between has no Loihi equivalent")
_NEURON_ALONE = ("a spiking neuron not preceded by a synapse (each Loihi layer is synapse + neuron)",
                 "feed every neuron from a conv or linear layer (an average pool also works)")


def _is_cuba(gm, node) -> bool:
    return node is not None and isinstance(module_of(gm, node), CubaNeuron)


def _lowered(m) -> bool:
    """What a netx layer is made of (``fxlava.target.MAY_FEED``): synapses, CUBA neurons, flattens; or a block."""
    return isinstance(m, CubaNeuron) or role_of(m) in ("synapse", "flatten", "block")


def _plumbing(node: fx.Node, m) -> bool:
    """Indexing (tuple unpacking) or a parameter-free torch.nn layer (an activation, a pool)."""
    if m is None:
        return node.op == "call_function" and node.target is operator.getitem
    return type(m).__module__.startswith("torch.nn.") and not any(True for _ in m.parameters())


def _refused_module(node: fx.Node, ctx: CompileContext) -> bool:
    """A module refused whole, as a recurrent layer or attention (or a node left for one): its output is no
    layer's spikes, so what only carries it on has nothing to add. A ReLU after a neuron refused for its
    reset, say, is a problem of its own and still reported."""
    if node.meta.get("fxlava_after_whole_refusal"):
        return True
    reason = node.meta.get("fxlava_refused") or ""
    return node.op == "call_module" and reason.startswith(("attention", "a recurrent container"))


def fuse_blocks(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Fuse each synapse with the neuron after it into a block; turn flattens into flatten blocks."""
    branch_issues, branched = chain_issues(gm)
    # a fork left for a merge an earlier pass refused (lower_residuals) is that merge's problem
    ctx.refuse([i for i in branch_issues if i.fx_node is None or not ctx.is_settled(i.fx_node)])
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and not ctx.is_settled(n)]
    # what no pass lowered, by the target's fix for its kind, also inside a branch (only the merges
    # are the branch's own problem); refused first, so that what merely lacks its partner next to
    # it is not reported as well
    for node in nodes:
        if node in branched and len(node.all_input_nodes) > 1:
            continue
        m = module_of(gm, node)
        if _plumbing(node, m) and node.all_input_nodes and all(_refused_module(a, ctx) for a in node.all_input_nodes):
            # what only carries a refused module's output on (x, _ = rnn(x); the ReLU after an attention
            # layer) is that refusal's consequence, not a problem of its own
            ctx.leave(node, because=node.all_input_nodes[0])
            node.meta["fxlava_after_whole_refusal"] = True
        elif m is None:
            ctx.refuse(node, *fix_for_op(node))
        elif not _lowered(m):
            ctx.refuse(node, *unlowered(m), module=m)
    fused = []
    for node in nodes:
        if node.graph is None or ctx.is_settled(node) or node in branched:
            continue
        m, user = module_of(gm, node), next_module_node(node)
        if role_of(m) == "synapse" and _is_cuba(gm, user) and not ctx.is_settled(user) and user not in branched:
            if m.bias is not None and not bias_currents_on(ctx):  # a pipeline without reject_bias
                ctx.refuse(node, REASON, FIX_OPT_IN, module=m)
                ctx.leave(user, because=node)
                continue
            residual = user.meta.get("fxlava_residual", {})  # a layer lower_residuals made: paths and relays
            source = tuple(p for p in (node.meta.get("fxlava_merged_pool"), path_of(node), path_of(user)) if p)
            try:
                block = SynapseBlock(m, module_of(gm, user), kind=node.meta.get("fxlava_kind", ""),
                                     source=residual.get("sources", source),
                                     relay_channels=residual.get("relay_channels", 0),
                                     relay_synapses=residual.get("relay_synapses", 0))
            except ValueError as exc:  # a bias that cannot be a Loihi bias current
                ctx.refuse(node, f"a synapse whose bias cannot be the bias current of {path_of(user)}",
                           f"{exc}; remove the bias, or change the neuron or scale", module=m)
                ctx.leave(user, because=node)
                continue
            fused.append(replace_with_module(gm, [node, user], block, fresh_name(gm, f"block{len(fused)}"),
                                             meta_from=user))
        elif role_of(m) == "flatten":
            fused.append(replace_with_module(gm, [node], FlattenBlock(source=(path_of(node),)),
                                             fresh_name(gm, f"block{len(fused)}")))
    for node in list(gm.graph.nodes):
        if node in fused or node.op in ("placeholder", "output") or ctx.is_settled(node) or node in branched:
            continue
        m = module_of(gm, node)
        if role_of(m) == "synapse":
            user = next_module_node(node)
            if user is None or not (ctx.is_settled(user) or user in branched):  # reported already
                ctx.refuse(node, *_SYNAPSE_ALONE, module=m)
        elif isinstance(m, CubaNeuron):
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if src is None or not (ctx.is_settled(src) or src in branched):
                ctx.refuse(node, *_NEURON_ALONE, module=m)
    gm.delete_all_unused_submodules()
    gm.recompile()
    ctx.record(PASS, f"{len(fused)} blocks: " + ", ".join(type(module_of(gm, n)).__name__ for n in fused))
    return PassResult(gm, bool(fused))
