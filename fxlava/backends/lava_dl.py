"""lava-dl backend: fxlava blocks -> an nn.Sequential of ``slayer.block.cuba`` blocks with the same weights."""
from __future__ import annotations

import functools
import math

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.blocks import FlattenBlock, SynapseBlock, is_block
from fxlava.cow import lazy_clone
from fxlava.target import EVEN_GRID, WEIGHT_SCALE, quantize_bias, quantize_weight

__all__ = ["blocks_of", "blocks_with_shapes", "to_lava_dl", "slayer_bias", "weight_hook"]


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


def _bias_hook(x: torch.Tensor, descale: bool = False) -> torch.Tensor:
    """slayer's pre_hook_fx for the bias: Loihi's 13-bit grid of step 1/64 (mantissas when ``descale``)."""
    q = quantize_bias(x)
    return q * WEIGHT_SCALE if descale else q


def _weight_hook(x: torch.Tensor, descale: bool = False, *, scale: float = 1.0, grid=EVEN_GRID) -> torch.Tensor:
    """slayer's pre_hook_fx for a block's weights: times its co-scaling factor, on its grid (mantissas when ``descale``).

    slayer's own hook (its neuron's ``quantize_8bit``) is lava-dl's EVEN_GRID at factor 1; FINE_GRID
    layers take steps of 1/64 in [-2, 127/64].
    """
    q = quantize_weight(x if scale == 1.0 else x * scale, grid)
    return q * WEIGHT_SCALE if descale else q


def weight_hook(block: SynapseBlock):
    """The slayer pre_hook_fx of ``block``'s weights, or None where slayer's own (EVEN_GRID, factor 1) is it."""
    if block.scale == 1.0 and block.weight_grid is EVEN_GRID:
        return None
    return functools.partial(_weight_hook, scale=block.scale, grid=block.weight_grid)


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
    # the graph's weights in the model's units, as a copy-on-write clone (the two never change each
    # other, and nothing is copied unless one of them is written to); the hook applies the factor
    out.synapse.weight = nn.Parameter(lazy_clone(weight), requires_grad=out.synapse.weight.requires_grad)
    if any(t.is_meta for t in (*out.parameters(), *out.buffers())):
        out = build()  # a slayer block with more state than expected: build it the ordinary way
        with torch.no_grad():
            out.synapse.weight.copy_(weight)
    hook = weight_hook(block)
    if hook is not None:
        out.synapse.pre_hook_fx = hook
    norm = slayer_bias(block)
    if norm is not None:
        out.neuron.norm = norm
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
