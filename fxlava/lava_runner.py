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

The same reset makes networks with neuron biases (``fxlava.compile(..., bias="current")``) exact.
A bias is added to the voltage at every step, also in the steps before a layer's first input
arrives (layer k waits k steps), and slayer has no such steps; the reset at the first input
throws away what the bias integrated there. Loaded without a reset (``reset_interval=None``),
the same file differs from lava-dl. To load such a file for the chip, build it the same way:
``netx.hdf5.Network(net_config=path, reset_interval=R, reset_offset=1)`` with R >= T and the
samples sent R steps apart (R = T: back to back, as here).

A Lava run cannot hang or end in a traceback from inside Lava: ``run_lava`` runs Lava in a child
process of its own process group, with a time budget scaled from the network's size (a generous
floor keeps slow machines passing), and a watchdog that notices a Lava worker dying. netx refusing
or crashing on the file, a worker dying, and an overrun each raise ``fxlava.LavaRunError`` naming
the file and, where one is to blame, the netx layer; the whole process group (Lava's workers and
its shared-memory manager) is ended either way.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Optional, Union

import h5py

import numpy as np
import torch
from tqdm import tqdm

import fxlava  # noqa: F401  (installs the import hook Lava needs on Python >= 3.11 before any lava import)
from fxlava.errors import FxlavaError, LavaRunError
from lava.lib.dl.netx import hdf5 as netx_hdf5
from lava.lib.dl.netx.blocks import process as netx_blocks
from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg
from lava.proc.io.sink import RingBuffer as SinkBuffer
from lava.proc.io.source import RingBuffer as SourceBuffer
from lava.proc.lif.process import LIF, LIFReset

__all__ = ["run_lava", "lava_latency", "time_budget", "LavaRunError"]

ArrayLike = Union[torch.Tensor, np.ndarray]


# Time budget of a run: a floor for start-up on a slow, shared machine, plus ten times an estimate of
# the simulation itself. Measured here (2 shared cores): ~2-3 ms per Lava step for a 3-layer test
# network, ~22 ms per step for the 6-layer MNIST CSNN (20k neurons, 110k synapses).
BUDGET_FLOOR_S = 120.0
BUDGET_MARGIN = 10.0
_STEP_S, _LAYER_STEP_S, _UNIT_STEP_S = 2e-3, 1e-3, 1e-7  # per step; per layer and step; per neuron or synapse and step
_STOP_GRACE_S = 3.0
_WATCH_INTERVAL_S = 0.2


def lava_latency(path: str | os.PathLike, num_layers: int | None = None) -> int:
    """Steps by which Lava's output lags lava-dl's (``delay_shift=False``) for this netx file."""
    path = _checked_file(path)
    net = _load_network(path, num_layers=num_layers)
    try:
        _check_runnable(net, path)
        return len(net.layers)
    finally:
        _close(net)


def time_budget(path: str | os.PathLike, samples: int, steps: int) -> float:
    """Seconds ``run_lava`` allows for ``samples`` samples of ``steps`` steps of this netx file."""
    layers, units = 0, 0
    with h5py.File(os.fspath(path), "r") as f:
        for key in f.get("layer", {}):
            group = f["layer"][key]
            if "neuron" not in group or "shape" not in group:
                continue
            layers += 1
            neurons = int(np.prod(group["shape"][()]))
            fan_in = int(np.prod(group["weight"].shape[1:])) if "weight" in group else 0
            units += neurons * (1 + fan_in)
    total_steps = (samples + math.ceil(max(layers, 1) / steps)) * steps
    estimate = 2.0 + total_steps * (_STEP_S + layers * _LAYER_STEP_S + units * _UNIT_STEP_S)
    return BUDGET_FLOOR_S + BUDGET_MARGIN * estimate


def run_lava(path: str | os.PathLike, x: ArrayLike, *, progress: bool = False, samples_per_load: int = 32,
             timeout: Optional[float] = None, num_layers: int | None = None) -> torch.Tensor:
    """Run netx file ``path`` in Lava (fixed_pt) on binary spikes ``x`` [N, *, T]; return output spikes [N, *, T].

    ``num_layers`` builds only the file's first layers, as netx's ``Network(num_layers=...)``.
    ``timeout`` (seconds) defaults to ``time_budget(path, N, T)``. Raises ``LavaRunError`` naming the file
    (and the netx layer) when netx cannot load it, a Lava process dies, or the run overruns.
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
    path = _checked_file(path)
    _check_loadable(path)
    budget = float(timeout) if timeout is not None else time_budget(path, n, steps)
    if not budget > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    out = _in_own_process_group(path, budget, f"{n} samples of {steps} steps",
                                lambda report: _run_here(path, spikes, progress, samples_per_load, report, num_layers))
    return torch.from_numpy(out)


def _run_here(path: str, spikes: np.ndarray, progress: bool, samples_per_load: int,
              report: Callable[[BaseException], None], num_layers: Optional[int] = None) -> np.ndarray:
    """The Lava run itself, in this process; ``report`` hands a worker's death to the parent at once."""
    n, steps = spikes.shape[0], spikes.shape[-1]
    # netx starts a layer's reset offset at reset_offset + 1 (Lava counts steps from 1) and adds 1
    # per layer. Layer k (1-based) first sees sample s at step s*T + 1 + k: the source sends input
    # step 0 at Lava step 1 and each synapse holds it back one step. reset_offset=1 matches that.
    net = _load_network(path, reset_interval=steps, reset_offset=1, num_layers=num_layers)
    watchdog, restore = None, None
    try:
        _check_runnable(net, path)
        if n > 1 and _has_delays(net):
            # A delayed synapse keeps activations in flight past a sample's last step; the reset
            # of the neurons does not clear them, so samples cannot share one network.
            return np.concatenate([_run_here(path, spikes[i:i + 1], False, 1, report, num_layers)
                                   for i in tqdm(range(n), disable=not progress, unit="sample", desc="Lava")])
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
        watchdog = _Watchdog(net, path, report)
        watchdog.start()
        restore = _report_model_errors(net, path, report)

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
        if restore is not None:
            restore()
        if watchdog is not None:
            watchdog.stop()  # workers exit on stop(): that is no death
        _stop(net)

    stream = np.concatenate(stream, axis=-1)
    out = np.stack([stream[..., s * steps + latency: (s + 1) * steps + latency] for s in range(n)])
    return _reverse_sample_axes(out).astype(np.float32)


class _Watchdog(threading.Thread):
    """Notices a Lava worker that ends while the network runs (it raised, or was killed) and names its layer."""

    def __init__(self, net, path: str, report: Callable[[BaseException], None]):
        super().__init__(name="fxlava-lava-watchdog", daemon=True)
        self._net, self._path, self._report = net, path, report
        self._done = threading.Event()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        while not self._done.wait(_WATCH_INTERVAL_S):
            runtime = getattr(self._net, "runtime", None)
            infrastructure = getattr(runtime, "_messaging_infrastructure", None)
            for actor in list(getattr(infrastructure, "actors", []) or []):
                try:
                    alive = actor.is_alive()
                except ValueError:  # closed by Lava's own error handling: it has ended
                    alive = False
                if self._done.is_set() or alive:
                    continue
                self._report(self._death(actor))
                return

    def _death(self, actor) -> LavaRunError:
        process = dict(_worker_processes(self._net)).get(actor)
        layer = _layer_of_process(self._net, process)
        what = (f"the Lava process running {type(process).__name__} {process.name!r}" if process is not None
                else "a Lava runtime process")
        where = f"netx layer {layer}" if layer is not None else "the network"
        cause = ""
        try:
            if actor._pconn.poll():
                raised = actor._pconn.recv()
                if raised:
                    exc, tb = raised
                    frames = [ln.strip() for ln in str(tb).splitlines() if ln.strip().startswith("File ")]
                    at = f" ({frames[-1]})" if frames else ""
                    cause = f": {type(exc).__name__}: {exc}{at}"
        except (EOFError, OSError, ValueError):
            pass
        if not cause:
            cause = f" ({_exit_text(actor.exitcode)})"
        return LavaRunError(f"{self._path}: {what} for {where} died while the network ran{cause}",
                            self._path, layer)


def _report_model_errors(net, path: str, report: Callable[[BaseException], None]) -> Callable[[], None]:
    """Make Lava's Python process models report an exception (with their layer) before Lava's error handling.

    A process model that raises tells Lava's runtime service and then joins its ports, which blocks while
    the other workers wait for it; Lava's runtime then joins every worker and hangs. The join runs inside
    the ``except`` block, so the exception is known there: Lava's workers are forked after this patch, and
    each sends its exception straight to the parent of the run. Returns a function that undoes the patch.
    """
    from lava.magma.core.model.py.model import AbstractPyProcessModel

    original = AbstractPyProcessModel.join

    def join(self):
        raised = sys.exc_info()[1]
        if raised is not None:
            layer = _layer_of_process_id(net, getattr(self, "model_id", None))
            where = f"netx layer {layer}" if layer is not None else "the network"
            frame = traceback.extract_tb(raised.__traceback__)[-1:]
            at = f" (File {frame[0].filename}, line {frame[0].lineno})" if frame else ""
            report(LavaRunError(f"{path}: the Lava process running {type(self).__name__} for {where} raised "
                                f"{type(raised).__name__}: {raised}{at}", path, layer))
        return original(self)

    AbstractPyProcessModel.join = join
    return lambda: setattr(AbstractPyProcessModel, "join", original)


def _layer_of_process_id(net, process_id) -> Optional[int]:
    """The netx layer index (as in /layer/<i>) whose block holds the Lava process with id ``process_id``."""
    if process_id is None:
        return None
    for index, layer in enumerate(net.layers):
        parts = (layer, getattr(layer, "synapse", None), getattr(layer, "neuron", None))
        if any(getattr(p, "id", None) == process_id for p in parts if p is not None):
            return _file_layer_index(net, index)
    return None


def _worker_processes(net) -> list:
    """(worker OS process, Lava process it runs) pairs: Lava starts one worker per Python process model, in order."""
    from lava.magma.compiler.builders.py_builder import PyProcessBuilder

    runtime = getattr(net, "runtime", None)
    executable = getattr(runtime, "_executable", None)
    actors = list(getattr(getattr(runtime, "_messaging_infrastructure", None), "actors", []) or [])
    builders = getattr(executable, "proc_builders", None) or {}
    processes = [proc for proc, builder in builders.items() if isinstance(builder, PyProcessBuilder)]
    return list(zip(actors, processes))


def _layer_of_process(net, process) -> Optional[int]:
    """The netx layer index (as in /layer/<i>) whose block holds the Lava ``process``."""
    if process is None:
        return None
    for index, layer in enumerate(net.layers):
        if any(part is process for part in (layer, getattr(layer, "synapse", None), getattr(layer, "neuron", None))):
            return _file_layer_index(net, index)
    return None


def _file_layer_index(net, index: int) -> int:
    # netx's layers skip the shape-only input layer and flatten layers: find /layer/<i> of the index-th block
    blocks = -1
    config = net.net_config["layer"]
    for i in range(len(config)):
        kind = config[i]["type"]
        if kind not in ("input", "flatten"):
            blocks += 1
            if blocks == index:
                return i
    return index


def _in_own_process_group(path: str, budget: float, what: str, fn: Callable) -> np.ndarray:
    """Run ``fn(report)`` in a forked child leading its own process group; end the whole group afterwards."""
    ctx = multiprocessing.get_context("fork")  # Lava forks its own workers too; they inherit fxlava's import hook
    receive, send = ctx.Pipe(duplex=False)
    lock = threading.Lock()
    sent = threading.Event()

    def report(message) -> None:
        with lock:
            if sent.is_set():
                return
            try:
                send.send(message)
            except Exception:  # an exception that does not pickle: keep its text
                text = "".join(traceback.format_exception_only(type(message[1]), message[1])).strip()
                send.send(("raise", LavaRunError(f"{path}: {text}", path)))
            sent.set()

    def child() -> None:
        os.setpgrp()  # Lava's workers and shared-memory manager join this group: one killpg ends them all
        try:
            result = ("ok", fn(lambda exc: report(("raise", exc))))
        except (FxlavaError, ValueError) as exc:
            result = ("raise", exc)
        except BaseException as exc:  # noqa: BLE001  (handed to the parent as a LavaRunError)
            # Lava's runtime answers a dead worker with "1 Exception(s) occurred. See output above"; the
            # watchdog names the worker and its error, so give it a moment to speak first.
            sent.wait(3 * _WATCH_INTERVAL_S)
            frame = traceback.extract_tb(exc.__traceback__)[-1:] or [None]
            at = f" (at {frame[0].filename}:{frame[0].lineno})" if frame[0] is not None else ""
            result = ("raise", LavaRunError(f"{path}: Lava failed while running {what}: "
                                            f"{type(exc).__name__}: {exc}{at}", path))
        report(result)

    process = ctx.Process(target=child, name="fxlava-lava")
    process.start()
    send.close()
    try:
        deadline = time.monotonic() + budget
        while True:
            left = deadline - time.monotonic()
            if receive.poll(min(max(left, 0.0), 1.0)):
                try:
                    message = receive.recv()
                except EOFError:
                    process.join(_STOP_GRACE_S)
                    raise LavaRunError(f"{path}: the process running Lava died without a result "
                                       f"({_exit_text(process.exitcode)}) while running {what}", path) from None
                break
            if left <= 0:
                raise LavaRunError(
                    f"{path}: Lava did not finish {what} within {budget:.0f} s, the time budget for this "
                    f"network (fxlava.lava_runner.time_budget; pass timeout= to change it); its processes "
                    f"were stopped", path)
    finally:
        receive.close()
        _end_group(process)
    if message[0] == "ok":
        return message[1]
    raise message[1]


def _exit_text(code) -> str:
    return f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"


def _end_group(process) -> None:
    """Let the child finish on its own briefly, then end its whole process group (TERM, then KILL)."""
    process.join(_STOP_GRACE_S if process.exitcode is None else 0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + _STOP_GRACE_S
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.05)
        if not _group_alive(process.pid):
            break
    process.join(_STOP_GRACE_S)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies of the group still count for killpg; the child itself is reaped by join()
    return any(_pgid_of(pid) == pgid and _state_of(pid) != "Z" for pid in _pids())


def _pids():
    return (int(p) for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else iter(())


def _pgid_of(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _checked_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LavaRunError(f"{path}: no such netx file", path)
    if not h5py.is_hdf5(path):
        raise LavaRunError(f"{path}: not an hdf5 file, so not a netx network", path)
    return path


def _check_loadable(path: str) -> None:
    """Layers netx is known to crash on, named before netx sees the file."""
    with h5py.File(path, "r") as f:
        layers = f.get("layer")
        if layers is None:
            raise LavaRunError(f"{path}: no /layer group, so not a netx network", path)
        for i in range(len(layers)):
            group = layers.get(str(i))
            if group is None:
                raise LavaRunError(f"{path}: /layer/{i} is missing; netx reads layers 0, 1, 2, ... in order", path, i)
            kind = group["type"][0].decode("ascii") if "type" in group else "?"
            if kind in ("dense", "dense_rec") and "weight" in group and not np.any(group["weight"][()]):
                raise LavaRunError(
                    f"{path}: netx layer {i} (dense) has all {group['weight'].size} weights zero; netx cannot load "
                    f"it (its optimize_weight_bits scales by 255 / the largest weight). The layer passes nothing: "
                    f"train or rescale the network so that some weights survive quantisation", path, i)


def _load_network(path: str, **kwargs):
    """netx's Network for ``path``; any failure becomes a LavaRunError naming the file and the layer."""
    try:
        return netx_hdf5.Network(net_config=path, **kwargs)
    except Exception as exc:
        layer = _netx_layer_in_traceback(exc.__traceback__)
        where = f"netx layer {layer}" if layer is not None else "the file"
        raise LavaRunError(f"{path}: netx could not load {where}: {type(exc).__name__}: {exc}", path, layer) from exc


def _netx_layer_in_traceback(tb) -> Optional[int]:
    # netx's Network._create builds layer i in a loop over the file's /layer/<i>
    layer = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_create" and isinstance(frame.f_locals.get("i"), int):
            layer = frame.f_locals["i"]
        tb = tb.tb_next
    return layer


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
