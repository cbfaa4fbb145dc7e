"""coscale_layers: per layer, one factor on weights, bias and threshold that fills Loihi's 8-bit weights.

Loihi keeps a layer's weights as 8-bit mantissas at scale 64. lava-dl's grid is the even
mantissas, multiples of 2/64 in [-256/64, 254/64] (``fxlava.target.EVEN_GRID``); every mantissa
in [-128, 127], multiples of 1/64 in [-2, 127/64] (``FINE_GRID``), has as many levels, runs
exactly in netx and Lava too, and fits an int8 in the netx file. A trained layer whose largest
weight is 0.4 uses a fifth of that range, and its small weights round to zero. A CUBA neuron
with reset to 0 (IF, LIF, PLIF, CUBA) is linear in its input, voltage, bias and threshold
together: multiplying the layer's weights, bias and threshold by one factor ``s`` changes no
spike in real arithmetic, only what rounds. So per layer this pass picks the largest ``s`` that
Loihi's formats allow:

* weights: ``s * w`` within the grid's range (nothing clipped);
* threshold: ``s * threshold`` below 64 (vThMant <= 4095): the 17-bit field holds more, but from
  64 up slayer fires at ties where Loihi does not (``fxlava.neuron``), so lava-dl and Lava would
  differ;
* bias: ``round(64 s b)`` within the 13-bit signed mantissa;
* voltage: the largest voltage the layer can reach in the example input's T steps (every
  excitatory input spiking each step, or every inhibitory one) within Loihi's 24-bit voltage.

It never scales a layer down except to avoid clipping. ``s`` is then rounded down so that the
threshold is exact (``64 s threshold`` an integer). Weights (and bias) that already sit on
lava-dl's grid (built so, or trained on the compiled graph without co-scaling) keep that grid
and an integer factor, which keeps them exact; every other co-scaled layer gets FINE_GRID
(``block.weight_grid``, and the layer's record says which). The weights of ``block.synapse`` stay in
the model's units (what training updates, and what goes back into the model); ``block.scale``
holds ``s``, ``block.scaled_weight`` is what Loihi's mantissas are made from, and the neuron is
a ``CubaNeuron`` with the scaled threshold and ``coscale=s``, so its surrogate gradient is the
model's. Trained with the compiled graph (quantisation-aware training), the factor and the grid
stay the ones chosen at compile time; ``coscale=net.coscale`` compiles the trained model again
with them.

Each layer's weights are read once, in blocks of rows that stay in cache: their range, and per
neuron the sums of its excitatory and of its inhibitory weights, which bound a step's input and
scale linearly with ``s``; then they are quantised once, at the chosen factor.

Ties. SpikingJelly's float neurons fire at ``v >= threshold``, Loihi at ``v > threshold``. Where
every voltage a layer can reach lies on Loihi's 1/64 grid the two agree exactly once the
threshold mantissa is ``ceil(64 s threshold) - 1`` (one step lower when ``64 s threshold`` is a
whole number): an IF-type neuron (current decay 1, voltage decay 0 or 1: no truncation) fed
whole numbers (spikes, or an integer network input). The weights and bias are always on that
grid. Leaky neurons truncate their voltage to 1/4096 each step, so no threshold mantissa gives
``>=``; Loihi then fires like SpikingJelly with the threshold raised by one voltage step,
1/4096 in the scaled units (1/(4096 s) in the model's).

Not scaled, and kept on lava-dl's grid: pooling layers (the fixed weights of a sum pool or an OR
layer, already exact), ``lava_exchange.CubaLIFNode`` layers (already Loihi's fixed-point neuron,
kept bit for bit), layers that carry a skip path as relay channels (``lower_residuals``: a
relay's weight, 254/64, must stay above the threshold), and every layer with
``fxlava.compile(model, x, coscale=False)``, which compiles as without this pass.

Every layer's outcome is recorded: the factor and what bounded it, the weight grid, the threshold mantissa,
weights clipped, weights rounded to zero (count and share) and the bias range. A layer whose
quantised weights are all zero, or that can no longer fire (its largest reachable voltage is
not above its threshold, where the float weights could fire), is refused, naming the layer;
more than a quarter of its weights rounded to zero is a ``QuantizationWarning``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import torch
import torch.fx as fx

from fxlava.blocks import SynapseBlock
from fxlava.errors import Issue, QuantizationWarning, issue_at, user_stacklevel
from fxlava.neuron import P_SCALE, S_SCALE, W_SCALE, CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_of
from fxlava.target import (BIAS_MANT_MAX, EVEN_GRID, FINE_GRID, V_TH_MANT_TIE_EXACT, VOLTAGE_MAX, WEIGHT_GRIDS,
                           WeightGrid, quantize_weight, row_blocks, step_sums, weight_steps)

PASS = "coscale_layers"
OPTION = "coscale"  # fxlava.compile(..., coscale=False) keeps every factor at 1
#: More than this share of a layer's weights rounded to zero is a QuantizationWarning.
ZERO_SHARE_WARNING = 0.25

log = logging.getLogger(__name__)


@dataclass
class LayerQuantization:
    """What quantisation does to one layer (``block.quantization``, the layer table, ``net.records``)."""

    layer: str  # the user's module paths, synapse -> neuron
    scale: float
    limit: str  # what bounded the scale: weights, threshold, bias, voltage; or why it is 1
    v_th_mant: int
    ties_exact: bool  # Loihi's > made SpikingJelly's >= on this layer's grid of voltages
    weights: int
    clipped: int
    zeroed: int  # nonzero weights whose mantissa is 0
    bias_range: Optional[tuple] = None  # (min, max) of the scaled bias, in the threshold's units
    grid: WeightGrid = EVEN_GRID  # the weight mantissas' grid (fxlava.target)
    # (block.weights_key(), block.voltage_floor_steps) as co-scaling found them: compile's check of
    # the voltage floor reuses them while the weights are unchanged
    voltage_floor: Optional[tuple] = field(default=None, repr=False, compare=False)

    @property
    def zero_share(self) -> float:
        return self.zeroed / self.weights if self.weights else 0.0

    def describe(self) -> str:
        bias = "" if self.bias_range is None else f", bias [{self.bias_range[0]:.4g}, {self.bias_range[1]:.4g}]"
        ties = ", ties as SpikingJelly (v >= threshold)" if self.ties_exact else ""
        return (f"{self.layer}: scale x{self.scale:.6g} ({self.limit}), weights on {self.grid}, "
                f"vThMant {self.v_th_mant}{ties}; "
                f"weights clipped {self.clipped}, rounded to zero {self.zeroed}/{self.weights} "
                f"({self.zero_share:.1%}){bias}")


@dataclass
class _Plan:
    node: fx.Node
    block: SynapseBlock
    scale: float
    grid: WeightGrid
    neuron: Optional[CubaNeuron]  # the replacement neuron, None to keep it
    report: LayerQuantization
    inhibition: torch.Tensor  # block.inhibition_steps() at this scale and grid


def _layer_name(block: SynapseBlock, node: fx.Node) -> str:
    return block.layer or node.name


def _bias(block: SynapseBlock) -> Optional[torch.Tensor]:
    """The synapse's bias in the model's units (its current is ``block.scaled_bias``), or None."""
    b = getattr(block.synapse, "bias", None)
    return None if b is None else b.detach().double()


def _gain(decay: float, steps: int) -> float:
    """How many steps of a constant input a state with this decay can add up within ``steps``."""
    return float(steps) if decay == 0.0 else min(float(steps), 1.0 / decay)


@dataclass
class _Weights:
    """What the factor depends on, read once per layer: the range, and per neuron the sums of its
    excitatory and of its inhibitory weights (a step's largest input of each sign, linear in the factor)."""

    lo: float
    hi: float
    pos: torch.Tensor  # float64 per output channel: sum of max(w, 0)
    neg: torch.Tensor  # sum of max(-w, 0)
    on_grid: bool  # every weight already on lava-dl's grid (EVEN_GRID)
    nonzero: int = 0  # weights that are not 0

    @classmethod
    def read(cls, w: torch.Tensor) -> "_Weights":
        pos, neg, on_grid, nonzero = [], [], True, 0
        for rows, scratch in row_blocks(w):
            # summed in the weights' dtype (float32 sums twice as fast as float64 here): the voltage
            # bound they give is off by a relative 1e-6 at most, far inside its own slack (every
            # input spiking at every step)
            pos.append(torch.clamp(rows, min=0, out=scratch).sum(1).double())
            neg.append(torch.clamp(rows, max=0, out=scratch).sum(1).double().neg_())
            nonzero += int(torch.ne(rows, 0, out=scratch).sum())  # exact: a block holds < 2**24
            on_grid = on_grid and bool(torch.equal(quantize_weight(rows, EVEN_GRID), rows))
        lo, hi = (float(v) for v in w.detach().aminmax()) if w.numel() else (0.0, 0.0)
        empty = torch.zeros(0, dtype=torch.float64)
        return cls(lo, hi, torch.cat(pos) if pos else empty, torch.cat(neg) if neg else empty, on_grid, nonzero)

    def per_step(self, b: Optional[torch.Tensor], x_max: float, sign: int, scale: float = 1.0) -> torch.Tensor:
        """Per neuron, the largest input of one sign a step can bring, with weights and bias times ``scale``."""
        s = (self.pos if sign > 0 else self.neg) * x_max
        if scale != 1.0:
            s = s * scale
        if b is None:
            return s
        return s + (sign * (b if scale == 1.0 else b * scale)).clamp(min=0)


@dataclass
class _Quantized:
    """One layer's weights on Loihi's grid at its factor, summed up in one pass."""

    clipped: int  # scaled weights outside the grid's range
    zeroed: int  # nonzero weights whose mantissa is 0
    nonzero: bool  # some mantissa is not 0
    pos: torch.Tensor  # float64 per output channel: sum of the positive quantised weights
    inhibition: torch.Tensor  # minus the sum of the negative ones, in mantissa steps (block.inhibition_steps)

    @classmethod
    def read(cls, w: torch.Tensor, scale: float, grid: WeightGrid, stats: "_Weights") -> "_Quantized":
        # the mantissas of block.quantized_weight in units of the step (fxlava.target.weight_steps), read
        # in blocks that stay in cache; their row sums are whole numbers, exact in float32 (step_sums)
        lo, hi = grid.step_range
        dtype = w.dtype if w.is_floating_point() else torch.float32
        span = torch.tensor([stats.lo, stats.hi], dtype=dtype) * scale
        may_clip = bool(span[0] < grid.min) or bool(span[1] > grid.max)
        clipped = kept = 0
        pos, inhibition = [], []
        scratch = None
        for rows, steps in weight_steps(w, grid, scale):
            if may_clip:  # rare: a scale chosen to fill the range clips nothing
                clipped += int((steps < lo).sum()) + int((steps > hi).sum())
            steps.round_().clamp_(lo, hi)
            if scratch is None:
                scratch = torch.empty_like(steps)
            other = scratch[:steps.shape[0]]
            kept += int(torch.ne(steps, 0, out=other).sum())
            total, size = step_sums(steps), step_sums(torch.abs(steps, out=other))
            total, size = total.double(), size.double()
            pos.append((size + total).mul_(grid.step / 2))  # sum of the positive ones
            inhibition.append(size.sub_(total).mul_(0.5))
        empty = torch.zeros(0, dtype=torch.float64)
        # a zero weight has a zero mantissa
        return cls(clipped, stats.nonzero - kept, kept > 0, torch.cat(pos) if pos else empty,
                   torch.cat(inhibition) if inhibition else empty)

    def per_step(self, qb: Optional[torch.Tensor], x_max: float) -> torch.Tensor:
        """Per neuron, the largest excitatory input of one step on Loihi."""
        s = self.pos * x_max
        return s if qb is None else s + qb.clamp(min=0)


def _voltage_bound(stats: _Weights, b, threshold, neuron: CubaNeuron, x_max, steps) -> float:
    """Largest |voltage| within ``steps`` steps: above, the threshold plus a step's current; below, all inhibition."""
    gu, gv = _gain(neuron.current_decay, steps), _gain(neuron.voltage_decay, steps)
    up = threshold + float(stats.per_step(b, x_max, 1).max()) * gu
    down = float(stats.per_step(b, x_max, -1).max()) * gu * gv
    return max(up, down)


def _can_fire(per_step: torch.Tensor, threshold_mant: int, neuron: CubaNeuron) -> bool:
    """Whether some neuron can get above its threshold, given all the time it needs (``per_step``: its largest input)."""
    reach = float(per_step.max())
    if reach <= 0.0:
        return False
    for decay in (neuron.current_decay, neuron.voltage_decay):
        reach = math.inf if decay == 0.0 else reach / decay
    return reach > threshold_mant / W_SCALE


def _ties_exact(node: fx.Node, neuron: CubaNeuron, integer_input: bool) -> bool:
    """SpikingJelly's >= can be Loihi's > here: a float SJ neuron whose voltages stay on the 1/64 grid."""
    return (bool(node.meta.get("fxlava_fires_at_threshold")) and integer_input
            and neuron.i_decay == P_SCALE and neuron.v_decay in (0, P_SCALE))


def _on_even_grid(stats: _Weights, b) -> bool:
    """Weights (and bias) already on lava-dl's grid: quantisation-aware trained without co-scaling, or built so."""
    return stats.on_grid and (b is None or bool(torch.equal((b * W_SCALE).round(), b * W_SCALE)))


def _choose(stats: _Weights, b, threshold, neuron, x_max, steps) -> tuple[float, str, WeightGrid]:
    """(scale, what bounded it, weight grid).

    Weights already on lava-dl's grid keep it, with a whole factor, so that they stay exact; every
    other layer's factor fills FINE_GRID's range, whose mantissas fit int8 in the netx file.
    """
    on_grid = _on_even_grid(stats, b)
    grid = EVEN_GRID if on_grid else FINE_GRID
    limits = {}
    w_hi, w_lo = stats.hi, stats.lo
    limits["weights"] = min(grid.max / w_hi if w_hi > 0 else math.inf, grid.min / w_lo if w_lo < 0 else math.inf)
    if threshold > 0:
        limits["threshold"] = V_TH_MANT_TIE_EXACT / (W_SCALE * threshold)
    if b is not None and float(b.abs().max()) > 0:
        limits["bias"] = BIAS_MANT_MAX / (W_SCALE * float(b.abs().max()))
    bound = _voltage_bound(stats, b, threshold, neuron, x_max, steps)
    if bound > 0:
        limits["voltage"] = VOLTAGE_MAX / S_SCALE / bound  # states in units of 1/4096
    limit = min(limits, key=limits.get)
    scale = limits[limit]
    if not math.isfinite(scale):
        return 1.0, "no weights", EVEN_GRID
    if scale < 1.0 and limits["weights"] >= 1.0:
        return 1.0, f"{limit} (not scaled down)", grid  # only clipping is worth a coarser grid
    if on_grid and scale >= 1.0:
        return float(math.floor(scale)), f"{limit}, integer: weights already on the grid", grid
    whole = math.floor(W_SCALE * threshold * scale)
    if whole >= 1:
        return whole / (W_SCALE * threshold), limit, grid
    return scale, limit, grid


def _threshold_units(scale: float, threshold: float) -> Fraction:
    """64 * scale * threshold, exactly; a whole number when the scale was chosen to make it one."""
    exact = Fraction(scale) * Fraction(threshold) * W_SCALE
    whole = round(exact)
    return Fraction(whole) if abs(exact - whole) < Fraction(1, 1 << 30) else exact


def _given(value) -> tuple[Optional[float], Optional[WeightGrid]]:
    """A pinned layer's (scale, grid): ``s`` or ``(s, grid name)`` (``net.coscale``); None for no pin or no grid."""
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        return float(value[0]), WEIGHT_GRIDS[value[1]]
    return float(value), None


def _option(ctx: CompileContext):
    """True, False, or the factors to use: {layer: scale} (``net.scales``) or {layer: (scale, grid)} (``net.coscale``)."""
    return ctx.options.get(OPTION, True)  # checked by fxlava.options.CompileOptions


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[_Plan], list[Issue]]:
    option = _option(ctx)
    enabled = option is not False
    pinned = dict(option) if isinstance(option, dict) else None
    x = ctx.example_input
    steps = int(x.shape[0])
    first = True
    plans, issues = [], []
    for node in gm.graph.nodes:
        block = module_of(gm, node)
        if not isinstance(block, SynapseBlock):
            continue
        # the first layer reads the network input, every other one spikes
        x_max = float(x.abs().max()) if first else 1.0
        integer_input = bool(torch.equal(x, x.round())) if first else True
        first = False
        neuron = block.neuron
        w, b = block.synapse.weight, _bias(block)
        stats = _Weights.read(w)
        threshold = neuron.requested["threshold"]
        name = _layer_name(block, node)
        if pinned is not None and name not in pinned:
            raise ValueError(f"{OPTION}: no scale given for layer {name!r}; layers: {_layer_names(gm)}")
        given, given_grid = _given(None if pinned is None else pinned.pop(name))
        grid = EVEN_GRID
        if not enabled:
            scale, limit = 1.0, f"off ({OPTION}=False)"
        elif not block.synapse.weight.requires_grad or block.kind in ("sumpool", "maxpool"):
            scale, limit = 1.0, "fixed pooling weights, exact as they are"
        elif getattr(block, "relay_channels", 0):
            scale, limit = 1.0, "carries relay channels (lower_residuals), whose weight stays above the threshold"
        elif not node.meta.get("fxlava_fires_at_threshold", False):
            scale, limit = 1.0, "fixed-point neuron, kept bit for bit"
        elif given is not None:
            scale, limit = given, "given"
            grid = given_grid or (EVEN_GRID if _on_even_grid(stats, b) and scale.is_integer() else FINE_GRID)
        else:
            scale, limit, grid = _choose(stats, b, threshold, neuron, x_max, steps)
        if given is not None and given != scale:
            raise ValueError(f"{OPTION}: layer {name!r} cannot be scaled ({limit}); give it 1.0")
        if given_grid is not None and given_grid is not grid:
            raise ValueError(f"{OPTION}: layer {name!r} keeps weights on {grid} ({limit}); give it "
                             f"({scale!r}, {grid.name!r})")
        ties = enabled and _ties_exact(node, neuron, integer_input)
        exact = _threshold_units(scale, threshold)
        if ties and exact > 0:
            mant = math.ceil(exact) - 1
        elif enabled:
            mant = math.floor(exact)
        else:
            mant, ties = neuron.v_th_mant, False
        ties = ties and exact > 0
        new = None
        if mant != neuron.v_th_mant or scale != 1.0:
            try:
                new = CubaNeuron(mant / W_SCALE, neuron.current_decay, neuron.voltage_decay,
                                 surrogate_function=neuron.surrogate_function, detach_reset=neuron.detach_reset,
                                 coscale=scale * neuron.coscale)
            except ValueError as exc:
                issues.append(dataclasses.replace(issue_at(node, f"a threshold Loihi cannot hold after co-scaling ({exc})",
                                                           f"lower the threshold, or compile with {OPTION}=False",
                                                           module=block), path=name))
                continue
        quantized = _Quantized.read(w, scale, grid, stats)
        report = LayerQuantization(
            layer=name, scale=scale, limit=limit, v_th_mant=mant, ties_exact=ties, weights=w.numel(),
            clipped=quantized.clipped, zeroed=quantized.zeroed,
            bias_range=None if b is None else (float(b.min() * scale), float(b.max() * scale)), grid=grid)
        qb = None if b is None else (b * scale * W_SCALE).round() / W_SCALE
        live = neuron if new is None else new
        if (stats.lo != 0.0 or stats.hi != 0.0) and not quantized.nonzero:
            issues.append(dataclasses.replace(issue_at(
                node, "a layer whose quantised weights are all zero (every weight is below half a step of "
                      "Loihi's 8-bit grid)",
                f"scale its weights up together with its threshold and retrain"
                + ("" if enabled else f", or compile with {OPTION}=True"), module=block), path=name))
        elif _can_fire(stats.per_step(b, x_max, 1, scale), mant, live) and not _can_fire(
                quantized.per_step(qb, x_max), mant, live):
            issues.append(dataclasses.replace(issue_at(
                node, "a layer that can no longer fire after quantisation (with its weights on Loihi's grid no "
                      "neuron's voltage can exceed its threshold)",
                f"raise its weights against its threshold and retrain"
                + ("" if enabled else f", or compile with {OPTION}=True"), module=block), path=name))
        plans.append(_Plan(node, block, scale, grid, new, report, quantized.inhibition))
    if pinned:
        raise ValueError(f"{OPTION}: scales given for layers this model does not have: {sorted(pinned)}; "
                         f"layers: {_layer_names(gm)}")
    return plans, issues


def _layer_names(gm: fx.GraphModule) -> list[str]:
    return [_layer_name(module_of(gm, n), n) for n in gm.graph.nodes if isinstance(module_of(gm, n), SynapseBlock)]


def coscale_layers(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Scale each layer's weights, bias and threshold by one factor that fills Loihi's 8-bit weight range."""
    plans, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    changed = False
    for plan in plans:
        block, report = plan.block, plan.report
        if plan.neuron is not None:
            block.scale = plan.scale * block.scale
            block.neuron = plan.neuron
            changed = True
        if plan.grid is not block.weight_grid:
            block.weight_grid = plan.grid
            changed = True
        block.quantization = report
        if block.scale == plan.scale:  # the weights were quantised at the block's own factor
            report.voltage_floor = (block.weights_key(), block.floor_steps(plan.inhibition))
        ctx.record(PASS, report.describe())
        if report.zero_share > ZERO_SHARE_WARNING:
            warnings.warn(f"{report.layer}: {report.zeroed} of {report.weights} weights ({report.zero_share:.0%}) "
                          f"round to zero on Loihi's 8-bit grid (scale x{report.scale:.4g}, {report.limit})",
                          QuantizationWarning, stacklevel=user_stacklevel())
    return PassResult(gm, changed)
