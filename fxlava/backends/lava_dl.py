"""lava-dl backend: fxlava blocks -> an nn.Sequential of ``slayer.block.cuba`` blocks with the same weights."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.blocks import FlattenBlock, SynapseBlock, is_block
from fxlava.target import WEIGHT_SCALE, quantize_bias

__all__ = ["blocks_of", "to_lava_dl", "slayer_bias"]


def blocks_of(gm: fx.GraphModule) -> list[nn.Module]:
    """The blocks of a compiled graph module, in execution order."""
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and is_block(gm.get_submodule(n.target))]


def _bias_hook(x: torch.Tensor, descale: bool = False) -> torch.Tensor:
    """slayer's pre_hook_fx for the bias: Loihi's 13-bit grid of step 1/64 (mantissas when ``descale``)."""
    q = quantize_bias(x)
    return q * WEIGHT_SCALE if descale else q


def slayer_bias(block: SynapseBlock):
    """The block's bias in slayer's form: a neuron normalisation that slayer adds and exports as netx's ``bias``.

    A mean-only BatchNorm in eval mode subtracts its running mean from the neuron's current, after
    the current decay and before the voltage; ``running_mean = -bias`` adds the bias there. With
    current decay 1 that is the bias Loihi adds to the voltage. Its ``bias`` property, which
    ``export_hdf5`` writes as the layer's ``bias`` (bias_mant, exponent 6 in netx), is
    ``-pre_hook_fx(running_mean, descale=True)``: with the 13-bit hook, the bias mantissas.
    None for a block without bias.
    """
    from lava.lib.dl.slayer.neuron.norm import MeanOnlyBatchNorm

    if block.bias is None:
        return None
    bias = block.quantized_bias.detach().float()
    norm = MeanOnlyBatchNorm(num_features=bias.numel(), pre_hook_fx=_bias_hook)
    norm.update = False  # never re-estimate the "mean" in training mode: it is the bias
    norm.running_mean = -bias
    return norm.eval()


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
            out.synapse.weight.copy_(syn.weight.detach().unsqueeze(-1))
    else:
        out = slayer.block.cuba.Dense(params, syn.in_features, syn.out_features, delay_shift=False)
        with torch.no_grad():
            out.synapse.weight.copy_(syn.weight.detach()[:, :, None, None, None])
    norm = slayer_bias(block)
    if norm is not None:
        out.neuron.norm = norm
    return out


def to_lava_dl(gm: fx.GraphModule, input_shape: tuple) -> nn.Sequential:
    """An eval-mode nn.Sequential of slayer blocks equal to ``gm``'s blocks, shapes set by a forward pass."""
    seq = nn.Sequential(*[_slayer_block(b) for b in blocks_of(gm)])
    seq.eval()
    # slayer blocks learn their neuron shape from a first forward pass (export needs it)
    with torch.no_grad():
        seq(torch.zeros(1, *input_shape, 2))
    return seq
