"""fxlava's blocks: quantised synapse + CUBA neuron layers in lava-dl's [N, *, T] layout.

A block is what one netx layer is: a synapse (conv or dense, weights on the 8-bit grid) and a
layer of CUBA neurons. Blocks are trainable (straight-through quantisation, the user's
surrogate); ``fxlava.backends.lava_dl`` turns each into the equal ``slayer.block.cuba`` block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlava.neuron import CubaNeuron
from fxlava.target import SYNAPSES, quantize_weight

__all__ = ["SynapseBlock", "FlattenBlock", "is_block", "window_conv"]


class SynapseBlock(nn.Module):
    """Conv or dense synapse with quantised weights, followed by CUBA neurons; [N, *, T] -> [N, *, T]."""

    def __init__(self, synapse: nn.Module, neuron: CubaNeuron, kind: str = "", source: tuple = ()):
        super().__init__()
        if not isinstance(synapse, SYNAPSES):
            raise TypeError(f"SynapseBlock takes nn.Conv2d or nn.Linear; got {type(synapse).__name__}")
        if synapse.bias is not None:
            raise ValueError("Loihi blocks have no bias; the reject_bias pass should have refused this synapse")
        if isinstance(synapse, nn.Conv2d) and (isinstance(synapse.padding, str) or (
                synapse.padding_mode != "zeros" and any(synapse.padding))):
            raise ValueError(f"netx convs pad each side with zeros by a number of pixels; got padding={synapse.padding!r}, "
                             f"padding_mode={synapse.padding_mode!r} (the resolve_conv_padding pass makes it explicit)")
        self.synapse = synapse
        self.neuron = neuron
        # 'conv', 'dense', 'sumpool' or 'maxpool' (grouped convs with a ones kernel); for tables and the backends
        self.kind = kind or ("conv" if isinstance(synapse, nn.Conv2d) else "dense")
        self.source = tuple(dict.fromkeys(source))  # the user's module paths this block was made from
        # Co-scaling factor (fxlava.passes.coscale_layers): Loihi gets the weights times ``scale``
        # and a neuron whose threshold was multiplied by it too. ``synapse.weight`` stays in the
        # model's units, so it is what training updates and what goes back into the model.
        self.scale = 1.0

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
    def quantized_weight(self) -> torch.Tensor:
        """The weights Loihi runs: ``scaled_weight`` on the 8-bit grid."""
        return quantize_weight(self.scaled_weight)

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
        return self.neuron(self.synaptic_input(x))

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"kind={self.kind}, source={list(self.source)}{scale}"


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
