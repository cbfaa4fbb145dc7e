"""fuse_blocks: synapse + neuron -> one block (one netx layer); flatten -> a flatten block.

After this pass the graph is a chain of blocks in lava-dl's [N, *, T] layout; insert_layout
makes it speak SpikingJelly's [T, N, *] again at its boundaries.
"""
from __future__ import annotations

import torch.fx as fx

from fxlava.blocks import FlattenBlock, SynapseBlock
from fxlava.errors import UnsupportedModelError, issue_at
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_of, next_module_node, path_of, replace_with_module
from fxlava.rules import FLATTENS, SYNAPSES

PASS = "fuse_blocks"


def _leftover_issue(gm, node):
    m = module_of(gm, node)
    if isinstance(m, SYNAPSES):
        return issue_at(node, "a synapse not followed by a spiking neuron (each Loihi layer is synapse + neuron)",
                        "put a spiking neuron (IFNode/LIFNode) directly after it; a ReLU, pool or second synapse "
                        "in between has no Loihi equivalent", module=m)
    if isinstance(m, CubaNeuron):
        return issue_at(node, "a spiking neuron not preceded by a synapse (each Loihi layer is synapse + neuron)",
                        "feed every neuron from a conv or linear layer (an average pool also works)", module=m)
    if m is not None:
        return issue_at(node, "a module with no Loihi equivalent",
                        "remove it from the network that goes to Loihi, or write a pass that lowers it", module=m)
    return issue_at(node, "an operation with no Loihi equivalent",
                    "remove it from forward(), or write a pass that lowers it")


def fuse_blocks(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Fuse each synapse with the neuron after it into a block; turn flattens into flatten blocks."""
    fused, issues = [], []
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output") or node.graph is None:
            continue
        m = module_of(gm, node)
        user = next_module_node(node)
        neuron = module_of(gm, user) if user is not None else None
        target = f"block{len(fused)}"
        if isinstance(m, SYNAPSES) and isinstance(neuron, CubaNeuron):
            source = tuple(p for p in (node.meta.get("fxlava_merged_pool"), path_of(node), path_of(user)) if p)
            block = SynapseBlock(m, neuron, kind=node.meta.get("fxlava_kind", ""), source=source)
            new = replace_with_module(gm, [node, user], block, target, meta_from=user)
        elif isinstance(m, FLATTENS):
            new = replace_with_module(gm, [node], FlattenBlock(source=(path_of(node),)), target)
        else:
            continue
        fused.append(new)
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output") and node not in fused:
            issues.append(_leftover_issue(gm, node))
    if issues:
        raise UnsupportedModelError(issues)
    gm.delete_all_unused_submodules()
    gm.recompile()
    ctx.record(PASS, f"{len(fused)} blocks: " + ", ".join(type(module_of(gm, n)).__name__ for n in fused))
    return PassResult(gm, bool(fused))
