"""fxlava's blocks: quantised synapse + CUBA neuron layers in lava-dl's [N, *, T] layout.

A block is what one netx layer is: a synapse (conv or dense, weights on the 8-bit grid), an
optional bias per output channel (Loihi's neuron bias, on the 13-bit grid of step 1/64) and a
layer of CUBA neurons. Blocks are trainable (straight-through quantisation, the user's
surrogate); ``fxlava.backends.lava_dl`` turns each into the equal ``slayer.block.cuba`` block.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlava.neuron import CubaNeuron
from fxlava.target import (DECAY_SCALE, EVEN_GRID, STATE_SCALE, SYNAPSES, VOLTAGE_MAX, bias_mantissa,
                           bias_out_of_range, quantize_bias, quantize_weight, step_sums, weight_steps)

__all__ = ["SynapseBlock", "FlattenBlock", "is_block", "window_conv"]


class SynapseBlock(nn.Module):
    """Conv or dense synapse with quantised weights and bias, followed by CUBA neurons; [N, *, T] -> [N, *, T].

    The synapse's own ``bias`` (``block.bias``, None if it has none) is Loihi's neuron bias: a
    constant added to the voltage every time step. With current decay 1, the only decay a biased
    block accepts, the current holds nothing over from one step to the next, so that is the same
    as adding the bias to the synaptic input, which is what ``forward`` does.
    """

    def __init__(self, synapse: nn.Module, neuron: CubaNeuron, kind: str = "", source: tuple = (),
                 relay_channels: int = 0, relay_synapses: int = 0):
        super().__init__()
        if not isinstance(synapse, SYNAPSES):
            raise TypeError(f"SynapseBlock takes nn.Conv2d or nn.Linear; got {type(synapse).__name__}")
        if synapse.bias is not None:
            if neuron.i_decay != DECAY_SCALE:
                raise ValueError(f"a biased synapse needs neurons with current decay 1 (iDecay {DECAY_SCALE}); got "
                                 f"iDecay {neuron.i_decay}: Loihi adds the bias to the voltage, which equals a bias on "
                                 f"the current only when the current does not carry over")
            why = bias_out_of_range(synapse.bias)
            if why:
                raise ValueError(why)
        if isinstance(synapse, nn.Conv2d) and (isinstance(synapse.padding, str) or (
                synapse.padding_mode != "zeros" and any(synapse.padding))):
            raise ValueError(f"netx convs pad each side with zeros by a number of pixels; got padding={synapse.padding!r}, "
                             f"padding_mode={synapse.padding_mode!r} (the resolve_conv_padding pass makes it explicit)")
        self.synapse = synapse
        self.neuron = neuron
        # 'conv', 'dense', 'sumpool' or 'maxpool' (grouped convs with a ones kernel); for tables and the backends
        self.kind = kind or ("conv" if isinstance(synapse, nn.Conv2d) else "dense")
        self.source = tuple(dict.fromkeys(source))  # the user's module paths this block was made from
        # output channels that carry a skip path along (lower_residuals), and the synapses they and the
        # merges they feed add beyond the model's own
        self.relay_channels = int(relay_channels)
        self.relay_synapses = int(relay_synapses)
        # Co-scaling factor (fxlava.passes.coscale_layers): Loihi gets the weights times ``scale``
        # and a neuron whose threshold was multiplied by it too. ``synapse.weight`` stays in the
        # model's units, so it is what training updates and what goes back into the model.
        self.scale = 1.0
        # The grid of weight mantissas (fxlava.target): lava-dl's EVEN_GRID unless co-scaling chose
        # FINE_GRID, which fits int8 in the netx file.
        self.weight_grid = EVEN_GRID

    @property
    def layer(self) -> str:
        """The layer's name: the user's module paths it was made from, synapse -> neuron."""
        return " -> ".join(self.source)

    @property
    def scaled_weight(self) -> torch.Tensor:
        """The weights Loihi's mantissas are made from: ``synapse.weight * scale``, before rounding."""
        return self.synapse.weight if self.scale == 1.0 else self.synapse.weight * self.scale

    @property
    def scaled_bias(self):
        """The synapse's bias times ``scale`` (None without a bias): what a bias current must be made from."""
        bias = getattr(self.synapse, "bias", None)
        return bias if bias is None or self.scale == 1.0 else bias * self.scale

    @property
    def neuron_channels(self) -> int:
        """Output channels (or features) of the synapse: the model's own plus the relays."""
        return self.synapse.out_channels if isinstance(self.synapse, nn.Conv2d) else self.synapse.out_features

    @property
    def quantized_weight(self) -> torch.Tensor:
        """The weights Loihi runs: ``scaled_weight`` on the block's 8-bit grid (``weight_grid``)."""
        return quantize_weight(self.scaled_weight, self.weight_grid)

    @property
    def bias(self):
        """The bias per output channel, in the weights' real units (the synapse's ``bias``), or None."""
        return self.synapse.bias

    @property
    def quantized_bias(self):
        """The bias Loihi adds: ``scaled_bias`` in multiples of 1/64 (13-bit mantissa), or None."""
        return None if self.synapse.bias is None else quantize_bias(self.scaled_bias)

    @property
    def bias_mantissa(self):
        """netx's ``bias`` for this layer (bias_mant, exponent 6) from ``scaled_bias``, int64 per channel, or None."""
        return None if self.synapse.bias is None else bias_mantissa(self.scaled_bias)

    @property
    def voltage_floor_steps(self):
        """Steps for which Lava's voltage floor provably cannot change a spike of this block, or None for any number.

        Lava clips the voltage at -(2**23 - 1) / 4096 (about -2048); lava-dl and fxlava do not. The voltage
        falls at most by D per step, D the largest sum over one neuron's fan-in of its negative quantised
        weights plus its negative bias (all negative inputs spiking), and decays back toward 0 by
        voltage_decay. So it stays above the floor for any binary input as long as D (1 - (1 - d)^t) / d
        (D t for d = 0) is not beyond it: for every t when D / d is not.
        """
        return self.floor_steps(self.inhibition_steps())

    def inhibition_steps(self) -> torch.Tensor:
        """Per output channel, minus the sum of its negative quantised weights, in mantissa steps (float64)."""
        lo = self.weight_grid.step_range[0]
        # by blocks of rows (fxlava.target.weight_steps: VGG-11's first Linear has 103 M weights)
        return torch.cat([step_sums(x.round_().clamp_(lo, 0)).double().neg_()
                          for _, x in weight_steps(self.synapse.weight, self.weight_grid, self.scale)])

    def floor_steps(self, inhibition: torch.Tensor):
        """``voltage_floor_steps`` from ``inhibition_steps()``, which co-scaling already has at hand."""
        drop = inhibition * self.weight_grid.step
        if self.synapse.bias is not None:
            drop = drop - self.quantized_bias.detach().double().clamp(max=0)
        units = int(round(drop.max().item() * STATE_SCALE)) if drop.numel() else 0  # per step, in 1/4096
        if units == 0:
            return None
        floor = VOLTAGE_MAX  # Lava clips at -VOLTAGE_MAX (lava.proc.lif.models)
        d = self.neuron.v_decay / DECAY_SCALE
        if d == 0:
            return floor // units
        if units / d <= floor:
            return None
        return int(math.floor(math.log1p(-floor * d / units) / math.log1p(-d)))

    def weights_key(self) -> tuple:
        """Changes when the quantised weights or bias may have (in-place writes, a new tensor, scale, grid, neuron)."""
        bias = self.synapse.bias
        return (id(self.synapse.weight), self.synapse.weight._version, None if bias is None else (id(bias), bias._version),
                self.scale, self.weight_grid, id(self.neuron))

    def synaptic_input(self, x: torch.Tensor) -> torch.Tensor:
        """The synapse applied at every time step: [N, *, T] -> [N, *, T]."""
        n, t = x.shape[0], x.shape[-1]
        xt = x.movedim(-1, 1).reshape(n * t, *x.shape[1:-1])
        w = self.quantized_weight
        if isinstance(self.synapse, nn.Conv2d):
            s = self.synapse
            y = F.conv2d(xt, w, None, s.stride, s.padding, s.dilation, s.groups)
        else:
            y = F.linear(xt, w)
        return y.reshape(n, t, *y.shape[1:]).movedim(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.synaptic_input(x)
        if self.synapse.bias is not None:
            # x is a multiple of 1/32 per spike and the bias of 1/64: the sum is exact in float32
            y = y + self.quantized_bias.reshape((1, -1) + (1,) * (y.dim() - 2)).to(y.dtype)
        return self.neuron(y)

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        scale += f", weight_grid={self.weight_grid.name}" if self.weight_grid is not EVEN_GRID else ""
        relays = f", relay_channels={self.relay_channels}" if self.relay_channels else ""
        return f"kind={self.kind}, source={list(self.source)}{scale}{relays}"


class FlattenBlock(nn.Module):
    """Flattens each sample in C, H, W order (as netx's flatten layer): [N, C, H, W, T] -> [N, CHW, T]."""

    def __init__(self, source: tuple = ()):
        super().__init__()
        self.kind = "flatten"
        self.source = tuple(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])


def window_conv(channels: int, kernel_size, stride, padding, dilation=1, weight: float = 1.0) -> nn.Conv2d:
    """A pooling layer's synapse: a grouped conv summing each channel's window times ``weight``, not trainable."""
    conv = nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=channels, bias=False)
    with torch.no_grad():
        conv.weight.fill_(weight)
    conv.weight.requires_grad_(False)  # a pooling layer has no trainable weights
    return conv


def is_block(m: nn.Module) -> bool:
    """True for the modules fuse_blocks produces."""
    return isinstance(m, (SynapseBlock, FlattenBlock))
