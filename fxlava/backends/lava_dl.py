"""lava-dl backend: fxlava blocks -> an nn.Sequential of ``slayer.block.cuba`` blocks with the same weights."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.blocks import FlattenBlock, SynapseBlock, is_block

__all__ = ["blocks_of", "to_lava_dl"]


def blocks_of(gm: fx.GraphModule) -> list[nn.Module]:
    """The blocks of a compiled graph module, in execution order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and is_block(gm.get_submodule(n.target))]


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
        out = slayer.block.cuba.Conv(params, syn.in_channels, syn.out_channels, syn.kernel_size,
                                     stride=syn.stride, padding=syn.padding, dilation=syn.dilation,
                                     groups=syn.groups, delay_shift=False)
        with torch.no_grad():
            out.synapse.weight.copy_(block.scaled_weight.detach().unsqueeze(-1))
    else:
        out = slayer.block.cuba.Dense(params, syn.in_features, syn.out_features, delay_shift=False)
        with torch.no_grad():
            out.synapse.weight.copy_(block.scaled_weight.detach()[:, :, None, None, None])
    return out


def to_lava_dl(gm: fx.GraphModule, input_shape: tuple) -> nn.Sequential:
    """An eval-mode nn.Sequential of slayer blocks equal to ``gm``'s blocks, shapes set by a forward pass."""
    seq = nn.Sequential(*[_slayer_block(b) for b in blocks_of(gm)])
    seq.eval()
    # slayer blocks learn their neuron shape from a first forward pass (export needs it)
    with torch.no_grad():
        seq(torch.zeros(1, *input_shape, 2))
    return seq
