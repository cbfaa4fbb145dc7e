"""lava-dl backend: fxlava blocks -> an nn.Sequential of ``slayer.block.cuba`` blocks with the same weights."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.blocks import FlattenBlock, SynapseBlock, is_block

__all__ = ["blocks_of", "blocks_with_shapes", "to_lava_dl"]


def blocks_of(gm: fx.GraphModule) -> list[nn.Module]:
    """The blocks of a compiled graph module, in execution order."""
    return [block for block, _ in _block_nodes(gm)]


def _block_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_block(gm.get_submodule(node.target)):
            yield gm.get_submodule(node.target), node


def blocks_with_shapes(gm: fx.GraphModule) -> list[tuple[nn.Module, tuple]]:
    """(block, per-sample output shape in lava-dl order) for each block, from the shapes tracing recorded."""
    out = []
    for block, node in _block_nodes(gm):
        shape = node.meta.get("fxlava_shape")
        if shape is None:
            raise ValueError(f"block {node.target} has no recorded output shape (node.meta['fxlava_shape']); "
                             f"a pass that creates blocks must copy the meta of the node it replaces")
        out.append((block, tuple(int(n) for n in shape)))
    return out


def _slayer_block(block: nn.Module):
    from lava.lib.dl import slayer

    if isinstance(block, FlattenBlock):
        return slayer.block.cuba.Flatten()
    if not isinstance(block, SynapseBlock):
        raise TypeError(f"no lava-dl block for {type(block).__name__}")
    syn, params = block.synapse, block.neuron.neuron_params()
    # delay_shift=False: the SpikingJelly side has no axonal delay; Lava's per-layer latency is
    # removed by the runner instead.
    if isinstance(syn, nn.Conv2d):
        def build():
            return slayer.block.cuba.Conv(params, syn.in_channels, syn.out_channels, syn.kernel_size,
                                          stride=syn.stride, padding=syn.padding, dilation=syn.dilation,
                                          groups=syn.groups, delay_shift=False)
        weight = syn.weight.detach().unsqueeze(-1)
    else:
        def build():
            return slayer.block.cuba.Dense(params, syn.in_features, syn.out_features, delay_shift=False)
        weight = syn.weight.detach()[:, :, None, None, None]
    # slayer initialises its weights randomly, which for a large network costs more than everything
    # else here; built on the meta device nothing is allocated, and the weights are then set.
    with torch.device("meta"):
        out = build()
    out.neuron = type(out.neuron)(**params)  # as slayer.block.cuba builds it, with real parameters
    out.synapse.weight = nn.Parameter(weight.clone(), requires_grad=out.synapse.weight.requires_grad)
    if any(t.is_meta for t in (*out.parameters(), *out.buffers())):
        out = build()  # a slayer block with more state than expected: build it the ordinary way
        with torch.no_grad():
            out.synapse.weight.copy_(weight)
    return out


def to_lava_dl(gm: fx.GraphModule, input_shape: tuple) -> nn.Sequential:
    """An eval-mode nn.Sequential of slayer blocks equal to ``gm``'s blocks, neuron shapes taken from the graph."""
    blocks = []
    for block, shape in blocks_with_shapes(gm):
        out = _slayer_block(block)
        # slayer blocks otherwise learn their neuron shape in a first forward pass (export_hdf5
        # needs it); the graph already knows it. Flatten keeps slayer's (features, 1, 1).
        if isinstance(block, FlattenBlock):
            out.shape = [shape[0], 1, 1]
        else:
            out.neuron.shape = torch.Size(shape)
            out.neuron.num_neurons = math.prod(shape)
        blocks.append(out)
    return nn.Sequential(*blocks).eval()
