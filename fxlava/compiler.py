"""fxlava.compile: validate the options, trace, run the pass pipeline, and wrap the result with its backends."""
from __future__ import annotations

import dataclasses
import logging
import operator
import os
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxlava import chain, frontend
from fxlava.backends.lava_dl import blocks_of, blocks_with_shapes, to_lava_dl
from fxlava.blocks import SynapseBlock
from fxlava.errors import UnsupportedModelError, in_model_order
from fxlava.options import CompileOptions
from fxlava.pass_manager import CompileContext, Pipeline

__all__ = ["compile", "CompiledNetwork"]

log = logging.getLogger(__name__)


_ATTENTION_OPS = {torch.matmul, torch.bmm, torch.einsum, operator.matmul, torch.softmax, F.softmax,
                  "matmul", "bmm", "softmax", "__matmul__"}
_UNLOWERED_OPS = ("an operation with no Loihi equivalent", "an input encoding inside forward()")


def _scope_of(path: str, scopes) -> bool:
    return any(path == scope or path.startswith(scope + ".") for scope in scopes)


def one_per_module(gm: fx.GraphModule, issues: list) -> list:
    """A user's module (a neuron, a block) whose forward() does operations no pass lowers is refused once.

    Its unlowered operations become one issue naming the module's path and class and its first such
    operation; every other issue inside that module (the branches and merges of its arithmetic) is
    dropped. A module whose only problem is a branch (a residual block) keeps its issues, which name
    the residual.
    """
    groups: dict[str, list] = {}
    for issue in issues:
        node = issue.fx_node
        if node is not None and node.op in ("call_function", "call_method") and issue.path \
                and issue.reason.startswith(_UNLOWERED_OPS):
            groups.setdefault(issue.path, []).append(issue)
    if not groups:
        return issues
    merged = []
    for scope, members in groups.items():
        first = members[0]
        node = first.fx_node
        stack = node.meta.get("nn_module_stack") or {}
        cls = next((v[1] for v in reversed(list(stack.values())) if v and v[0] == scope), None)
        ctype = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls or "")
        ops = ", ".join(dict.fromkeys(_op_name(i.fx_node) for i in members))
        # q @ k merges two inputs, so the branch check may have claimed it: look at every op in the module
        attention = any(n.target in _ATTENTION_OPS for n in gm.graph.nodes
                        if _scope_of(n.meta.get("fxlava_path") or "\0", (scope,)))
        reason = ("attention: a product of two activations (matmul/softmax), which Loihi's fixed synaptic weights "
                  "cannot compute" if attention else "a module whose forward() does operations fxlava cannot lower")
        merged.append(dataclasses.replace(
            first, reason=reason, module_type=ctype,
            fix=f"its first unsupported operation is {_op_name(node)}() (all: {ops}); replace the module by "
                f"SpikingJelly neurons and layers fxlava compiles (IFNode, LIFNode, ParametricLIFNode, CUBALIFNode, "
                f"Conv2d, Linear, pools), or write a pass that lowers it"))

    def own(issue) -> bool:
        """An issue of the module's inside: at a node in it whose users are all in it too."""
        if not _scope_of(issue.path, groups):
            return False
        node = issue.fx_node
        if node is None or issue.reason not in (chain.BRANCH, chain.RESIDUAL):
            return True
        # a fork at the module's output (a residual around it) is the model's problem, not the module's
        return all(_scope_of(u.meta.get("fxlava_path") or "\0", groups) for u in node.users)

    return in_model_order(merged + [i for i in issues if not own(i)])


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


class CompiledNetwork(nn.Module):
    """The compiled network: ``graph_module`` on the SpikingJelly side, ``lava_dl`` and ``export_hdf5`` for Lava."""

    def __init__(self, graph_module: fx.GraphModule, ctx: CompileContext, pipeline: Pipeline,
                 readout: Optional[nn.Module] = None, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.graph_module = graph_module
        # the model's ops before its first spiking layer, when forward() repeats a static input over time:
        # net.encoder(x) gives the [T, N, *] spikes that net(), lava-dl and the netx file take (None: x is spikes)
        self.encoder = encoder
        # parameter-free ops the model applies to its output spikes (identity if there are none)
        self.readout = readout if readout is not None else frontend.Readout(step_mode=ctx.step_mode)
        self.pipeline = pipeline
        self.input_shape = tuple(ctx.input_shape)
        self.step_mode = ctx.step_mode
        self.records = list(ctx.records)
        # (weights key, slayer Sequential); a plain dict, so the copy is not registered as a submodule
        # and net.parameters() / net.state_dict() hold only the trainable graph
        self._lava_dl_cache: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, N, *] spikes -> [T, N, *] spikes, from the resting state."""
        frontend.reset_states(self.graph_module)
        return self.graph_module(x)

    @property
    def scales(self) -> dict[str, float]:
        """Each layer's co-scaling factor, ``{layer: scale}``; ``compile(..., coscale=net.coscale)`` reuses them with their grids."""
        from fxlava.blocks import SynapseBlock

        return {b.layer: b.scale for b in self.blocks if isinstance(b, SynapseBlock)}

    @property
    def coscale(self) -> dict[str, tuple[float, str]]:
        """Each layer's factor and weight grid, ``{layer: (scale, grid)}``: ``compile(..., coscale=net.coscale)`` rebuilds this network."""
        from fxlava.blocks import SynapseBlock

        return {b.layer: (b.scale, b.weight_grid.name) for b in self.blocks if isinstance(b, SynapseBlock)}

    @property
    def blocks(self) -> list[nn.Module]:
        """The fused blocks, in order (one per netx layer after the input layer)."""
        return blocks_of(self.graph_module)

    @property
    def voltage_floor_steps(self):
        """Steps for which Lava's voltage floor cannot change any spike, whatever the input (None: any number).

        Longer inputs are exact in Lava too unless a voltage really falls below about -2048; see
        ``SynapseBlock.voltage_floor_steps`` and docs/support.md.
        """
        return _voltage_floor_steps(self.blocks)

    def _weights_key(self):
        return tuple((id(p), p._version) for p in self.graph_module.parameters())

    @property
    def lava_dl(self) -> nn.Sequential:
        """An nn.Sequential of slayer blocks, [N, *, T] -> [N, *, T], rebuilt whenever the weights change."""
        key = self._weights_key()
        if self._lava_dl_cache.get("key") != key:
            self._lava_dl_cache.update(key=key, net=to_lava_dl(self.graph_module, self.input_shape))
        return self._lava_dl_cache["net"]

    def export_hdf5(self, path: Union[str, os.PathLike], compress: bool = False) -> str:
        """Write the netx file (with an input layer) atomically from the compiled graph; returns the path.

        ``compress=True`` stores the weights gzip-compressed; netx reads both alike.
        """
        from fxlava.backends.hdf5 import write_compiled

        write_compiled(blocks_with_shapes(self.graph_module), path, self.input_shape, compress=compress)
        return os.fspath(path)


def _voltage_floor_steps(blocks, reuse: bool = False):
    """The fewest ``voltage_floor_steps`` of the blocks (None: any number of steps).

    ``reuse``: take what co-scaling found for a block whose weights are unchanged since (compile's own
    check, right after the passes); otherwise count afresh.
    """
    steps = []
    for block in blocks:
        if not isinstance(block, SynapseBlock):
            continue
        known = getattr(getattr(block, "quantization", None), "voltage_floor", None) if reuse else None
        steps.append(known[1] if known is not None and known[0] == block.weights_key() else block.voltage_floor_steps)
    steps = [s for s in steps if s is not None]
    return min(steps) if steps else None


def _with_bias_option(pipeline: Pipeline, opts: CompileOptions) -> tuple[Pipeline, CompileOptions]:
    """bias='current' puts bias_to_current in place of reject_bias; a pipeline holding bias_to_current means 'current'."""
    from fxlava.passes import bias_to_current

    if "bias_to_current" in pipeline.names:
        return pipeline, dataclasses.replace(opts, bias="current")
    if opts.bias == "current":
        if "reject_bias" not in pipeline.names:
            raise ValueError("bias='current' replaces the pass reject_bias by bias_to_current, and this pipeline has "
                             "neither; add bias_to_current to it yourself")
        pipeline = pipeline.replace("reject_bias", bias_to_current)
    return pipeline, opts


def compile(model: nn.Module, example_input: torch.Tensor, pipeline: Optional[Pipeline] = None,
            **options) -> CompiledNetwork:
    """Compile a SpikingJelly model for Loihi; ``example_input`` is [T, N, *] spikes (or [N, T, *] for a forward()
    that transposes its input to [T, N, *] itself: the compiled network then takes [T, N, *]).

    A multi-step model whose forward() repeats a static input over time takes that input instead
    (e.g. images [N, C, H, W]): its ops up to the first spiking layer become ``net.encoder``, run on
    the host, and the compiled network takes their spikes (option ``encoder``).

    ``options`` are the fields of ``fxlava.options.CompileOptions`` (an unknown one raises TypeError).
    Raises one ``UnsupportedModelError`` listing every problem the passes found, in model order.
    """
    from fxlava.passes import default_pipeline

    opts = CompileOptions.from_kwargs(**options)
    pipeline = default_pipeline() if pipeline is None else pipeline
    pipeline, opts = _with_bias_option(pipeline, opts)
    gm, step_mode = frontend.trace(model, example_input, host_encoder=opts.encoder == "host")
    encoder = gm.meta["fxlava_encoder"]
    example_input = gm.meta["fxlava_example"]  # the encoder's spikes, when there is one
    ctx = CompileContext(example_input=example_input, step_mode=step_mode,
                         input_shape=tuple(example_input.shape[2:]), options=opts)
    ctx.record("trace", f"{type(model).__name__} traced in step mode '{step_mode}', "
                        f"{sum(1 for n in gm.graph.nodes if n.op == 'call_module')} modules")
    if encoder is not None:
        ctx.record("trace", f"forward() makes the time axis from its input: its ops up to {encoder.until} run on the "
                            f"host, not on Loihi (net.encoder; Loihi's input layer takes spikes): "
                            f"{', '.join(encoder.ops)}; the compiled network takes their spikes "
                            f"{list(example_input.shape)}")
    readout = gm.meta["fxlava_readout"]
    if readout.ops:
        ctx.record("trace", f"readout after {readout.after} runs on the host, not on Loihi "
                            f"(net.readout): {', '.join(readout.ops)}")
    if gm.meta.get("fxlava_shape_queries"):
        ctx.record("trace", f"shape queries ({', '.join(sorted(set(gm.meta['fxlava_shape_queries'])))}) answered from "
                            f"the example input: the graph is specialised to rank {example_input.dim()} and "
                            f"T = {example_input.shape[0]}")
    if gm.meta.get("fxlava_input_transposed"):
        ctx.record("trace", f"forward() takes its input as [N, T, *] and transposes it to [T, N, *] itself: the "
                            f"compiled network (net(x), net.lava_dl, the netx file) takes [T, N, *], "
                            f"x.transpose(0, 1) of the model's input, here T = {example_input.shape[0]}")
    if gm.meta.get("fxlava_hooks"):
        ctx.record("trace", f"weight reparametrisations made permanent on fxlava's copy (the weights the model "
                            f"computes with): {'; '.join(gm.meta['fxlava_hooks'])}")
    if gm.meta.get("fxlava_time_loops"):
        step_mode_s = frontend.detect_step_mode(model) == "s"
        ctx.record("trace", f"forward() loops over the {example_input.shape[0]} time steps calling "
                            f"{'single-step ' if step_mode_s else ''}modules once per step: the loop is compiled "
                            f"as one step, run once per step")
    if gm.meta.get("fxlava_dropped"):
        ctx.record("trace", f"identities in eval mode removed: {', '.join(gm.meta['fxlava_dropped'])}")
    # an output that no operation computes (neuron state, a constant, None, the input): no pass would see
    # it; an operation's output that is not spikes (a trailing Linear, a non-spiking neuron, an add) its
    # pass refuses
    ctx.refuse(gm.meta.get("fxlava_trace_issues", []))  # ops with no per-step form (along T or N, a conv over time)
    for node, because in gm.meta.get("fxlava_trace_left", []):
        ctx.leave(node, because=because)
    ctx.refuse([i for i in frontend.output_issues(gm)
                if i.fx_node is None or i.fx_node.op not in ("call_module", "call_function", "call_method")])
    try:
        gm = pipeline.run(gm, ctx)  # raises one UnsupportedModelError with every refusal
    except UnsupportedModelError as exc:
        grouped = one_per_module(gm, exc.issues)
        if len(grouped) == len(exc.issues):
            raise
        raise UnsupportedModelError(grouped) from exc
    net = CompiledNetwork(gm, ctx, pipeline, readout, encoder)
    floor = _voltage_floor_steps(net.blocks, reuse=True)
    if floor is not None and floor < example_input.shape[0]:
        message = (f"Lava clips voltages at about -2048, lava-dl does not: with inputs longer than {floor} steps "
                   f"(this example has {example_input.shape[0]}) a voltage may reach that floor and Lava may differ")
        ctx.record("compile", message)
        net.records.append(("compile", message))
        log.warning(message)
    return net
