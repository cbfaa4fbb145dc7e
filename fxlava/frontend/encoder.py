"""Encoder: the ops of a forward() that makes the time axis itself, up to its first spiking layer, run on the host.

SpikingJelly's own examples (``conv_fashion_mnist.CSNN``) and most models written after them take
a static input and repeat it over time inside ``forward()``::

    x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)    # [N, C, H, W] -> [T, N, C, H, W]
    x_seq = self.conv_fc(x_seq)                           # conv -> BatchNorm -> IFNode -> ...

The first layer then reads real values, which Loihi's input layer cannot carry: it takes spikes.
SpikingJelly calls that first synapse and neuron the network's *spiking encoder*. fxlava cuts it
off into an ``Encoder``, run on the host in float with the model's own modules, exactly as the
model runs them; its output spikes are the input of the network that goes to Loihi.

Only a prefix that ends at the first spiking layer and that nothing after it reads again (no skip
connection from the raw input) is cut; anything else stays in the graph, for the passes to refuse.
"""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.frontend.readout import _describe, _is_spiking_node
from fxlava.frontend.shapes import record_shape
from fxlava.frontend.step_modes import reset_states

__all__ = ["Encoder", "split_encoder", "split_static_encoder"]


class Encoder(nn.Module):
    """The model's ops from its input to its first spiking layer, run on the host.

    ``net.encoder(x)`` takes what the model's ``forward()`` takes (a static image ``[N, *]``)
    and returns the ``[T, N, *]`` spikes that the compiled network (``net(spikes)``, lava-dl,
    the netx file in Lava) takes. It runs the model's own modules in float, from the resting state.
    """

    def __init__(self, graph_module: fx.GraphModule, ops: tuple = (), until: str = "", input_shape: tuple = ()):
        super().__init__()
        self.graph_module = graph_module
        self.input_shape = tuple(input_shape)  # one sample of what forward() takes, without the batch axis
        self.ops = tuple(ops)  # a description of each op, for tables and records
        self.until = until  # path of the first spiking layer, whose spikes the encoder returns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reset_states(self.graph_module)
        try:
            return self.graph_module(x)
        finally:
            reset_states(self.graph_module)

    def extra_repr(self) -> str:
        return f"until={self.until!r}, ops={list(self.ops)}"


def _is_encoding_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    """SpikingJelly's encoders (encoding.PoissonEncoder, ...): their output is spikes already."""
    return node.op == "call_module" and type(gm.get_submodule(node.target)).__module__.startswith(
        "spikingjelly.activation_based.encoding")


def _shape(node: fx.Node) -> Optional[torch.Size]:
    return getattr(node.meta.get("tensor_meta"), "shape", None)


def _adds_time(node: fx.Node) -> bool:
    """An op that puts a new leading axis (time) in front of its input: unsqueeze(0), expand, repeat, stack."""
    out = _shape(node)
    return out is not None and any(_shape(a) is not None and tuple(out[1:]) == tuple(_shape(a))
                                   for a in node.all_input_nodes)


def split_encoder(gm0: fx.GraphModule, example_input: torch.Tensor) -> Optional[tuple[Encoder, torch.Tensor]]:
    """Cut the ops that make the time axis, up to the first spiking layer, off ``gm0`` into an ``Encoder``.

    Applies to a multi-step graph that puts a new leading axis (time) in front of its input before
    its first spiking layer (a neuron, or one of SpikingJelly's encoders), whose output is then
    ``[T, N, *]`` for the input's N samples: the model's forward() repeats its input over time.
    Returns the encoder and its spikes on ``example_input`` (the new example of what remains), or
    None when the graph does not start so, or when a later node reads the input or the encoder's
    inner values again.
    """
    nodes = list(gm0.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    first = next((n for n in nodes if _is_spiking_node(gm0, n) or _is_encoding_module(gm0, n)), None)
    if len(placeholders) != 1 or first is None:
        return None
    (x,) = placeholders
    in_shape, out_shape = _shape(x), _shape(first)
    if in_shape is None or out_shape is None or len(out_shape) < 3 or out_shape[1] != in_shape[0]:
        return None  # the first spiking layer's output is not [T, N, *] for the input's N samples
    prefix, todo = set(), list(first.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in prefix or n is x:
            continue
        prefix.add(n)
        todo.extend(n.all_input_nodes)
    if not any(_adds_time(n) for n in prefix):
        return None
    if not any(_is_spiking_node(gm0, n) for n in nodes[nodes.index(first) + 1:]):
        return None  # nothing would be left for Loihi: the encoding stays, to be refused
    inside = prefix | {first, x}
    if any(u not in inside for n in prefix | {x} for u in n.users):
        return None  # the input or an inner value is read again after the first spiking layer
    graph = fx.Graph()
    env = {x: graph.placeholder(x.name)}
    order = [n for n in nodes if n in prefix or n is first]
    for n in order:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[first])
    # a copy: the traced modules are switched to single-step later, the encoder keeps the model's mode
    encoder = Encoder(copy.deepcopy(fx.GraphModule(gm0, graph, class_name="Encoder")),
                      tuple(_describe(n, gm0) for n in order if n.op in ("call_module", "call_function",
                                                                          "call_method")),
                      first.target if first.op == "call_module" else first.name, tuple(in_shape[1:]))
    with torch.no_grad():
        spikes = encoder(example_input.to(torch.float32))
    if not isinstance(spikes, torch.Tensor) or not torch.isin(spikes, torch.tensor([0.0, 1.0])).all():
        return None
    # what remains starts at the spikes: the input placeholder now stands for them
    first.replace_all_uses_with(x)
    for n in reversed(order):
        gm0.graph.erase_node(n)
    record_shape(x, spikes)
    gm0.recompile()
    return encoder, spikes


def split_static_encoder(gm0: fx.GraphModule, example_input: torch.Tensor) -> Optional[tuple[Encoder, torch.Tensor]]:
    """Cut a single-step forward()'s own time loop over a static input, up to its first spiking layer, into an ``Encoder``.

    ``for t in range(self.T): out = out + self.net(x)`` traced on an image runs the same
    single-step modules T times on ``x``: T copies, each reading ``x`` and passing through the
    first spiking layer (which keeps its state from one call to the next). The encoder runs the
    copies' ops up to that layer on the host, in order, and stacks its T outputs into ``[T, N, *]``
    spikes; each copy then reads its step of the graph's input instead, ``x[t]``, which is the
    single-step loop over a sequence that ``fold_time_loops`` folds. Returns the encoder and its
    spikes on ``example_input``, or None (``gm0`` unchanged) when the graph is not so.
    """
    nodes = list(gm0.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    (x,) = placeholders
    firsts, claimed = [], set()
    for n in nodes:  # the spiking nodes that read x through no other spiking node, each with its own prefix
        if not (_is_spiking_node(gm0, n) or _is_encoding_module(gm0, n)) or n in claimed:
            continue
        prefix, todo, reads_x = set(), list(n.all_input_nodes), False
        while todo:
            a = todo.pop()
            if a is x:
                reads_x = True
            elif a not in prefix and a.op != "get_attr":
                prefix.add(a)
                todo.extend(a.all_input_nodes)
        if not reads_x or any(_is_spiking_node(gm0, a) for a in prefix):
            continue
        if prefix & claimed:
            return None  # two copies share an op: not one chain per step
        firsts.append(n)
        claimed |= prefix | {n}
    if len(firsts) < 2 or len({(f.op, f.target) for f in firsts}) != 1:
        return None
    inside = claimed | {x}
    if any(u not in inside for n in claimed - set(firsts) | {x} for u in n.users):
        return None  # the input or an op before the first spiking layer is read again after it
    order = {n: i for i, n in enumerate(nodes)}
    graph = fx.Graph()
    env = {x: graph.placeholder(x.name)}
    for n in sorted(claimed, key=order.get):
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(graph.call_function(torch.stack, ([env[f] for f in firsts],)))
    steps = [n for n in sorted(claimed, key=order.get) if n.op in ("call_module", "call_function", "call_method")]
    per_step = steps[:len(steps) // len(firsts)]
    encoder = Encoder(copy.deepcopy(fx.GraphModule(gm0, graph, class_name="Encoder")),
                      tuple(_describe(n, gm0) for n in per_step) + (f"torch.stack() of its {len(firsts)} steps",),
                      firsts[0].target if firsts[0].op == "call_module" else firsts[0].name,
                      tuple(example_input.shape[1:]))
    with torch.no_grad():
        spikes = encoder(example_input.to(torch.float32))
    if not isinstance(spikes, torch.Tensor) or not torch.isin(spikes, torch.tensor([0.0, 1.0])).all():
        return None
    # what remains reads the spikes: the input placeholder now stands for them, copy t for its step
    record_shape(x, spikes)
    at = x
    for t, first in enumerate(firsts):
        with gm0.graph.inserting_after(at):
            at = gm0.graph.call_function(operator.getitem, (x, t))
        at.meta.update({k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack")})
        record_shape(at, spikes[t])
        first.replace_all_uses_with(at)
    for n in sorted(claimed, key=order.get, reverse=True):
        gm0.graph.erase_node(n)
    gm0.recompile()
    return encoder, spikes
