"""fxlava.compile: validate the options, trace, run the pass pipeline, and wrap the result with its backends."""
from __future__ import annotations

import logging
import os
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava import frontend
from fxlava.backends.lava_dl import blocks_of, to_lava_dl
from fxlava.options import CompileOptions
from fxlava.pass_manager import CompileContext, Pipeline

__all__ = ["compile", "CompiledNetwork"]

log = logging.getLogger(__name__)


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
    def scales(self) -> dict[str, float]:
        """Each layer's co-scaling factor, ``{layer: scale}``; ``compile(..., coscale=net.scales)`` reuses them."""
        from fxlava.blocks import SynapseBlock

        return {b.layer: b.scale for b in self.blocks if isinstance(b, SynapseBlock)}

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
    """Compile a SpikingJelly model for Loihi; ``example_input`` is [T, N, *] spikes.

    ``options`` are the fields of ``fxlava.options.CompileOptions`` (an unknown one raises TypeError).
    Raises one ``UnsupportedModelError`` listing every problem the passes found, in model order.
    """
    from fxlava.passes import default_pipeline

    opts = CompileOptions.from_kwargs(**options)
    pipeline = default_pipeline() if pipeline is None else pipeline
    gm, step_mode = frontend.trace(model, example_input)
    ctx = CompileContext(example_input=example_input, step_mode=step_mode,
                         input_shape=tuple(example_input.shape[2:]), options=opts)
    ctx.record("trace", f"{type(model).__name__} traced in step mode '{step_mode}', "
                        f"{sum(1 for n in gm.graph.nodes if n.op == 'call_module')} modules")
    readout = gm.meta["fxlava_readout"]
    if readout.ops:
        ctx.record("trace", f"readout after {readout.after} runs on the host, not on Loihi "
                            f"(net.readout): {', '.join(readout.ops)}")
    gm = pipeline.run(gm, ctx)  # raises one UnsupportedModelError with every refusal
    return CompiledNetwork(gm, ctx, pipeline, readout)
