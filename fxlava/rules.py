"""Loihi and netx rules as data: fixed-point formats, and which modules play which role."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "WEIGHT_SCALE", "WEIGHT_STEP", "WEIGHT_MIN", "WEIGHT_MAX", "DECAY_SCALE",
    "quantize_weight", "SYNAPSES", "AVG_POOLS", "MAX_POOLS", "FLATTENS", "NORMS", "IDENTITIES",
]

# lava-dl CUBA blocks (and netx) keep weights as 8-bit mantissas at scale 1 << 6: multiples
# of 2/64 in [-256/64, 254/64] (slayer.neuron.base.Neuron.quantize_8bit).
WEIGHT_SCALE = 1 << 6
WEIGHT_STEP = 2 / WEIGHT_SCALE
WEIGHT_MIN = -256 / WEIGHT_SCALE
WEIGHT_MAX = 254 / WEIGHT_SCALE
# current and voltage decays are 12-bit: 4096 means 1.0
DECAY_SCALE = 1 << 12


class _RoundSTE(torch.autograd.Function):
    """Round to the weight grid; the gradient passes straight through (as slayer's quantize does)."""

    @staticmethod
    def forward(ctx, w):
        return torch.round(w / WEIGHT_STEP) * WEIGHT_STEP

    @staticmethod
    def backward(ctx, grad):
        return grad


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """The weights Loihi runs: rounded to multiples of 2/64 and clipped, exactly as lava-dl does."""
    return _RoundSTE.apply(w).clamp(WEIGHT_MIN, WEIGHT_MAX)


# Module roles, matched with isinstance (SpikingJelly's layer.* subclass these).
SYNAPSES = (nn.Conv2d, nn.Linear)
AVG_POOLS = (nn.AvgPool2d,)
MAX_POOLS = (nn.MaxPool2d,)
FLATTENS = (nn.Flatten,)
NORMS = (nn.modules.batchnorm._NormBase,)  # BatchNorm & co.: fold_batchnorm folds or refuses them
IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
