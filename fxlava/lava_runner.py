"""Run a netx file in Lava's CPU simulator of Loihi 2 and return spikes comparable with lava-dl's.

How Lava's timing relates to lava-dl's (measured, see docs/compat.md):

- Every netx layer (conv or dense block: synapse + neuron) adds one step of latency, because
  Lava's Conv/Dense synapse models send the activation they computed in the previous step.
  The shape-only input layer and netx's flatten create no process and add nothing. So the
  output for lava-dl time ``t`` (blocks with ``delay_shift=False``, the convention SpikingJelly's
  lava_exchange uses) appears at Lava step ``t + len(net.layers)``. slayer blocks with
  ``delay_shift=True`` model exactly that latency, so their output equals Lava's raw output.
- netx puts conv layers in (W, H, C) (XYZ) order: ports are the reverse of lava-dl's (C, H, W);
  dense ports are (features,) in both.

Lava has no batch dimension, so samples are run one after another in a single compiled network:
each netx layer is built as ``LIFReset`` with ``reset_interval=T``, which zeroes a layer's current
and voltage in the very step its first input of the next sample arrives. The synapses hold no
other state, so this pipelining is bit-exact with running every sample in a fresh network, and it
avoids Lava's ~0.5 s compile and start-up per sample.
"""
from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import torch
from tqdm import tqdm

import fxlava  # noqa: F401  (installs the import hook Lava needs on Python >= 3.11 before any lava import)
from lava.lib.dl.netx import hdf5 as netx_hdf5
from lava.lib.dl.netx.blocks import process as netx_blocks
from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg
from lava.proc.io.sink import RingBuffer as SinkBuffer
from lava.proc.io.source import RingBuffer as SourceBuffer
from lava.proc.lif.process import LIF, LIFReset

__all__ = ["run_lava", "lava_latency"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def lava_latency(path: str | os.PathLike, num_layers: int | None = None) -> int:
    """Steps by which Lava's output lags lava-dl's (``delay_shift=False``) for this netx file."""
    net = netx_hdf5.Network(net_config=os.fspath(path), num_layers=num_layers)
    try:
        _check_runnable(net, path)
        return len(net.layers)
    finally:
        _close(net)


def run_lava(path: str | os.PathLike, x: ArrayLike, *, progress: bool = False, samples_per_load: int = 32,
             num_layers: int | None = None) -> torch.Tensor:
    """Run netx file ``path`` in Lava (fixed_pt) on binary spikes ``x`` [N, *, T]; return output spikes [N, *, T].

    ``num_layers`` builds only the file's first layers, as netx's ``Network(num_layers=...)``.
    """
    spikes = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if spikes.ndim < 3:
        raise ValueError(f"x must be [N, *, T] in lava-dl layout (batch first, time last), got shape {spikes.shape}")
    if not np.isin(spikes, (0, 1)).all():
        # Lava's synapses read unary spikes as booleans, so any other value would be silently changed.
        raise ValueError("x must hold binary spikes (0 or 1)")
    if samples_per_load < 1:
        raise ValueError(f"samples_per_load must be >= 1, got {samples_per_load}")
    n, steps = spikes.shape[0], spikes.shape[-1]
    if n == 0 or steps == 0:
        raise ValueError(f"x must hold at least one sample of at least one time step, got shape {spikes.shape}")

    # netx starts a layer's reset offset at reset_offset + 1 (Lava counts steps from 1) and adds 1
    # per layer. Layer k (1-based) first sees sample s at step s*T + 1 + k: the source sends input
    # step 0 at Lava step 1 and each synapse holds it back one step. reset_offset=1 matches that.
    net = netx_hdf5.Network(net_config=os.fspath(path), reset_interval=steps, reset_offset=1, num_layers=num_layers)
    try:
        _check_runnable(net, path)
        if n > 1 and _has_delays(net):
            # A delayed synapse keeps activations in flight past a sample's last step; the reset
            # of the neurons does not clear them, so samples cannot share one network.
            return torch.cat([run_lava(path, spikes[i:i + 1], num_layers=num_layers) for i in
                              tqdm(range(n), disable=not progress, unit="sample", desc="Lava")])
        latency = len(net.layers)
        lava_in = _to_lava_layout(spikes, tuple(net.inp.shape), path)
        lava_out_shape = tuple(net.out.shape)

        # Trailing all-zero samples flush the last real sample's spikes through the pipeline.
        total = n + math.ceil(latency / steps)
        per_load = min(samples_per_load, total)

        def load(first: int) -> np.ndarray:
            # The source's ring buffer holds `per_load` samples back to back; Lava reads step s from
            # column (s - 1) % (per_load * T), so every load starts exactly at column 0.
            chunk = np.zeros((per_load,) + lava_in.shape[1:], dtype=np.int32)
            real = lava_in[first:min(first + per_load, n)]
            chunk[: len(real)] = real
            return np.moveaxis(chunk, 0, -2).reshape(lava_in.shape[1:-1] + (per_load * steps,))

        source = SourceBuffer(data=load(0))
        sink = SinkBuffer(shape=lava_out_shape, buffer=per_load * steps)
        source.s_out.connect(net.inp)
        net.out.connect(sink.a_in)
        run_cfg = Loihi2SimCfg(select_tag="fixed_pt")

        stream = []
        with tqdm(total=n, disable=not progress, unit="sample", desc="Lava") as bar:
            for first in range(0, total, per_load):
                if first:
                    source.data.set(load(first))
                count = min(per_load, total - first)
                # One run call per sample lets the bar move; measured no slower than one call per load.
                for sample in range(first, first + count):
                    net.run(condition=RunSteps(num_steps=steps), run_cfg=run_cfg)
                    bar.update(1 if sample < n else 0)
                stream.append(np.asarray(sink.data.get())[..., : count * steps])
    finally:
        _stop(net)

    stream = np.concatenate(stream, axis=-1)
    out = np.stack([stream[..., s * steps + latency: (s + 1) * steps + latency] for s in range(n)])
    return torch.from_numpy(_reverse_sample_axes(out).astype(np.float32))


def _stop(net) -> None:
    # Lava forks worker processes; stop() ends them even when compiling or running failed (it does
    # nothing for a network that never ran).
    try:
        net.stop()
    finally:
        _close(net)


def _has_delays(net) -> bool:
    return any(isinstance(layer.synapse, netx_blocks.DelayDenseSynapse) for layer in net.layers)


def _check_runnable(net, path) -> None:
    # Only what was verified bit-exact against lava-dl is accepted; anything else would need its own
    # latency and reset rules.
    for index, layer in enumerate(net.layers):
        where = f"{os.fspath(path)}: netx layer {index} ({type(layer).__name__})"
        if isinstance(layer, netx_blocks.Input):
            raise ValueError(
                f"{where} is an input layer with a neuron, which netx drives through neuron bias and never "
                f"connects to the network's in-port; run_lava needs an input layer with only a shape, as "
                f"fxlava.backends.hdf5.write_netx writes it"
            )
        if type(layer) not in (netx_blocks.Conv, netx_blocks.Dense):
            raise ValueError(f"{where}: run_lava supports conv and dense layers only")
        if type(layer.neuron) not in (LIF, LIFReset):
            raise ValueError(f"{where} has {type(layer.neuron).__name__} neurons; run_lava supports CUBA neurons only")
        synapse = layer.synapse
        if not isinstance(synapse, (netx_blocks.DenseSynapse, netx_blocks.ConvSynapse, netx_blocks.DelayDenseSynapse)):
            raise ValueError(f"{where} has a {type(layer.synapse).__name__} synapse; run_lava supports Conv, Dense "
                             f"and DelayDense synapses only")


def _to_lava_layout(spikes: np.ndarray, port_shape: tuple[int, ...], path) -> np.ndarray:
    """[N, *lava-dl shape, T] -> [N, *netx port shape, T]: reverse the sample axes, or flatten (C, H, W)."""
    sample_shape = spikes.shape[1:-1]
    if tuple(reversed(sample_shape)) == port_shape:
        return _reverse_sample_axes(spikes)
    if len(port_shape) == 1 and math.prod(sample_shape) == port_shape[0]:
        # A dense first layer: flatten in C-order, as slayer's Flatten does.
        return spikes.reshape(spikes.shape[0], -1, spikes.shape[-1])
    raise ValueError(
        f"x has per-sample shape {sample_shape} (lava-dl order) but {os.fspath(path)} expects "
        f"{tuple(reversed(port_shape))} (its Lava in-port is {port_shape} in (W, H, C) order)"
    )


def _reverse_sample_axes(a: np.ndarray) -> np.ndarray:
    inner = list(range(1, a.ndim - 1))
    return np.ascontiguousarray(a.transpose([0, *reversed(inner), a.ndim - 1]))


def _close(net) -> None:
    # netx's NetDict opens the hdf5 file and never closes it; every Network would leak a handle.
    try:
        net.net_config.f.close()
    except Exception:
        pass
