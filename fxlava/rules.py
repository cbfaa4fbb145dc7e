"""Loihi and netx rules, kept importable under their old names; the description itself is fxlava.target."""
from __future__ import annotations

from fxlava.target import (AVG_POOLS, DECAY_SCALE, FLATTENS, IDENTITIES, MAX_POOLS, NORMS, SYNAPSES,  # noqa: F401
                           WEIGHT_MAX, WEIGHT_MIN, WEIGHT_SCALE, WEIGHT_STEP, quantize_weight)

__all__ = [
    "WEIGHT_SCALE", "WEIGHT_STEP", "WEIGHT_MIN", "WEIGHT_MAX", "DECAY_SCALE",
    "quantize_weight", "SYNAPSES", "AVG_POOLS", "MAX_POOLS", "FLATTENS", "NORMS", "IDENTITIES",
]
