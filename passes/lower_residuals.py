"""lower_residuals: residual networks -> a straight chain of layers, skip paths carried as relay channels.

netx runs a chain of layers; a residual block forks and merges again. An additive merge is linear
in the spikes, so it can be written as a chain (measured in Lava, DESIGN.md):

* every spiking neuron gets a layer, its depth: one more than the deepest spike source its
  synapses read (the input has depth 0); neurons of equal depth share one netx layer;
* a spike source read by a layer deeper than the next one rides along the layers in between as
  *relay channels*: an identity synapse on the layer's centre tap with weight ``r`` above the
  layer's threshold (``r`` = 254/64, Loihi's largest weight) and a neuron with current decay 1,
  which fires at step t exactly when the source did. Relays take one step per layer in Lava like
  the main path, so nothing needs realigning; a relay follows the layer's stride (the centre tap
  of a 3x3 stride-2 conv reads the pixels a 1x1 stride-2 downsample reads);
* the merge becomes the consumer's synapse over the concatenated channels: SpikingJelly's
  SEW-ResNet ``ADD`` of spikes feeding the next synapse ``W`` is ``[W, W]`` over both sources;
  Spiking-ResNet's add of a synaptic current into a neuron's input (``out += identity`` or a
  downsample conv + BatchNorm) is the sum of both synapses, embedded in one kernel;
* a merge that feeds the network's output runs on the host, as the first step of
  ``net.readout`` (a sum of spikes is not spikes);
* a flatten of a merge (a SEW block's output into a dense head) is the same merge of each source
  flattened: the chain's flatten layer flattens the sources side by side, channels outermost, and
  the dense synapse reads each with its weights.

Neurons sharing a layer must have the same decays (one netx neuron group per layer; refused
otherwise); a different threshold is co-scaled into that neuron's weights (recorded). Refused,
naming the merge or layer and why: multiplicative merges (SEW's ``AND`` and ``IAND``), adds of
anything but spikes and synaptic currents, concatenations of different spatial sizes, geometry
that cannot carry a relay (even kernels, padding other than ``dilation * (kernel - 1) / 2``),
strides a relay cannot follow, thresholds at or above a relay's weight, and relays through
neurons whose current decays. Recurrent containers are refused by ``substitute_neurons``.

The pass changes nothing on a graph that is already a chain, and gives up on one holding a node
it does not know (a ReLU, a node refused earlier): ``fuse_blocks`` then reports it, and the branch.
"""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.errors import Issue, issue_at
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import add_module, module_of, path_of
from fxlava.target import FLATTENS, NEURON_SCALE, SYNAPSES, WEIGHT_MANT_MAX, WEIGHT_MAX, DECAY_SCALE

PASS = "lower_residuals"
log = logging.getLogger(__name__)

#: The relay synapse's weight: Loihi's largest (mantissa 254); a relay fires when its source did
#: as long as the layer's threshold mantissa is below it.
RELAY_WEIGHT = WEIGHT_MAX

_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = {torch.cat, torch.concat}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}

_FIX_MERGE = ("merge the paths with an addition (x + f(x), SEW's cnf='ADD') or a channel concatenation of equal "
              "spatial sizes, or run this block off Loihi")


# ---------------------------------------------------------------------------------------------
# Values: what each node computes, in terms of spike sources (the input and the neurons)

@dataclass
class _Segment:
    """A run of channels: the sum of whole spike sources, each times a coefficient."""

    channels: int
    terms: dict  # source node -> coefficient


@dataclass
class _Spikes:
    """Spikes, or a sum or channel concatenation of spikes (a SEW merge)."""

    segments: list


@dataclass
class _Term:
    """One synapse (None: an identity) applied to input channels [lo, hi) of the value it reads, there one source."""

    synapse: Optional[fx.Node]
    lo: int
    hi: int
    source: fx.Node
    coeff: float


@dataclass
class _Current:
    """Synaptic current: a sum of terms (a Spiking-ResNet merge adds several), and of the synapses' biases."""

    terms: list
    biases: list = field(default_factory=list)  # (synapse node, coefficient): each time its bias is added


@dataclass
class _Opaque:
    """A node this pass does not know; fine only where it feeds a merge refused anyway."""

    node: fx.Node


@dataclass
class _Source:
    node: fx.Node
    depth: int
    channels: int
    shape: tuple  # per-sample shape
    flat_of: Optional[fx.Node] = None  # a flatten of this source
    flatten: Optional[fx.Node] = None  # the model's flatten node that makes it (for a flatten of a merge, the
    # key is a node outside the graph, one per source: the chain flattens the whole boundary at once)


@dataclass
class _Layer:
    """One netx layer of the chain: the neurons of one depth plus relays."""

    depth: int
    neurons: list  # neuron nodes, model order
    relays: list  # source nodes carried through
    inputs: list  # sources at the previous boundary, in channel order
    flatten_after: Optional[fx.Node] = None
    flat_shape: tuple = ()  # the boundary flattened: all its sources' features, one after another
    keep: Optional[tuple] = None  # (synapse node, neuron node) kept as they are
    conv: Optional[nn.Module] = None
    neuron: Optional[CubaNeuron] = None
    shape: tuple = ()
    relay_synapses: int = 0
    sources: tuple = ()


@dataclass
class _Plan:
    layers: list = field(default_factory=list)
    output: Optional[_Spikes] = None
    outputs: list = field(default_factory=list)  # sources at the last boundary
    records: list = field(default_factory=list)
    merges: list = field(default_factory=list)  # merge nodes lowered
    sources: dict = field(default_factory=dict)
    currents: dict = field(default_factory=dict)
    issues: list = field(default_factory=list)


class _GiveUp(Exception):
    """A node this pass does not know: leave the graph to fuse_blocks, which reports it."""


class _Refused(Exception):
    def __init__(self, issue: Issue):
        self.issue = issue


# ---------------------------------------------------------------------------------------------
# Host side: a merge feeding the output

class ChannelSum(nn.Module):
    """The merge feeding the output, on the host: out channels = sums of groups of input channels (dim 2 of [T, N, C, ...])."""

    def __init__(self, out_channels: int, parts: list):
        super().__init__()
        self.out_channels = out_channels
        self.parts = [tuple(p) for p in parts]  # (out_lo, in_lo, channels, coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:2], self.out_channels, *x.shape[3:])
        for out_lo, in_lo, c, coeff in self.parts:
            out[:, :, out_lo:out_lo + c] += coeff * x[:, :, in_lo:in_lo + c]
        return out

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, parts={self.parts}"


# ---------------------------------------------------------------------------------------------
# Analysis

def _forks(gm: fx.GraphModule) -> bool:
    return any(len(n.users) > 1 or len([a for a in n.all_input_nodes if a.op != "get_attr"]) > 1
               for n in gm.graph.nodes if n.op != "output")


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return path_of(node)
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}()" if node.op == "call_function" else f".{name}()"


def _refuse(node, reason, fix, module=None):
    raise _Refused(issue_at(node, reason, fix, module=module))


def _spikes_of(value, node) -> _Spikes:
    if not isinstance(value, _Spikes):  # opaque, or a current fed to a synapse: fuse_blocks reports it
        raise _GiveUp(node)
    return value


def _as_current(value: _Spikes) -> _Current:
    """Spikes added into a neuron's input: an identity synapse (weight 1) on each source."""
    terms, lo = [], 0
    for seg in value.segments:
        for src, coeff in seg.terms.items():
            terms.append(_Term(None, lo, lo + seg.channels, src, coeff))
        lo += seg.channels
    return _Current(terms)


def _add(a, b, node):
    if isinstance(a, _Spikes) and isinstance(b, _Spikes):
        if [s.channels for s in a.segments] != [s.channels for s in b.segments]:
            if sum(s.channels for s in a.segments) != sum(s.channels for s in b.segments):
                raise _GiveUp(node)
            _refuse(node, "an addition of channel concatenations split at different channels",
                    "add tensors made the same way, or concatenate after adding")
        segs = []
        for sa, sb in zip(a.segments, b.segments):
            terms = dict(sa.terms)
            for k, v in sb.terms.items():
                terms[k] = terms.get(k, 0.0) + v
            segs.append(_Segment(sa.channels, terms))
        return _Spikes(segs)
    if isinstance(a, _Spikes):
        a = _as_current(a)
    if isinstance(b, _Spikes):
        b = _as_current(b)
    return _Current(a.terms + b.terms, a.biases + b.biases)


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)


def _analyse(gm: fx.GraphModule, ctx: CompileContext):
    """(values, sources, merges, currents, issues): every node's value in terms of spike sources; each neuron's input."""
    values, sources, merges, currents, issues = {}, {}, [], {}, []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        try:
            _analyse_node(gm, ctx, node, values, sources, merges, currents)
        except _Refused as exc:  # go on: every merge it cannot lower is reported at once
            issues.append(exc.issue)
            values[node] = _Opaque(node)
    return values, sources, merges, currents, issues


def _analyse_node(gm, ctx, node, values, sources, merges, currents) -> None:
    """Set ``values[node]`` (and, for a neuron, its source and input current); raises _Refused or _GiveUp."""
    if node.op == "placeholder":
        shape = tuple(ctx.input_shape)
        sources[node] = _Source(node, 0, shape[0], shape)
        values[node] = _Spikes([_Segment(shape[0], {node: 1.0})])
        return
    if node.op == "get_attr":
        raise _GiveUp(node)
    m = module_of(gm, node)
    args = [values.get(a) if isinstance(a, fx.Node) else a for a in node.args]
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    merge = len(inputs) > 1 and not (_is_add(node) or (node.op == "call_function" and node.target in _CATS))
    if ctx.is_settled(node) or (not merge and any(isinstance(values.get(a), _Opaque) for a in inputs)):
        values[node] = _Opaque(node)  # refused earlier, or after a node this pass does not know
        return
    if isinstance(m, CubaNeuron):
        cur = args[0] if len(args) == 1 else None
        if not isinstance(cur, _Current):
            raise _GiveUp(node)
        depth = 1 + max(sources[t.source].depth for t in cur.terms)
        shape = tuple(node.meta.get("fxlava_shape") or ())
        if not shape:
            raise _GiveUp(node)
        sources[node] = _Source(node, depth, shape[0], shape)
        values[node] = _Spikes([_Segment(shape[0], {node: 1.0})])
        currents[node] = cur
    elif isinstance(m, SYNAPSES):
        spikes = _spikes_of(args[0] if len(args) == 1 else None, node)
        terms, lo = [], 0
        for seg in spikes.segments:
            for src, coeff in seg.terms.items():
                terms.append(_Term(node, lo, lo + seg.channels, src, coeff))
            lo += seg.channels
        values[node] = _Current(terms, [(node, 1.0)] if m.bias is not None else [])
    elif isinstance(m, FLATTENS):
        spikes = _spikes_of(args[0] if len(args) == 1 else None, node)
        shape = tuple(node.meta.get("fxlava_shape") or ())
        if len(spikes.segments) == 1 and list(spikes.segments[0].terms.values()) == [1.0]:
            (src,) = spikes.segments[0].terms
            sources[node] = _Source(node, sources[src].depth, shape[0], shape, flat_of=src, flatten=node)
            values[node] = _Spikes([_Segment(shape[0], {node: 1.0})])
            return
        # A flatten of a merge (a SEW block's output): flatten is linear and keeps channels outermost, so
        # it is the same merge of each source flattened. The chain flattens its whole boundary at the
        # merge's depth, where the sources lie side by side: each gets a flat source of its own, a node
        # outside the graph.
        spatial = math.prod(sources[next(iter(spikes.segments[0].terms))].shape[1:])
        depth = max(sources[src].depth for seg in spikes.segments for src in seg.terms)
        segments = []
        for seg in spikes.segments:
            terms = {}
            for src, coeff in seg.terms.items():
                features = sources[src].channels * spatial
                key = fx.Node(gm.graph, f"{node.name}__{src.name}", "call_module", node.target, (), {})
                key.meta.update(node.meta)
                key.meta["fxlava_shape"] = (features,)
                sources[key] = _Source(key, depth, features, (features,), flat_of=src, flatten=node)
                terms[key] = coeff
            segments.append(_Segment(seg.channels * spatial, terms))
        values[node] = _Spikes(segments)
    elif _is_add(node):
        if len(args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            raise _GiveUp(node)
        a, b = args
        if not isinstance(a, (_Spikes, _Current)) or not isinstance(b, (_Spikes, _Current)):
            raise _GiveUp(node)
        values[node] = _add(a, b, node)
        merges.append(node)
    elif node.op == "call_function" and node.target in _CATS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = tuple(node.meta.get("fxlava_shape") or ())
        if not isinstance(tensors, (list, tuple)) or not shape:
            raise _GiveUp(node)
        if dim not in (1, -len(shape)):
            sizes = ", ".join("x".join(map(str, t.meta.get("fxlava_shape") or ())) for t in tensors)
            _refuse(node, f"a concatenation along a spatial dimension (of {sizes}): the result has another "
                          f"spatial size than its parts, and a netx layer concatenates only channels of one spatial size",
                    "concatenate along the channels (dim 1 per step, 2 in multi-step), or run this part off Loihi")
        spatial = {tuple(t.meta.get("fxlava_shape") or ())[1:] for t in tensors}
        if len(spatial) != 1:
            _refuse(node, "a concatenation of tensors of different spatial sizes "
                          f"({', '.join('x'.join(map(str, s)) for s in sorted(spatial))}): one netx layer "
                          "has one spatial size", "pool or stride the inputs to the same size first")
        vals = [values.get(t) for t in tensors]
        if not all(isinstance(v, _Spikes) for v in vals):
            raise _GiveUp(node)
        values[node] = _Spikes([s for v in vals for s in v.segments])
        merges.append(node)
    elif len([a for a in node.all_input_nodes if a.op != "get_attr"]) > 1:
        what = getattr(node.target, "__name__", str(node.target))
        _refuse(node, f"a merge by {what}(), which is not linear in the spikes (SEW's AND is x * y, IAND "
                      f"x * (1 - y)); Loihi layers only add their inputs", _FIX_MERGE)
    else:
        values[node] = _Opaque(node)


# ---------------------------------------------------------------------------------------------
# Geometry

def _dense_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The conv's weight with groups expanded: (out, in, kH, kW)."""
    w = conv.weight.detach()
    if conv.groups == 1:
        return w
    out, per_in = w.shape[:2]
    full = w.new_zeros(out, per_in * conv.groups, *w.shape[2:])
    per_out = out // conv.groups
    for g in range(conv.groups):
        full[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = w[g * per_out:(g + 1) * per_out]
    return full


@dataclass
class _Geometry:
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    def offsets(self, dim):
        return [-self.padding[dim] + self.dilation[dim] * c for c in range(self.kernel[dim])]


def _term_geometry(gm, term: _Term, sub: tuple) -> Optional[_Geometry]:
    """The term's conv in the coordinates of its source as relayed (subsampled by ``sub``), None if not integral."""
    if term.synapse is None:
        k, s, p, d = (1, 1), (1, 1), (0, 0), (1, 1)
    else:
        c = module_of(gm, term.synapse)
        k, s, p, d = tuple(c.kernel_size), tuple(c.stride), tuple(c.padding), tuple(c.dilation)
    geo = []
    for dim in range(2):
        f = sub[dim]
        if s[dim] % f or p[dim] % f or (k[dim] > 1 and d[dim] % f):
            return None
        geo.append((k[dim], s[dim] // f, p[dim] // f, d[dim] // f if k[dim] > 1 else 1))
    return _Geometry(*(tuple(g[i] for g in geo) for i in range(4)))


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------------------------------
# Planning

def _plan(gm: fx.GraphModule, ctx: CompileContext) -> tuple[Optional[_Plan], list[Issue]]:
    if not _forks(gm):
        return None, []
    try:
        values, sources, merges, currents, issues = _analyse(gm, ctx)
        if issues:
            return None, issues
        output = next(n for n in gm.graph.nodes if n.op == "output")
        out = output.args[0]
        if not isinstance(out, fx.Node) or not isinstance(values.get(out), _Spikes):
            raise _GiveUp(output)
        if any(isinstance(v, _Opaque) for v in values.values()):  # fuse_blocks names it
            raise _GiveUp(output)
        plan = _layers(gm, sources, currents, merges, values[out])
        return (None, plan.issues) if plan.issues else (plan, [])
    except _GiveUp:
        return None, []
    except _Refused as exc:
        return None, [exc.issue]


def _needs(sources, currents, out_value: _Spikes, depth_max: int) -> dict:
    """For each source, the last boundary at which some layer (or the output) reads it."""
    need = {s: src.depth for s, src in sources.items()}
    for s, src in sources.items():
        if s in currents:
            for t in currents[s].terms:
                need[t.source] = max(need[t.source], src.depth - 1)
        if src.flat_of is not None:
            need[src.flat_of] = max(need[src.flat_of], src.depth)
    for seg in out_value.segments:
        for s in seg.terms:
            need[s] = depth_max
    return need


def _layers(gm, sources, currents, merges, out_value: _Spikes) -> _Plan:
    out_sources = [s for seg in out_value.segments for s in seg.terms]
    depth_max = max(sources[s].depth for s in out_sources)
    need = _needs(sources, currents, out_value, depth_max)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    neurons = [s for s in sources if isinstance(module_of(gm, s), CubaNeuron)]
    plan = _Plan(output=out_value, merges=merges, sources=sources, currents=currents)
    # boundary 0: the input (or its flatten)
    placeholder = next(s for s in sources if s.op == "placeholder")
    boundary = [placeholder]
    flats = {src.flat_of: s for s, src in sources.items() if src.flat_of is not None}
    boundary = _flatten_at(boundary, flats, need, 0, plan, None, sources)
    sub = {placeholder: (1, 1)}
    spatial = tuple(sources[placeholder].shape[1:])
    for depth in range(1, depth_max + 1):
        group = sorted((n for n in neurons if sources[n].depth == depth), key=order.get)
        relays = [s for s in boundary if need[s] >= depth and s not in group]
        layer = _Layer(depth, group, relays, list(boundary))
        try:
            spatial = _build_layer(gm, layer, sources, currents, sub, spatial, plan)
        except _Refused as exc:  # go on with the next layer: each block's problem is reported at once
            plan.issues.append(exc.issue)
            spatial = tuple(sources[group[0]].shape[1:])
            for s in relays:
                sub[s] = sub.get(s, (1, 1))
        plan.layers.append(layer)
        boundary = group + relays
        boundary = _flatten_at(boundary, flats, need, depth, plan, layer, sources)
        if layer.flatten_after is not None:
            spatial = ()
    missing = [s for s in out_sources if s not in boundary]
    if missing:  # cannot happen: every output source is relayed to the last boundary
        raise _GiveUp(missing[0])
    plan.outputs = boundary
    return plan


def _flatten_at(boundary, flats, need, depth, plan, layer, sources):
    """The boundary after a flatten, if one is here: netx flattens every source on it, side by side."""
    hits = [s for s in boundary if s in flats and sources[flats[s]].depth == depth]
    if not hits:
        return boundary
    flatten = sources[flats[hits[0]]].flatten
    if any(s not in flats or need[s] > depth or sources[flats[s]].flatten is not flatten for s in boundary):
        _refuse(flatten, "a flatten where other spike sources ride along as relay channels (a residual path "
                         "around it)", "flatten after the last merge, or merge before the flatten")
    flat = [flats[s] for s in boundary]
    if layer is None:  # the input itself is flattened: a flatten block first
        layer = _Layer(0, [], [], list(boundary))
        plan.layers.append(layer)
    layer.flatten_after = flatten
    layer.flat_shape = (sum(sources[f].channels for f in flat),)
    return flat


def _build_layer(gm, layer: _Layer, sources, currents, sub: dict, spatial: tuple, plan: _Plan) -> tuple:
    """Check the layer and make its synapse and neuron; returns the spatial size of its output."""
    mods = [module_of(gm, n) for n in layer.neurons]
    main_node, main = layer.neurons[0], mods[0]
    currents = [currents[n] for n in layer.neurons]
    name = path_of(main_node)
    for n, m in zip(layer.neurons[1:], mods[1:]):
        if (m.i_decay, m.v_decay) != (main.i_decay, main.v_decay):
            _refuse(n, f"a neuron that shares a netx layer with {name} (both at depth {layer.depth} of the chain) but "
                       f"has other decays (iDecay {m.i_decay} vs {main.i_decay}, vDecay {m.v_decay} vs "
                       f"{main.v_decay}); a netx layer has one neuron type",
                    "give the neurons of parallel paths the same neuron type and tau", module=m)
    terms_all = [t for c in currents for t in c.terms]
    flat_inputs = [sources[s].flat_of is not None or len(sources[s].shape) == 1 for s in layer.inputs]
    dense = any(isinstance(module_of(gm, t.synapse), nn.Linear) for t in terms_all if t.synapse is not None)
    # a plain layer of the chain: one neuron, one synapse over its one input source, no relays
    only = currents[0].terms
    if (len(layer.neurons) == 1 and not layer.relays and len(layer.inputs) == 1 and len(only) == 1
            and only[0].synapse is not None and only[0].coeff == 1.0 and only[0].source == layer.inputs[0]
            and sub.get(layer.inputs[0], (1, 1)) == (1, 1)):
        layer.keep = (only[0].synapse, main_node)
        layer.shape = tuple(main_node.meta["fxlava_shape"])
        return layer.shape[1:]
    if layer.relays:
        if main.v_th_mant >= WEIGHT_MANT_MAX:
            _refuse(main_node, f"a layer that carries {len(layer.relays)} skip path(s) as relay channels but has "
                               f"threshold {main.threshold:g} (vThMant {main.v_th_mant}): a relay fires on a weight "
                               f"above the threshold, at most {WEIGHT_MAX:g}",
                    f"keep thresholds below {WEIGHT_MAX:g} in layers a skip connection spans (scale a layer's "
                    f"weights and threshold by the same factor)", module=main)
        if main.i_decay != DECAY_SCALE:
            _refuse(main_node, f"a layer that carries skip paths as relay channels has current decay "
                               f"{main.current_decay:g}: a relay's current would carry over to the next step",
                    "use neurons without a current decay (IF, LIF, PLIF) in layers a skip connection spans",
                    module=main)
    in_channels = [sources[s].channels for s in layer.inputs]
    in_lo = {s: sum(in_channels[:i]) for i, s in enumerate(layer.inputs)}
    out_channels = [sources[n].channels for n in layer.neurons] + [sources[s].channels for s in layer.relays]
    thresholds = [m.threshold for m in mods]
    scales = [main.threshold / th if th else 1.0 for th in thresholds]
    for n, m, f in zip(layer.neurons, mods, scales):
        if f != 1.0:
            plan.records.append(f"{path_of(n)}: threshold {m.threshold:g} co-scaled to {main.threshold:g} of the "
                                f"layer it shares with {name} (its weights x {f:g})")
    if dense:
        if not all(flat_inputs) or any(t.synapse is not None and not isinstance(module_of(gm, t.synapse), nn.Linear)
                                       for t in terms_all):
            _refuse(main_node, "a layer mixing dense and conv synapses (or a dense synapse on unflattened spikes)",
                    "flatten before the linear layer on every path")
        weight = torch.zeros(sum(out_channels), sum(in_channels), dtype=torch.float64)
        geo = None
    else:
        geo = _layer_geometry(gm, layer, terms_all, sub, main_node)
        weight = torch.zeros(sum(out_channels), sum(in_channels), *geo.kernel, dtype=torch.float64)
    row = 0
    synapse_numel, seen = 0, set()
    for n, cur, f in zip(layer.neurons, currents, scales):
        rows = slice(row, row + sources[n].channels)
        for t in cur.terms:
            cols = slice(in_lo[t.source], in_lo[t.source] + sources[t.source].channels)
            if t.synapse is None:
                block = torch.eye(t.hi - t.lo, dtype=torch.float64)
                if geo is not None:
                    block = block[:, :, None, None]
            else:
                syn = module_of(gm, t.synapse)
                if t.synapse not in seen:
                    seen.add(t.synapse)
                    synapse_numel += syn.weight.numel()
                w = _dense_weight(syn) if geo is not None else syn.weight.detach()
                block = w[:, t.lo:t.hi].double()
            block = block * (t.coeff * f)
            if geo is None:
                weight[rows, cols] += block
            else:
                _place(weight, rows, cols, block, _term_geometry(gm, t, sub.get(t.source, (1, 1))), geo)
        row += sources[n].channels
    for s in layer.relays:
        c = sources[s].channels
        cols = slice(in_lo[s], in_lo[s] + c)
        eye = torch.eye(c, dtype=torch.float64) * RELAY_WEIGHT
        if geo is None:
            weight[row:row + c, cols] = eye
        else:
            weight[row:row + c, cols, geo.padding[0] // geo.dilation[0], geo.padding[1] // geo.dilation[1]] = eye
        row += c
    bias = None
    if any(c.biases for c in currents):  # bias currents (bias="current"): the groups' own, none on relays
        bias = torch.zeros(sum(out_channels), dtype=torch.float64)
        row = 0
        for n, cur, f in zip(layer.neurons, currents, scales):
            for syn, coeff in cur.biases:
                bias[row:row + sources[n].channels] += module_of(gm, syn).bias.detach().double() * coeff * f
            row += sources[n].channels
    layer.relay_synapses = weight.numel() - synapse_numel
    dtype = torch.get_default_dtype()
    if geo is None:
        conv = nn.Linear(sum(in_channels), sum(out_channels), bias=False)
        out_spatial = ()
    else:
        conv = nn.Conv2d(sum(in_channels), sum(out_channels), geo.kernel, stride=geo.stride, padding=geo.padding,
                         dilation=geo.dilation, bias=False)
        out_spatial = tuple(_out_size(spatial[i], geo.kernel[i], geo.stride[i], geo.padding[i], geo.dilation[i])
                            for i in range(2))
        for n in layer.neurons:
            if tuple(sources[n].shape[1:]) != out_spatial:
                _refuse(n, f"a neuron of spatial size {'x'.join(map(str, sources[n].shape[1:]))} sharing a netx layer "
                           f"with {name}, whose geometry gives {'x'.join(map(str, out_spatial))}: the parallel paths "
                           f"would be concatenated at different spatial sizes",
                        "give parallel paths convolutions of the same output size")
        for s in layer.relays:
            sub[s] = tuple(sub.get(s, (1, 1))[i] * geo.stride[i] for i in range(2))
    if bias is not None:
        conv.bias = nn.Parameter(bias.to(dtype))
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=any(
        module_of(gm, t.synapse).weight.requires_grad for t in terms_all if t.synapse is not None))
    layer.conv = conv
    req = main.requested  # what the user asked for: coscale_layers reads it (ties, exact thresholds)
    layer.neuron = CubaNeuron(req["threshold"], req["current_decay"], req["voltage_decay"], main.surrogate_function,
                              main.detach_reset)
    layer.shape = (sum(out_channels),) + out_spatial
    syn_paths = []
    for t in terms_all:
        if t.synapse is not None:
            syn_paths.append(path_of(t.synapse))
    layer.sources = tuple(dict.fromkeys(syn_paths + [path_of(n) for n in layer.neurons] +
                                        [f"relay of {_describe(s) if s.op != 'placeholder' else 'the input'}"
                                         for s in layer.relays]))
    return out_spatial


def _layer_geometry(gm, layer, terms, sub, main_node) -> _Geometry:
    """One conv geometry that embeds every term's kernel and, if the layer relays, a centre tap at offset 0."""
    geos = []
    for t in terms:
        g = _term_geometry(gm, t, sub.get(t.source, (1, 1)))
        if g is None:
            _refuse(t.synapse if t.synapse is not None else main_node,
                    f"a skip path relayed through strided layers (subsampled by {'x'.join(map(str, sub[t.source]))}) "
                    f"that {_describe(t.synapse) if t.synapse is not None else 'an identity'} reads at other pixels: "
                    f"a relay follows a stride only where the skip path itself strides the same way",
                    "downsample the skip path with a 1x1 conv of the main path's total stride (as ResNets do)",
                    module=module_of(gm, t.synapse) if t.synapse is not None else None)
        geos.append((t, g))
    ref = max(geos, key=lambda tg: (tg[1].kernel[0] * tg[1].kernel[1], tg[0].source in layer.inputs[:1]))[1]
    for t, g in geos:
        where = t.synapse if t.synapse is not None else main_node
        if g.stride != ref.stride:
            _refuse(where, f"paths merged into the layer of {path_of(main_node)} stride differently "
                           f"({'x'.join(map(str, g.stride))} vs {'x'.join(map(str, ref.stride))} in the layer's input): "
                           f"the relay cannot follow", "give the skip path the main path's total stride",
                    module=module_of(gm, t.synapse) if t.synapse is not None else None)
        for dim in range(2):
            ok = set(ref.offsets(dim))
            if not set(g.offsets(dim)) <= ok:
                _refuse(where, f"a kernel that does not fit in the layer of {path_of(main_node)} "
                               f"(its taps at offsets {g.offsets(dim)}, the layer's at {sorted(ok)})",
                        "use odd kernels with padding dilation * (kernel - 1) / 2 on parallel paths",
                        module=module_of(gm, t.synapse) if t.synapse is not None else None)
    if layer.relays:
        for dim in range(2):
            k, p, d = ref.kernel[dim], ref.padding[dim], ref.dilation[dim]
            if k % 2 == 0 or p != d * (k - 1) // 2:
                _refuse(main_node, f"a layer whose geometry cannot carry a relay (kernel {'x'.join(map(str, ref.kernel))}, "
                                   f"padding {'x'.join(map(str, ref.padding))}): a skip path rides along on the centre "
                                   f"tap, which needs an odd kernel with padding dilation * (kernel - 1) / 2",
                        "use odd kernels with 'same'-style padding in layers a skip connection spans",
                        module=module_of(gm, main_node))
    return ref


def _place(weight, rows, cols, block, g: _Geometry, ref: _Geometry) -> None:
    """Add ``block`` (out, in, kh, kw) into ``weight`` at the layer taps where its offsets fall."""
    taps = []
    for dim in range(2):
        ref_off = ref.offsets(dim)
        taps.append([ref_off.index(o) for o in g.offsets(dim)])
    for i, ti in enumerate(taps[0]):
        for j, tj in enumerate(taps[1]):
            weight[rows, cols, ti, tj] += block[:, :, i, j]


# ---------------------------------------------------------------------------------------------
# Rewriting

def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for every fork or merge this pass cannot lower into a chain."""
    return _plan(gm, ctx)[1]


def _emit(gm: fx.GraphModule, ctx: CompileContext, plan: _Plan, sources) -> None:
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    prev = placeholder
    total_relay_neurons = total_relay_synapses = 0
    model_neurons = sum(int(torch.tensor(sources[n].shape).prod()) for n in sources
                        if isinstance(module_of(gm, n), CubaNeuron))
    model_synapses = sum(module_of(gm, n).weight.numel() for n in graph.nodes
                         if isinstance(module_of(gm, n), SYNAPSES))
    for layer in plan.layers:
        with graph.inserting_before(output):
            if layer.depth > 0:
                if layer.keep is not None:
                    syn, neu = layer.keep
                    a = graph.call_module(syn.target, (prev,))
                    a.meta.update(syn.meta)
                    b = graph.call_module(neu.target, (a,))
                    b.meta.update(neu.meta)
                else:
                    main = layer.neurons[0]
                    first_syn = next((t.synapse for t in plan.currents[main].terms if t.synapse is not None), None)
                    a = graph.call_module(add_module(gm, "residual_synapse", layer.conv), (prev,))
                    a.meta.update((first_syn or main).meta)
                    a.meta.pop("fxlava_kind", None)
                    a.meta.pop("fxlava_merged_pool", None)
                    a.meta["fxlava_shape"] = layer.shape
                    b = graph.call_module(add_module(gm, "residual_neuron", layer.neuron), (a,))
                    b.meta.update(main.meta)
                    b.meta["fxlava_shape"] = layer.shape
                    relay_channels = sum(sources[s].channels for s in layer.relays)
                    b.meta["fxlava_residual"] = {"sources": layer.sources, "relay_channels": relay_channels,
                                                 "relay_synapses": layer.relay_synapses}
                    n_relay = relay_channels * (layer.shape[1] * layer.shape[2] if len(layer.shape) == 3 else 1)
                    total_relay_neurons += n_relay
                    total_relay_synapses += layer.relay_synapses
                    plan.records.append(f"layer {layer.depth}: {' + '.join(layer.sources)}; {relay_channels} relay "
                                        f"channels ({n_relay} neurons, {layer.relay_synapses} more synapses than its "
                                        f"own synapses)")
                prev = b
            if layer.flatten_after is not None:
                f = graph.call_module(layer.flatten_after.target, (prev,))
                f.meta.update(layer.flatten_after.meta)
                f.meta["fxlava_shape"] = layer.flat_shape
                prev = f
    # the output: a single source as it is; a merge of several runs on the host, first step of net.readout
    out_value = plan.output
    seg_sources = [(seg, s) for seg in out_value.segments for s in seg.terms]
    if len(seg_sources) == 1 and plan.outputs == [seg_sources[0][1]] and seg_sources[0][0].terms[seg_sources[0][1]] == 1.0:
        pass
    else:
        lo = {s: sum(sources[t].channels for t in plan.outputs[:i]) for i, s in enumerate(plan.outputs)}
        parts, out_lo = [], 0
        for seg in out_value.segments:
            for s, coeff in seg.terms.items():
                parts.append((out_lo, lo[s], seg.channels, coeff))
            out_lo += seg.channels
        readout = gm.meta.get("fxlava_readout")
        merge = ChannelSum(out_lo, parts)
        if readout is not None:
            readout.merge = merge
            readout.ops = (f"{_describe(output.args[0])} (the residual merge: {len(parts)} groups of channels "
                           f"summed)",) + tuple(readout.ops)
        plan.records.append(f"the merge {_describe(output.args[0])} feeds the output: it runs on the host as the "
                            f"first step of net.readout (a sum of spikes is not spikes)")
    output.args = (prev,)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    plan.records.append(f"relay channels: {total_relay_neurons} neurons (+{100 * total_relay_neurons / max(model_neurons, 1):.1f} % "
                        f"of the model's {model_neurons}), {total_relay_synapses} synapses (+"
                        f"{100 * total_relay_synapses / max(model_synapses, 1):.1f} % of the model's {model_synapses}); "
                        f"{len(plan.merges)} merges lowered into {len(plan.layers)} layers")
    for line in plan.records:
        ctx.record(PASS, line)


def lower_residuals(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Lower residual merges into a chain: skip paths as relay channels, merges as the consumer's synapses."""
    plan, issues = _plan(gm, ctx)
    if issues:
        ctx.refuse(issues)
        # the branch is reported by its merge (or the layer that cannot carry it): fuse_blocks need not report
        # the forks again, nor what only computes an input of a merge (IAND's 1 - y)
        for n in gm.graph.nodes:
            if n.op != "output" and len(n.users) > 1 and not ctx.is_settled(n):
                ctx.leave(n, because=issues[0].fx_node)
        for issue in issues:
            for n in issue.fx_node.all_input_nodes:
                if n.op in ("call_function", "call_method") and not ctx.is_settled(n):
                    ctx.leave(n, because=issue.fx_node)
        return PassResult(gm, False)
    if plan is None:
        return PassResult(gm, False)
    _emit(gm, ctx, plan, plan.sources)
    log.debug("%s: %d layers, %d merges lowered", PASS, len(plan.layers), len(plan.merges))
    return PassResult(gm, True)


lower_residuals.check = check
