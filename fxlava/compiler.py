"""fxlava.compile: trace, check, run the pass pipeline, and wrap the result with its backends."""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava import frontend
from fxlava.backends.lava_dl import blocks_of, to_lava_dl
from fxlava.errors import UnsupportedModelError, issue_at
from fxlava.pass_manager import CompileContext, Pipeline
from fxlava.rules import AVG_POOLS, FLATTENS, IDENTITIES, MAX_POOLS, NORMS, SYNAPSES

__all__ = ["compile", "CompiledNetwork"]

log = logging.getLogger(__name__)


# ops that turn a static input into a sequence (x.unsqueeze(0).repeat(T, ...)): an encoder, not a layer
_ENCODING_OPS = {"unsqueeze", "repeat", "expand", "expand_as", "repeat_interleave", "stack"}


def _known_node_issues(gm: fx.GraphModule):
    """Nodes that no built-in pass handles (reported up front, together with every other problem)."""
    from spikingjelly.activation_based import base, layer

    # normalisations and stateful modules: fold_batchnorm and substitute_neurons fold, substitute or refuse them
    known = SYNAPSES + AVG_POOLS + MAX_POOLS + FLATTENS + IDENTITIES + NORMS + (
        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, base.MemoryModule, layer.Dropout)
    issues = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if not isinstance(m, known):
                issues.append(issue_at(node, "a module with no Loihi equivalent in fxlava",
                                       _fix_for(m), module=m))
        elif getattr(node.target, "__name__", node.target) in _ENCODING_OPS:
            issues.append(issue_at(node, "an input encoding inside forward() (Loihi's input layer takes spikes)",
                                   "move the encoding out of forward() and give the model [T, N, *] spikes, "
                                   "e.g. encoding.PoissonEncoder applied T times to the image; then compile that model"))
        else:
            issues.append(issue_at(node, "an operation with no Loihi equivalent in fxlava",
                                   "remove it from forward() (compute it outside the model), "
                                   "or write a pass that lowers it"))
    return issues


def _fix_for(m: nn.Module) -> str:
    if isinstance(m, (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.LeakyReLU)):
        return "Loihi layers pass spikes, not activations: replace it with a spiking neuron (IFNode/LIFNode)"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool3d)):
        return "use nn.MaxPool2d after a spiking neuron (a max of spikes is an OR, which fxlava compiles)"
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return "drop it and give the next conv padding= instead (netx pads each side of a conv equally, with zeros)"
    return "remove it from the network that goes to Loihi, or write a pass that lowers it"


class CompiledNetwork(nn.Module):
    """The compiled network: ``graph_module`` on the SpikingJelly side, ``lava_dl`` and ``export_hdf5`` for Lava."""

    def __init__(self, graph_module: fx.GraphModule, ctx: CompileContext, pipeline: Pipeline,
                 readout: Optional[nn.Module] = None):
        super().__init__()
        self.graph_module = graph_module
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
    def blocks(self) -> list[nn.Module]:
        """The fused blocks, in order (one per netx layer after the input layer)."""
        return blocks_of(self.graph_module)

    def _weights_key(self):
        return tuple((id(p), p._version) for p in self.graph_module.parameters())

    @property
    def lava_dl(self) -> nn.Sequential:
        """An nn.Sequential of slayer blocks, [N, *, T] -> [N, *, T], rebuilt whenever the weights change."""
        key = self._weights_key()
        if self._lava_dl_cache.get("key") != key:
            self._lava_dl_cache.update(key=key, net=to_lava_dl(self.graph_module, self.input_shape))
        return self._lava_dl_cache["net"]

    def export_hdf5(self, path: Union[str, os.PathLike]) -> str:
        """Write the netx file (with an input layer) atomically; returns the path."""
        from fxlava.backends.hdf5 import write_netx

        write_netx(self.lava_dl, path, self.input_shape)
        return os.fspath(path)


def compile(model: nn.Module, example_input: torch.Tensor, pipeline: Optional[Pipeline] = None,
            **options) -> CompiledNetwork:
    """Compile a SpikingJelly model for Loihi; ``example_input`` is [T, N, *] spikes."""
    from fxlava.passes import default_pipeline

    default = default_pipeline()
    pipeline = default if pipeline is None else pipeline
    gm, step_mode = frontend.trace(model, example_input)
    ctx = CompileContext(example_input=example_input, step_mode=step_mode,
                         input_shape=tuple(example_input.shape[2:]), options=dict(options))
    ctx.record("trace", f"{type(model).__name__} traced in step mode '{step_mode}', "
                        f"{sum(1 for n in gm.graph.nodes if n.op == 'call_module')} modules")
    readout = gm.meta["fxlava_readout"]
    if readout.ops:
        ctx.record("trace", f"readout after {readout.after} runs on the host, not on Loihi "
                            f"(net.readout): {', '.join(readout.ops)}")
    issues = frontend.chain_issues(gm) + pipeline.issues(gm, ctx)
    # with user passes in the pipeline, an unknown node may be theirs to lower: leave it to fuse_blocks
    if pipeline.names == default.names:
        # a node already refused (by the chain check or a pass's own, more specific check) is reported once
        reported = {i.node for i in issues}
        issues += [i for i in _known_node_issues(gm) if i.node not in reported]
    if issues:
        raise UnsupportedModelError(issues)
    gm = pipeline.run(gm, ctx)
    return CompiledNetwork(gm, ctx, pipeline, readout)
