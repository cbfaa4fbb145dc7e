"""fold_constant_scales: a multiplication by a constant (``x * 2.74``) folded into the next synapse's weights.

SpikingJelly's OTTT VGG multiplies every layer's spikes by a constant (its ``Scale`` module, after
weight standardisation). A synapse is linear, and so are the ops a Loihi layer may put between a
neuron and the next synapse (average pools, flattens; a max pool when the constant is positive),
so ``conv(pool(c * x)) == conv'(pool(x))`` with ``conv'`` = the conv with its weights times c (its
bias unchanged). A constant that reaches no synapse that way is left for the later passes, which
refuse it.
"""
from __future__ import annotations

import numbers
import operator

import torch
import torch.fx as fx

from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import bypass, module_of, path_of
from fxlava.target import role_of

_MULS = {operator.mul, operator.imul, torch.mul}


def _constant_factor(node: fx.Node):
    """(input node, c) for ``x * c``, ``c * x``, ``torch.mul(x, c)``, ``x.mul(c)`` with a real constant c."""
    if node.kwargs or len(node.args) != 2:
        return None
    if not ((node.op == "call_function" and node.target in _MULS) or (node.op == "call_method"
                                                                       and node.target in ("mul", "mul_"))):
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, numbers.Real) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, numbers.Real) and not isinstance(a, bool):
        return b, float(a)
    return None


def _synapse_after(gm: fx.GraphModule, node: fx.Node, c: float):
    """The synapse node that alone reads ``node`` through linear, single-user ops, else None."""
    n = node
    while len(n.users) == 1:
        n = next(iter(n.users))
        role = role_of(module_of(gm, n)) if n.op == "call_module" else None
        if role == "synapse":
            uses = [u for u in gm.graph.nodes if u.op == "call_module" and u.target == n.target]
            return n if len(uses) == 1 and len(n.all_input_nodes) == 1 else None
        if role in ("avg_pool", "adaptive_pool", "flatten", "identity") or (role == "max_pool" and c > 0):
            if len(n.all_input_nodes) != 1:
                return None
            continue
        return None
    return None


def fold_constant_scales(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Fold ``x * c`` into the weights of the synapse it feeds (through pools and flattens)."""
    folded = []
    for node in list(gm.graph.nodes):
        found = _constant_factor(node) if not ctx.is_refused(node) else None
        if found is None:
            continue
        src, c = found
        syn = _synapse_after(gm, node, c)
        if syn is None:
            continue
        module = module_of(gm, syn)
        with torch.no_grad():
            module.weight.mul_(c)
        folded.append(f"x {c:g} into {path_of(syn)}'s weights (at {path_of(node) or node.name})")
        node.args = (src,)
        bypass(gm, node)
    if folded:
        ctx.record("fold_constant_scales", "; ".join(folded))
    gm.recompile()
    return PassResult(gm, bool(folded))
