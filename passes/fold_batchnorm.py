"""fold_batchnorm: a BatchNorm right after a conv or linear synapse becomes part of its weights.

fxlava compiles the model in eval mode, so a BatchNorm normalises with its running statistics,
also when the user's model is in training mode. Per output channel c it is then the affine map

    y[c] = s[c] x[c] + b[c],   s = gamma / sqrt(running_var + eps),   b = beta - s running_mean

(gamma = 1 and beta = 0 without ``affine``). ``s`` folds into the synapse exactly:
w'[c] = s[c] w[c] (and a synapse bias b0 becomes s b0); the folded weights are then quantised
like any other. ``b`` is a bias: with bias currents on (``fxlava.compile(..., bias="current")``,
the ``bias_to_current`` pass) it is added to the synapse's bias, s b0 + b, which becomes the
neuron's bias current (quantised to steps of 1/64; refused where it quantises outside 13 bits,
where the neuron after it has current decay < 1, or where a max pool or anything but a neuron
follows). By default a BatchNorm is folded only when ``b`` is exactly 0 in every channel
(computed in float64 from its parameters): for example ``affine=False``, or ``beta = 0``, with a
zero ``running_mean``; one with a shift is refused, named, with the opt-in as the fix.

Folded: ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``, SpikingJelly's ``layer.BatchNorm1d`` /
``layer.BatchNorm2d`` and ``layer.ThresholdDependentBatchNorm1d`` / ``2d`` (a BatchNorm whose
gamma starts at alpha * v_th: the same map in eval mode), directly after a ``Conv2d`` /
``Linear`` that feeds nothing else. Refused: any other normalisation (per-time-step,
membrane-potential, layer, group and instance norms, lava-dl's weight-scale BatchNorm), a
BatchNorm without running statistics, and a BatchNorm anywhere else.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.errors import Issue, issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import add_module, bypass, module_of, path_of, set_module
from fxlava.passes.bias_to_current import bias_currents_on, neuron_issue
from fxlava.passes.reject_bias import FIX_OPT_IN
from fxlava.target import SYNAPSES, bias_out_of_range

PASS = "fold_batchnorm"


@dataclass
class _Fold:
    bn: fx.Node
    synapse: fx.Node
    scale: torch.Tensor  # float64, one per output channel
    bias: Optional[torch.Tensor] = None  # float64, the folded synapse bias (None: the synapse has none)


def _foldable_types() -> tuple:
    from spikingjelly.activation_based import layer

    return (nn.BatchNorm1d, nn.BatchNorm2d, layer.BatchNorm1d, layer.BatchNorm2d,
            layer.ThresholdDependentBatchNorm1d, layer.ThresholdDependentBatchNorm2d)


def _is_normalisation(m: nn.Module) -> bool:
    """Every normalisation layer this pass must fold or refuse."""
    module = type(m).__module__
    return (isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm))
            or module.startswith("spikingjelly.activation_based.layer.bn")
            or (module == "spikingjelly.activation_based.lava_exchange" and "Norm" in type(m).__name__))


def _why_not_foldable(m: nn.Module) -> tuple[str, str]:
    name = type(m).__name__
    if "TemporalEffective" in name:
        return (f"a normalisation that scales every time step differently ({name}); a Loihi synapse is the "
                f"same at every step", "use layer.BatchNorm2d / BatchNorm1d (affine=False) and retrain")
    if "ThroughTime" in name:
        return (f"a normalisation with one BatchNorm per time step ({name}); a Loihi synapse is the same at "
                f"every step", "use layer.BatchNorm2d / BatchNorm1d (affine=False) and retrain")
    if type(m).__module__ == "spikingjelly.activation_based.lava_exchange":
        return (f"lava-dl's weight-scale BatchNorm ({name}), whose weight exponent netx does not export",
                "remove it, or use layer.BatchNorm2d (affine=False) after the synapse and retrain")
    if "3d" in name or isinstance(m, nn.BatchNorm3d):
        return (f"a 3-d BatchNorm ({name}); fxlava compiles 2-d convolutions and linear layers only",
                "use a 2-d network (Conv2d / Linear with BatchNorm2d / BatchNorm1d)")
    if isinstance(m, _foldable_types()[:2]):
        return (f"a subclass of a BatchNorm ({name}) whose forward fxlava cannot verify",
                "use nn.BatchNorm1d / nn.BatchNorm2d (or SpikingJelly's layer.BatchNorm1d / 2d) directly")
    return (f"a normalisation with no fixed per-channel scale ({name}): it depends on each input or on "
            f"state, which Loihi synapses cannot compute",
            "remove it, or use nn.BatchNorm2d / BatchNorm1d (affine=False) right after the synapse, and retrain")


def _scale_and_shift(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale x + shift, per channel, in float64."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - scale * mean


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[_Fold], list[Issue]]:
    currents = bias_currents_on(ctx)
    folds, issues = [], []
    for node in gm.graph.nodes:
        bn = module_of(gm, node)
        if bn is None or not _is_normalisation(bn) or ctx.is_refused(node):
            continue
        if type(bn) not in _foldable_types():
            issues.append(issue_at(node, *_why_not_foldable(bn), module=bn))
            continue
        src = node.args[0] if node.args else None
        syn = module_of(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(syn, SYNAPSES) or src.meta.get("fxlava_kind") == "sumpool":
            what = f"after {path_of(src)} ({type(syn).__name__})" if syn is not None else "not after a module"
            issues.append(issue_at(node, "a BatchNorm not directly after a conv or linear synapse (only there does "
                                         "it fold into weights)",
                                   f"it comes {what}; move it right after the Conv2d/Linear whose output it "
                                   f"normalises, or remove it", module=bn))
            continue
        if len(src.users) != 1:
            issues.append(issue_at(node, "a BatchNorm after a synapse whose output also feeds other nodes (folding "
                                         "it into the weights would change them too)",
                                   f"normalise all users of {path_of(src)} or none", module=bn))
            continue
        channels = syn.out_channels if isinstance(syn, nn.Conv2d) else syn.out_features
        if bn.running_mean is None or bn.running_var is None:
            issues.append(issue_at(node, "a BatchNorm without running statistics (track_running_stats=False): it "
                                         "normalises with each batch's statistics, which Loihi cannot compute",
                                   "construct it with track_running_stats=True and retrain", module=bn))
            continue
        if bn.num_features != channels:
            issues.append(issue_at(node, f"a BatchNorm over {bn.num_features} channels after a synapse with "
                                         f"{channels} outputs", "match num_features to the synapse's outputs",
                                   module=bn))
            continue
        scale, shift = _scale_and_shift(bn)
        nonzero = torch.count_nonzero(shift).item()
        bias = None if syn.bias is None else syn.bias.detach().double() * scale
        if nonzero and not currents:
            issues.append(issue_at(node, "a BatchNorm with a non-zero shift beta - gamma * running_mean / "
                                         "sqrt(running_var + eps): a bias, which fxlava compiles as the neuron's "
                                         "bias current only when asked",
                                   f"{nonzero} of {channels} channels have a shift (largest "
                                   f"|shift| {shift.abs().max().item():.3g}); {FIX_OPT_IN}; or make the shift 0 "
                                   f"(affine=False and a zero running_mean) or remove the BatchNorm", module=bn))
            continue
        if nonzero:
            bias = shift if bias is None else bias + shift
            # with a synapse bias too, bias_to_current has checked the neuron already
            problem = neuron_issue(gm, node, "a BatchNorm shift", bn) if syn.bias is None else None
            why = bias_out_of_range(bias)
            if problem is None and why:
                problem = issue_at(node, "a BatchNorm whose shift (with the synapse's bias) Loihi's 13-bit neuron "
                                         "bias cannot hold",
                                   f"{why}; a tiny running_var makes a large shift: check the BatchNorm's statistics, "
                                   f"or remove it", module=bn)
            if problem is not None:
                issues.append(problem)
                continue
        folds.append(_Fold(node, src, scale, bias))
    return folds, issues


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every normalisation that is not a BatchNorm right after a synapse (shift-free unless bias currents are on)."""
    return _plan(gm, ctx)[1]


def fold_batchnorm(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Fold each BatchNorm into the synapse before it (eval mode; its shift into the bias with bias currents on)."""
    folds, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    for fold in folds:
        if ctx.is_refused(fold.synapse):  # it folds once the synapse is fixed; nothing else to report here
            ctx.leave(fold.bn, because=fold.synapse)
            continue
        syn = module_of(gm, fold.synapse)
        folded = copy.deepcopy(syn)  # a synapse module called from several places keeps its weights there
        shape = (-1,) + (1,) * (syn.weight.dim() - 1)
        with torch.no_grad():
            folded.weight.copy_((syn.weight.detach().double() * fold.scale.reshape(shape)).to(syn.weight.dtype))
        if fold.bias is not None:
            folded.bias = nn.Parameter(fold.bias.to(syn.weight.dtype), requires_grad=syn.weight.requires_grad)
        shared = any(n is not fold.synapse and n.op == "call_module" and n.target == fold.synapse.target
                     for n in gm.graph.nodes)
        if shared:
            fold.synapse.target = add_module(gm, f"_fxlava_bnfold_{fold.synapse.name}", folded)
        else:
            set_module(gm, fold.synapse.target, folded)
        fold.synapse.meta["fxlava_folded_batchnorm"] = path_of(fold.bn)
        shifted = "" if fold.bias is None else (f"; bias in [{fold.bias.min().item():.4g}, "
                                                f"{fold.bias.max().item():.4g}]")
        ctx.record(PASS, f"folded {path_of(fold.bn)} into {path_of(fold.synapse)} (weights x per-channel scale in "
                         f"[{fold.scale.min().item():.4g}, {fold.scale.max().item():.4g}]; running statistics{shifted})")
        bypass(gm, fold.bn)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, any(not ctx.is_settled(f.bn) for f in folds))


fold_batchnorm.check = check
