"""bias_to_current: every synapse bias becomes Loihi's neuron bias current (opt-in; replaces reject_bias).

Loihi's CUBA neuron adds a constant bias to its voltage every time step,
``v[t] = (1 - voltage_decay) v[t-1] + u[t] + bias``, and netx writes a layer's ``bias`` into it
(``bias_mant``, 13-bit signed, exponent 6: steps of 1/64 of a weight unit). SpikingJelly adds a
conv or linear layer's bias to the synaptic input, i.e. to the current ``u``. The two are the same
neuron when nothing of the current carries over to the next step, current decay 1, which every
SpikingJelly IF, LIF and PLIF neuron has. So each bias is kept on its synapse through the passes
(scaled with the weights by ``fold_batchnorm`` and ``decay_input``, kept by a merged average pool)
and ``fuse_blocks`` makes it the bias of the block, which the backends write as the neuron bias.

Refused, naming the synapse, where that would not be exact:

- a bias into a neuron with current decay < 1 (``CUBALIFNode(c_decay > 0)``,
  ``lava_exchange.CubaLIFNode(current_decay < 1)``): the current would carry the bias over;
- a bias that quantises outside the 13-bit mantissa, [-64, 63.984375];
- a biased synapse that feeds no spiking neuron directly (through a max pool or a padded
  average pool, say): Loihi's bias is the bias of the neuron of the same layer. An unpadded
  average pool between a conv and its neuron merges into the conv, and keeps the bias.

Run it with ``fxlava.compile(model, x, bias="current")``, ``fxlava-compile --bias current``, or
``pipeline.replace("reject_bias", bias_to_current)``. A netx file with biases runs in Lava exactly
only with a reset at the start of every sample (``fxlava.run_lava`` does it; see docs/support.md).
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx
from torch.nn.modules.utils import _pair

from fxlava.errors import Issue, issue_at
from fxlava.neuron import CubaNeuron, _quantised_decay
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_nodes, module_of, next_module_node, path_of
from fxlava.target import DECAY_SCALE, IDENTITIES, MAX_POOLS, NORMS, SYNAPSES, bias_out_of_range

PASS = "bias_to_current"
OPTION = "bias"  # fxlava.compile(..., bias="reject" | "current")
CHOICES = ("reject", "current")


def bias_currents_on(ctx: CompileContext) -> bool:
    """True when the compile turns biases and BatchNorm shifts into bias currents (``bias="current"``)."""
    return ctx.options.get(OPTION, "reject") == "current"


def _identity_types() -> tuple:
    from spikingjelly.activation_based import layer

    return IDENTITIES + (layer.Dropout,)


def _is_residual_add(node: fx.Node) -> bool:
    """An addition of currents into a neuron's input (Spiking ResNet's ``out += identity``): lower_residuals makes
    both addends one layer's synapse, so a bias on either is that layer's bias current."""
    import operator

    import torch

    return node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add) and not node.kwargs


def _unpadded_avg_pool(m) -> bool:
    """An average pool without padding: the mean of a current plus a bias is the mean current plus that bias
    (avgpool_to_sumpool merges a pool between a conv and its neuron into the conv, bias kept)."""
    import torch.nn as nn

    from fxlava.target import AVG_POOLS

    if isinstance(m, AVG_POOLS):
        return not any(_pair(m.padding))
    return isinstance(m, nn.AdaptiveAvgPool2d)


def _skip(gm: fx.GraphModule, node: fx.Node, types: tuple) -> Optional[fx.Node]:
    """The next node after ``node``, stepping over single-user modules of ``types``, unpadded average pools and
    residual additions."""
    user = next_module_node(node)
    while user is not None and (isinstance(module_of(gm, user), types) or _unpadded_avg_pool(module_of(gm, user))
                                or _is_residual_add(user)):
        user = next_module_node(user)
    return user


def current_decay_of(m) -> Optional[int]:
    """The 12-bit current decay the neuron module ``m`` compiles to, or None if it is no neuron fxlava compiles."""
    if isinstance(m, CubaNeuron):
        return m.i_decay
    from fxlava.passes.substitute_neurons import CubaMapping, _is_stateful, cuba_mapping

    if m is None or not _is_stateful(m):
        return None
    mapping = cuba_mapping(m)
    # a neuron substitute_neurons refuses is reported there, once
    return _quantised_decay(mapping.current_decay) if isinstance(mapping, CubaMapping) else DECAY_SCALE


def neuron_issue(gm: fx.GraphModule, node: fx.Node, what: str, module, skip_norms: bool = True) -> Optional[Issue]:
    """An issue if the output of ``node`` (a synapse or a BatchNorm carrying ``what``) reaches no neuron that
    can take it as a bias current; None if it can. ``module`` is the module the issue names."""
    user = _skip(gm, node, _identity_types() + (NORMS if skip_norms else ()))
    neuron = module_of(gm, user) if user is not None else None
    decay = current_decay_of(neuron)
    if decay is None and isinstance(neuron, MAX_POOLS):
        return issue_at(node, f"{what} in front of a max pool: a bias is a current into a spiking neuron, and a max "
                              f"pool compiles only as an OR of the spikes after one",
                        f"move the max pool ({path_of(user)}) after the spiking neuron, as in conv -> BatchNorm -> "
                        f"neuron -> pool, or remove the bias", module=module)
    if decay is None:
        after = f"it feeds {path_of(user)} ({type(neuron).__name__})" if neuron is not None else \
            "it feeds no single module"
        return issue_at(node, f"{what} on a synapse that feeds no spiking neuron directly (Loihi adds a bias to "
                              f"the neuron of the same layer)",
                        f"{after}; put the spiking neuron right after the synapse (a BatchNorm may sit between), "
                        f"or remove the bias", module=module)
    if decay != DECAY_SCALE:
        return issue_at(node, f"{what} into a neuron with current decay < 1 ({path_of(user)}, "
                              f"{type(neuron).__name__}, iDecay {decay} of {DECAY_SCALE}): Loihi adds the bias to the "
                              f"voltage, which equals SpikingJelly's bias on the current only when the current does "
                              f"not carry over from one step to the next",
                        "use a neuron with current decay 1 (IFNode, LIFNode, ParametricLIFNode, CUBALIFNode with "
                        "c_decay=0), or remove the bias and retrain", module=module)
    return None


def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[list[fx.Node], list[Issue]]:
    biased, issues = [], []
    for node, m in module_nodes(gm, SYNAPSES):
        if m.bias is None or ctx.is_refused(node):
            continue
        problem = neuron_issue(gm, node, "a bias", m)
        why = bias_out_of_range(m.bias)
        if why:
            problem = problem or issue_at(node, "a bias that Loihi's 13-bit neuron bias cannot hold",
                                          f"{why}; scale the layer down (weights, bias and the next threshold "
                                          f"together) and retrain", module=m)
        if problem is not None:
            issues.append(problem)
        else:
            biased.append(node)
    return biased, issues


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every synapse bias that cannot be a Loihi bias current exactly."""
    return _plan(gm, ctx)[1]


def bias_to_current(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Compile each synapse bias (and BatchNorm shift) as the next neuron's bias current, current decay 1."""
    biased, issues = _plan(gm, ctx)
    ctx.refuse(issues)
    for node in biased:
        ctx.record(PASS, f"{path_of(node)}: bias -> bias current of the next neuron")
    return PassResult(gm, False)


bias_to_current.check = check
