"""The target, Loihi 2 as lava-dl's netx expresses it, described as data.

Everything fxlava knows about the hardware lives here, and passes, backends, the CLI and the
compiler ask this module instead of re-deriving it:

* fixed-point formats: scales and bit widths of weights, decays, thresholds, biases, delays
  and the voltage (what ``slayer`` quantises to and what ``netx`` writes into Lava);
* module roles: which torch / SpikingJelly / fxlava modules are synapses, neurons, pools,
  flattens, normalisations and identities (``role_of``);
* which role may feed which in a netx network (``MAY_FEED``), a straight chain of layers, each
  a synapse followed by a layer of neurons, or a flatten;
* what netx loads (layer and neuron types);
* the fix to give for a module kind the target lacks (``fix_for``).

Numbers measured or read from lava-dl 0.6.0 and lava-nc 0.10.0 (see DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = [
    "WEIGHT_SCALE", "WEIGHT_MANT_BITS", "WEIGHT_MANT_MIN", "WEIGHT_MANT_MAX", "WEIGHT_STEP", "WEIGHT_MIN",
    "WEIGHT_MAX", "DECAY_BITS", "DECAY_SCALE", "STATE_SCALE", "NEURON_SCALE", "V_TH_MANT_BITS", "V_TH_MANT_MAX",
    "V_TH_MANT_TIE_EXACT",
    "BIAS_MANT_BITS", "BIAS_MANT_MIN", "BIAS_MANT_MAX", "BIAS_EXP", "MAX_DELAY", "VOLTAGE_BITS", "VOLTAGE_MIN",
    "VOLTAGE_MAX", "WeightGrid", "EVEN_GRID", "FINE_GRID", "WEIGHT_GRIDS", "quantize_weight", "weight_steps", "row_blocks", "step_sums", "STEP_BLOCK", "BIAS_STEP", "BIAS_MIN", "BIAS_MAX", "quantize_bias", "bias_mantissa",
    "bias_out_of_range",
    "SYNAPSES", "AVG_POOLS", "MAX_POOLS", "ADAPTIVE_POOLS", "FLATTENS", "NORMS", "IDENTITIES", "ROLES",
    "MAY_FEED", "role_of", "is_neuron", "is_stateful", "NETX_LAYER_TYPES", "NETX_NOT_IMPLEMENTED",
    "NETX_NEURON_TYPES", "ENCODING_OPS", "fix_for", "fix_for_op", "unlowered", "is_attention",
]

# ---------------------------------------------------------------------------------------------
# Fixed-point formats

#: Weights are 8-bit mantissas at scale 1 << 6. lava-dl's own grid: even mantissas in [-256, 254], i.e.
#: multiples of 2/64 in [-4, 3.97] (slayer.neuron.base.Neuron.quantize_8bit; netx casts them with
#: astype(int)). The WEIGHT_* names below are that grid; ``WeightGrid`` describes both grids fxlava uses.
WEIGHT_SCALE = 1 << 6
WEIGHT_MANT_BITS = 8
WEIGHT_MANT_MIN = -(1 << WEIGHT_MANT_BITS)  # -256
WEIGHT_MANT_MAX = (1 << WEIGHT_MANT_BITS) - 2  # 254: slayer keeps even mantissas only
WEIGHT_STEP = 2 / WEIGHT_SCALE
WEIGHT_MIN = WEIGHT_MANT_MIN / WEIGHT_SCALE
WEIGHT_MAX = WEIGHT_MANT_MAX / WEIGHT_SCALE

#: Current and voltage decays are 12-bit: 4096 means 1.0 (iDecay, vDecay).
DECAY_BITS = 12
DECAY_SCALE = 1 << DECAY_BITS
#: Neuron states (current, voltage) are integers in units of 1/4096 (slayer's s_scale).
STATE_SCALE = 1 << 12
#: The neuron scale of netx's CUBA neurons: threshold mantissa vThMant = threshold * 64.
NEURON_SCALE = WEIGHT_SCALE
#: vThMant is a 17-bit unsigned field.
V_TH_MANT_BITS = 17
V_TH_MANT_MAX = (1 << V_TH_MANT_BITS) - 1
#: The largest vThMant at which lava-dl (slayer) still fires strictly above the threshold, as Loihi
#: does: from 4096 (threshold 64) up slayer's 0.01 / 4096 epsilon is lost to float32 and it fires at
#: ties (fxlava.neuron), so lava-dl and Lava differ there.
V_TH_MANT_TIE_EXACT = (1 << 12) - 1

#: A layer's bias becomes CUBA bias_mant: 13-bit signed, exponent 6 (the weights' scale). Lava adds
#: bias_mant * 2**6 to the voltage (units of 1/4096) every step: a real bias of bias_mant / 64, in
#: steps of 1/64 (not 2/64 as the weights), in [-64, 63.984375].
BIAS_MANT_BITS = 13
BIAS_MANT_MIN = -(1 << (BIAS_MANT_BITS - 1))
BIAS_MANT_MAX = (1 << (BIAS_MANT_BITS - 1)) - 1
BIAS_EXP = 6
BIAS_STEP = 1 / WEIGHT_SCALE
BIAS_MIN = BIAS_MANT_MIN * BIAS_STEP
BIAS_MAX = BIAS_MANT_MAX * BIAS_STEP

#: Axonal delays of dense layers, in time steps.
MAX_DELAY = 62

#: Lava clips the voltage to 24 bits signed: [-(2^23 - 1), 2^23 - 1] in units of 1/4096 (about +-2048).
VOLTAGE_BITS = 24
VOLTAGE_MAX = (1 << (VOLTAGE_BITS - 1)) - 1
VOLTAGE_MIN = -VOLTAGE_MAX


@dataclass(frozen=True)
class WeightGrid:
    """A grid of 8-bit weight mantissas at scale 64 (``WEIGHT_SCALE``) that lava-dl, netx and Lava all run exactly."""

    name: str  # the step, as the layer table shows it
    mant_step: int
    mant_min: int
    mant_max: int

    @property
    def step(self) -> float:
        return self.mant_step / WEIGHT_SCALE

    @property
    def min(self) -> float:
        return self.mant_min / WEIGHT_SCALE

    @property
    def max(self) -> float:
        return self.mant_max / WEIGHT_SCALE

    @property
    def step_range(self) -> tuple[int, int]:
        """The mantissas' range in units of the step: (min, max) of ``round(w / step)``."""
        return self.mant_min // self.mant_step, self.mant_max // self.mant_step

    def __str__(self) -> str:
        return f"steps of {self.name} in [{self.min:g}, {self.max:g}]"


#: lava-dl's grid (slayer's quantize_8bit): even mantissas in [-256, 254]. Stored in a netx file they
#: need int16 once they pass [-128, 127]. Kept where weights must stay as they are: co-scaling off,
#: weights already on this grid (quantisation-aware training without co-scaling), pools and relays.
EVEN_GRID = WeightGrid("2/64", 2, WEIGHT_MANT_MIN, WEIGHT_MANT_MAX)
#: Every mantissa in [-128, 127]: as many levels as EVEN_GRID over half its range, and int8 in the file.
#: netx reads a layer's ``weight`` as the mantissas themselves: a conv as they are, a dense layer through
#: optimize_weight_bits (lava/lib/dl/netx/utils.py), which shifts odd [-128, 127] mantissas left by one
#: bit with weight exponent -1, exactly as it treats even ones; Lava's CPU Dense and Conv take any
#: integer. Co-scaled layers use this grid: the factor fills its range instead of EVEN_GRID's.
FINE_GRID = WeightGrid("1/64", 1, -(1 << (WEIGHT_MANT_BITS - 1)), (1 << (WEIGHT_MANT_BITS - 1)) - 1)
WEIGHT_GRIDS = {grid.name: grid for grid in (EVEN_GRID, FINE_GRID)}


class _RoundSTE(torch.autograd.Function):
    """Round to multiples of ``step``; the gradient passes straight through (as slayer's quantize does)."""

    @staticmethod
    def forward(ctx, x, step):
        return torch.round(x / step) * step

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize_weight(w: torch.Tensor, grid: WeightGrid = EVEN_GRID) -> torch.Tensor:
    """The weights Loihi runs: rounded to the grid's step and clipped to its range (EVEN_GRID: as lava-dl does)."""
    return _RoundSTE.apply(w, grid.step).clamp(grid.min, grid.max)


#: Values per block of ``weight_steps``: large enough that the per-op overhead is small against the
#: work, small enough that a block stays in cache (VGG-11's first Linear has 103 M weights).
STEP_BLOCK = 1 << 18


def row_blocks(weight: torch.Tensor):
    """``weight`` as [out, fan-in] blocks of whole rows (output channels): yields ``(rows, scratch)``.

    ``scratch`` is a buffer of the block's shape (the weights' float dtype) that the next block reuses:
    a block's temporaries stay in cache, and none the size of a large layer is ever made.
    """
    rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() else weight.detach().reshape(1, 1)
    dtype = rows.dtype if rows.is_floating_point() else torch.float32
    per_block = max(1, STEP_BLOCK // max(1, rows.shape[1]))
    buf = torch.empty(min(per_block, rows.shape[0]) * rows.shape[1], dtype=dtype, device=rows.device)
    for start in range(0, rows.shape[0], per_block):
        part = rows[start:start + per_block]
        yield part, buf[:part.numel()].view(part.shape)


def weight_steps(weight: torch.Tensor, grid: WeightGrid = EVEN_GRID, scale: float = 1.0):
    """``weight * scale / grid.step`` by blocks of whole rows (``row_blocks``): yields ``(rows, x)``.

    ``x`` is the block's scratch buffer. ``x.round_().clamp_(*grid.step_range)`` are the mantissas of
    ``quantize_weight(weight * scale, grid)`` in units of the step: the step is a power of two, so one
    multiply by ``scale / step`` rounds exactly as ``weight * scale`` does.
    """
    factor = scale / grid.step
    for part, x in row_blocks(weight):
        yield part, torch.mul(part, factor, out=x)


def step_sums(x: torch.Tensor) -> torch.Tensor:
    """Row sums of a ``weight_steps`` block of mantissas (whole numbers, at most 128 in magnitude), exact.

    Summed in float32 while no sum can pass 2**24, where float32 still holds every whole number.
    """
    return x.sum(1) if x.shape[1] * 128 < (1 << 24) else x.sum(1, dtype=torch.float64)


def quantize_bias(b: torch.Tensor) -> torch.Tensor:
    """The bias Loihi adds: rounded (half to even) to multiples of 1/64, clipped to the 13-bit mantissa."""
    return _RoundSTE.apply(b, BIAS_STEP).clamp(BIAS_MIN, BIAS_MAX)


def bias_mantissa(b: torch.Tensor) -> torch.Tensor:
    """netx's ``bias`` (Lava's bias_mant): the integer mantissas of ``quantize_bias(b)``, int64."""
    return torch.round(quantize_bias(b.detach().double()) / BIAS_STEP).to(torch.int64)


def bias_out_of_range(b: torch.Tensor) -> str:
    """Why ``b`` does not fit Loihi's 13-bit bias after rounding to steps of 1/64 ('' if it fits)."""
    mant = torch.round(b.detach().double() / BIAS_STEP)
    bad = (mant < BIAS_MANT_MIN) | (mant > BIAS_MANT_MAX)
    if not bool(bad.any()):
        return ""
    return (f"{int(bad.sum())} of {b.numel()} bias values quantise outside Loihi's 13-bit bias mantissa "
            f"[{BIAS_MANT_MIN}, {BIAS_MANT_MAX}], i.e. outside [{BIAS_MIN:g}, {BIAS_MAX:g}] in steps of 1/64 "
            f"(largest |bias| {b.detach().abs().max().item():.4g})")


# ---------------------------------------------------------------------------------------------
# Module roles, matched with isinstance (SpikingJelly's layer.* subclass these)

SYNAPSES = (nn.Conv2d, nn.Linear)
AVG_POOLS = (nn.AvgPool2d,)
MAX_POOLS = (nn.MaxPool2d,)
ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
FLATTENS = (nn.Flatten,)
NORMS = (nn.modules.batchnorm._NormBase,)  # BatchNorm & co.: fold_batchnorm folds or refuses them
IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)

#: Every role a module can play, in the order ``role_of`` tests them.
ROLES = ("block", "neuron", "synapse", "avg_pool", "max_pool", "adaptive_pool", "flatten", "norm", "identity",
         "stateful")

#: What may feed what in a netx network, by role: a straight chain from the input, each layer a
#: synapse followed by its neurons (one netx conv/dense layer), or a flatten before a dense
#: synapse. Anything else has to be lowered into these before blocks are fused.
MAY_FEED = {
    "input": ("synapse", "flatten"),
    "synapse": ("neuron",),
    "neuron": ("synapse", "flatten", "output"),
    "flatten": ("synapse",),
}


@lru_cache(maxsize=None)
def _sj_types() -> dict:
    from spikingjelly.activation_based import base, layer, neuron, rnn

    return {
        "neuron": (neuron.BaseNode, neuron.SimpleBaseNode),
        # SpikingJelly's spiking RNN layers keep their recurrent state in local variables, not as memories
        "stateful": (base.MemoryModule, rnn.SpikingRNNBase, rnn.SpikingRNNCellBase),
        "identity": (layer.Dropout,),  # layer.Dropout2d subclasses layer.Dropout
    }


def is_neuron(m: nn.Module) -> bool:
    """A spiking neuron: SpikingJelly's (before substitute_neurons) or fxlava's CUBA neuron."""
    from fxlava.neuron import CubaNeuron

    return isinstance(m, CubaNeuron) or isinstance(m, _sj_types()["neuron"]) or \
        type(m).__module__.startswith("spikingjelly.activation_based.neuron")


def is_stateful(m: nn.Module) -> bool:
    """A module with state across time steps (a neuron or another SpikingJelly memory module)."""
    return is_neuron(m) or isinstance(m, _sj_types()["stateful"])


def role_of(m: Optional[nn.Module]) -> Optional[str]:
    """The role of module ``m`` in the target (one of ``ROLES``), or None for a kind the target lacks."""
    if m is None:
        return None
    from fxlava.blocks import is_block

    if is_block(m):
        return "block"
    if is_neuron(m):
        return "neuron"
    for role, types in (("synapse", SYNAPSES), ("avg_pool", AVG_POOLS), ("max_pool", MAX_POOLS),
                        ("adaptive_pool", ADAPTIVE_POOLS), ("flatten", FLATTENS), ("norm", NORMS),
                        ("identity", IDENTITIES + _sj_types()["identity"])):
        if isinstance(m, types):
            return role
    if isinstance(m, _sj_types()["stateful"]):  # after identity: SpikingJelly's Dropout keeps its mask as state
        return "stateful"
    return None


# ---------------------------------------------------------------------------------------------
# What netx loads

#: The layer types lava.lib.dl.netx.hdf5.Network._create really builds. It also names pool, convT,
#: unpool, average and concat, but raises NotImplementedError for each of them at load time.
NETX_LAYER_TYPES = frozenset({"conv", "dense", "dense_rec", "flatten"})
NETX_NOT_IMPLEMENTED = ("average", "concat", "convT", "pool", "unpool")
#: Neuron types Network.get_neuron_params maps to a Lava process. For others (ALIF) it returns None
#: and loading fails; ADRF_* match its `"RF" in type` test and would silently lose their adaptation.
NETX_NEURON_TYPES = frozenset({"CUBA", "LOIHI", "SDNN", "RF_PHASE", "RF_IZHIKEVICH"})


# ---------------------------------------------------------------------------------------------
# Fixes for what the target lacks

#: Operations that turn a static input into a sequence (x.unsqueeze(0).repeat(T, ...)): an encoder.
ENCODING_OPS = frozenset({"unsqueeze", "repeat", "expand", "expand_as", "repeat_interleave", "stack"})

_NO_EQUIVALENT_FIX = "remove it from the network that goes to Loihi, or write a pass that lowers it"

#: (module types, fix), first match wins.
_MODULE_FIXES = (
    ((nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SiLU, nn.Hardtanh),
     "Loihi layers pass spikes, not activations: replace it with a spiking neuron (IFNode/LIFNode)"),
    ((nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool3d),
     "use nn.MaxPool2d after a spiking neuron (a max of spikes is an OR, which fxlava compiles)"),
    ((nn.AvgPool1d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool3d),
     "use nn.AvgPool2d (or an AdaptiveAvgPool2d whose output size divides its input) before a conv, a "
     "flatten + linear, or a spiking neuron"),
    ((nn.ZeroPad2d, nn.ConstantPad2d),
     "drop it and give the next conv padding= instead (netx pads each side of a conv equally, with zeros)"),
    ((nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
     "use nn.Conv2d or nn.Linear: netx's conv layers are 2-d convolutions"),
)


def fix_for(m: nn.Module) -> str:
    """The fix to give for a module whose kind the target lacks."""
    for types, fix in _MODULE_FIXES:
        if isinstance(m, types):
            return fix
    return _NO_EQUIVALENT_FIX


#: For a module of a known role that no pass lowered (a pass removed from the pipeline, or a user's
#: pipeline that does not handle it): (reason, fix).
_UNLOWERED = {
    "neuron": ("a spiking neuron no pass substituted by Loihi's CUBA neuron",
               "keep the substitute_neurons pass in the pipeline, or substitute it in a pass of your own"),
    "stateful": ("a stateful module no pass lowered",
                 "remove it from the network that goes to Loihi, or write a pass that lowers it"),
    "norm": ("a normalisation no pass folded into a synapse",
             "keep the fold_batchnorm pass in the pipeline, or remove the normalisation"),
    "identity": ("an identity no pass removed", "keep the remove_identities pass in the pipeline, or remove it"),
    "avg_pool": ("an average pool no pass lowered",
                 "keep the avgpool_to_sumpool pass in the pipeline; an average pool must feed a conv, a flatten + "
                 "linear, or a spiking neuron"),
    "max_pool": ("a max pool no pass lowered",
                 "keep the maxpool_to_or pass in the pipeline; a max pool must pool spikes"),
    "adaptive_pool": ("an adaptive pool no pass lowered",
                      "keep the lower_adaptive_pools pass in the pipeline, or use AvgPool2d/MaxPool2d"),
}


#: SpikingJelly's attention layers (MA-SNN's MultiDimensionalAttention, TemporalWiseAttention, ...), which
#: are whole modules of the trace: named as attention, like a user's q @ k.
ATTENTION_MODULES = ("spikingjelly.activation_based.layer.attention",)
ATTENTION = ("attention: {name} weighs its input by scores computed from that same input (a product of two "
             "activations), which Loihi's fixed synaptic weights cannot compute")


def is_attention(m: Optional[nn.Module]) -> bool:
    """One of SpikingJelly's attention layers."""
    return m is not None and type(m).__module__.startswith(ATTENTION_MODULES)


def unlowered(m: nn.Module) -> tuple[str, str]:
    """(reason, fix) for a module still in the graph when blocks are fused, and not a synapse or flatten."""
    if is_attention(m):
        return (ATTENTION.format(name=type(m).__name__),
                "remove the attention layer (the network without it is a chain Loihi can run), or run it off Loihi")
    role = role_of(m)
    if role in _UNLOWERED:
        return _UNLOWERED[role]
    return "a module with no Loihi equivalent in fxlava", fix_for(m)


def fix_for_op(node: fx.Node) -> tuple[str, str]:
    """(reason, fix) for a function or method call the target lacks."""
    name = getattr(node.target, "__name__", node.target)
    if name in ENCODING_OPS:
        return ("an input encoding inside forward() (Loihi's input layer takes spikes)",
                "move the encoding out of forward() and give the model [T, N, *] spikes, "
                "e.g. encoding.PoissonEncoder applied T times to the image; then compile that model")
    return ("an operation with no Loihi equivalent in fxlava",
            "remove it from forward() (compute it outside the model), or write a pass that lowers it")
