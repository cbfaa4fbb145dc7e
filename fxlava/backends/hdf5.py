"""Write a compiled network as a netx hdf5 file that ``lava.lib.dl.netx.hdf5.Network`` loads as is.

``write_compiled`` writes fxlava's own blocks straight from the compiled IR: the layout is the one
lava-dl's ``export_hdf5`` produces and netx reads (``lava/lib/dl/netx/hdf5.py``), but the shapes
come from the graph (no slayer forward pass) and the weights are stored as the integer mantissas
netx reads, in the smallest integer type that holds them: int8, or int16 for a layer on lava-dl's
grid (``fxlava.target.EVEN_GRID``) with a mantissa outside [-128, 127]; co-scaled layers use
FINE_GRID, whose mantissas always fit int8. netx casts every weight with ``astype(int)`` before
anything else touches it, so the integer type changes nothing it computes. ``write_netx`` writes lava-dl
slayer blocks with their own ``export_hdf5`` (float32 weights). Both add what lava-dl leaves out:

- ``/layer/0`` is an ``input`` layer holding only ``type`` and ``shape``. netx reads its shape
  (reversed, so (C, H, W) becomes Lava's (W, H, C)) as the input shape of the first conv layer
  and creates no process for it, so it adds no step of latency in Lava. An input layer with a
  ``neuron`` group would instead become a netx ``Input`` block, whose in-port netx never connects
  (it expects the input as neuron bias).
- Blocks netx cannot load, or would load wrongly, are refused with a ``ValueError`` instead of
  producing a file that fails (or silently differs) later in Lava.
- The file is written atomically and byte-for-byte deterministically; ``compress=True`` stores
  the weights gzip-compressed (h5py, and so netx, read them transparently).
"""
from __future__ import annotations

import math
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import h5py
import numpy as np

from fxlava.target import NETX_LAYER_TYPES, NETX_NEURON_TYPES
from fxlava.target import NETX_NOT_IMPLEMENTED as _NETX_NOT_IMPLEMENTED

__all__ = ["write_compiled", "write_netx", "weight_mantissas", "NETX_LAYER_TYPES", "NETX_NEURON_TYPES"]

# Deterministic output: with the v0 superblock and v1 object headers ("earliest", h5py's default,
# pinned here so a global setting cannot change it) groups carry no modification time, and h5py
# creates datasets with track_times=False, which slayer's export_hdf5 does not override. With
# libver="latest" every group header stores its creation time and two writes differ.
_FILE_OPTIONS = {"libver": "earliest", "track_order": False}


def write_netx(blocks: Iterable, path: str | os.PathLike, input_shape: Sequence[int]) -> None:
    """Write slayer blocks (neuron shapes set by a forward pass) to a netx file at ``path``, atomically."""
    blocks = list(blocks)
    shape = _checked_input_shape(input_shape)
    if not blocks:
        raise ValueError("write_netx needs at least one block: netx cannot build a network without layers")
    for index, block in enumerate(blocks):
        _check_exportable(index, block)

    def fill(f):
        layers = f.create_group("layer", track_order=False)
        _write_input_layer(layers.create_group("0", track_order=False), shape)
        current = shape
        for index, block in enumerate(blocks):
            group = layers.create_group(str(index + 1), track_order=False)
            block.export_hdf5(group)
            current = _check_layer(index, block, group, current)
        if _layer_type(len(blocks) - 1, blocks[-1], layers[str(len(blocks))]) == "flatten":
            raise ValueError(
                f"{_describe(len(blocks) - 1, blocks[-1])}: the network ends in a flatten layer, which netx "
                f"ignores (it only applies flatten to the dense layer that follows); drop it"
            )

    _atomic_write(path, fill)


def write_compiled(layers: Iterable[tuple], path: str | os.PathLike, input_shape: Sequence[int],
                   compress: bool = False) -> None:
    """Write fxlava blocks, given as (block, output shape) pairs from the compiled graph, to a netx file, atomically."""
    from fxlava.blocks import FlattenBlock, SynapseBlock

    layers = [(block, tuple(int(n) for n in out_shape)) for block, out_shape in layers]
    shape = _checked_input_shape(input_shape)
    if not layers:
        raise ValueError("write_compiled needs at least one block: netx cannot build a network without layers")
    for index, (block, _) in enumerate(layers):
        if not isinstance(block, (SynapseBlock, FlattenBlock)):
            raise ValueError(f"{_describe(index, block)} is not an fxlava block (SynapseBlock or FlattenBlock)")
    if isinstance(layers[-1][0], FlattenBlock):
        raise ValueError(f"{_describe(len(layers) - 1, layers[-1][0])}: the network ends in a flatten layer, which "
                         f"netx ignores (it only applies flatten to the dense layer that follows); drop it")
    # gzip is deterministic; shuffle groups the bytes of wider integers, which compresses better
    packed = {"compression": "gzip", "compression_opts": 4, "shuffle": True} if compress else {}

    def fill(f, mantissas):
        groups = f.create_group("layer", track_order=False)
        _write_input_layer(groups.create_group("0", track_order=False), shape)
        current = shape
        for index, (block, out_shape) in enumerate(layers):
            group = groups.create_group(str(index + 1), track_order=False)
            if isinstance(block, FlattenBlock):
                group.create_dataset("type", (1,), "S10", [b"flatten"])
                # slayer's Flatten writes (features, 1, 1); netx reads only the type
                group.create_dataset("shape", data=np.array([math.prod(current), 1, 1], dtype=np.int64))
                current = (math.prod(current),)
                continue
            _write_synapse_block(index, block, group, current, out_shape, packed, mantissas)
            current = out_shape

    # The mantissas are computed in slices of rows, in order, on a second thread, while the file is
    # written (h5py writes without holding the GIL): a large layer is written as it is computed, and
    # never held whole. Compressed weights are written a layer at a time, as gzip chunks them.
    slices = [(block, start, stop, dtype) for block, _ in layers if isinstance(block, SynapseBlock)
              for dtype in [_mantissa_dtype(block.synapse.weight, block.weight_grid, block.scale)]
              for start, stop in _row_slices(block.synapse.weight, whole=compress)]
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fxlava-mantissas")
    try:
        mantissas = pool.map(_slice_mantissas, slices)
        _atomic_write(path, lambda f: fill(f, mantissas))
    finally:
        pool.shutdown(cancel_futures=True)  # after a refusal, the slices not yet begun are not computed


#: Uncompressed weights are computed and written in slices of whole rows of about this many mantissas.
SLICE = 1 << 22


def _row_slices(weight, whole: bool = False) -> list[tuple[int, int]]:
    """(start, stop) of the slices of rows (output channels) in which a layer's mantissas are written."""
    rows = int(weight.shape[0]) if weight.dim() else 1
    per = rows if whole else max(1, SLICE // max(1, weight[0].numel() if weight.dim() else 1))
    return [(start, min(start + per, rows)) for start in range(0, rows, per)]


def _slice_mantissas(task) -> tuple[int, np.ndarray]:
    block, start, stop, dtype = task
    return start, _mantissas(block.synapse.weight[start:stop], block.weight_grid, block.scale, dtype)


def _mantissa_dtype(weight, grid, scale: float) -> np.dtype:
    """int8 when every mantissa fits one, else int16: from the weights' range (rounding is monotonic)."""
    import torch

    from fxlava.target import weight_steps

    if (grid.mant_min >= -128 and grid.mant_max <= 127) or weight.numel() == 0:
        return np.dtype(np.int8)
    ends = torch.stack(weight.detach().aminmax()).reshape(2, 1)
    steps = next(weight_steps(ends, grid, scale))[1].round_().clamp_(*grid.step_range)
    least, most = (int(v) * grid.mant_step for v in steps.flatten())
    return np.dtype(np.int8 if least >= -128 and most <= 127 else np.int16)


def _mantissas(weight, grid, scale: float, dtype: np.dtype) -> np.ndarray:
    import torch

    from fxlava.target import weight_steps

    # quantize_weight(weight * scale, grid) in units of the step, by blocks of rows that stay in cache
    # (fxlava.target.weight_steps): those always fit an int8
    lo, hi = grid.step_range
    steps = torch.empty(weight.shape, dtype=torch.int8)
    rows, start = steps.view(-1, 1) if weight.dim() < 2 else steps.view(weight.shape[0], -1), 0
    for _, x in weight_steps(weight, grid, scale):
        rows[start:start + x.shape[0]].copy_(x.round_().clamp_(lo, hi))
        start += x.shape[0]
    if dtype == np.int8:
        return steps.mul_(grid.mant_step).numpy()
    return (steps.to(torch.int16) * grid.mant_step).numpy()


def weight_mantissas(weight, grid=None, scale: float = 1.0) -> np.ndarray:
    """The 8-bit weight mantissas netx reads, ``quantize_weight(weight * scale, grid) * 64``: int8 when they fit, else int16.

    ``grid`` is a ``fxlava.target.WeightGrid`` (default lava-dl's EVEN_GRID, whose mantissas pass
    [-128, 127] and then need int16; FINE_GRID's always fit int8).
    """
    from fxlava.target import EVEN_GRID

    grid = EVEN_GRID if grid is None else grid
    return _mantissas(weight, grid, scale, _mantissa_dtype(weight, grid, scale))


def _write_synapse_block(index, block, group, current, out_shape, packed, mantissas) -> None:
    import torch.nn as nn

    where = _describe(index, block)
    syn, neuron = block.synapse, block.neuron
    if isinstance(syn, nn.Conv2d):
        if len(current) != 3 or current[0] != syn.in_channels:
            raise ValueError(f"{where} is a conv layer with {syn.in_channels} input channels but receives shape {current}")
        group.create_dataset("type", (1,), "S10", [b"conv"])
        group.create_dataset("shape", data=np.array(out_shape, dtype=np.int64))
        group.create_dataset("inChannels", data=syn.in_channels)
        group.create_dataset("outChannels", data=syn.out_channels)
        group.create_dataset("kernelSize", data=np.array(syn.kernel_size, dtype=np.int64))
        group.create_dataset("stride", data=np.array(syn.stride, dtype=np.int64))
        group.create_dataset("padding", data=np.array(syn.padding, dtype=np.int64))
        group.create_dataset("dilation", data=np.array(syn.dilation, dtype=np.int64))
        group.create_dataset("groups", data=syn.groups)
    else:
        if len(current) != 1 or current[0] != syn.in_features:
            raise ValueError(f"{where} is a dense layer with {syn.in_features} inputs but receives shape {current}")
        group.create_dataset("type", (1,), "S10", [b"dense"])
        group.create_dataset("shape", data=np.array(out_shape, dtype=np.int64))
        group.create_dataset("inFeatures", data=syn.in_features)
        group.create_dataset("outFeatures", data=syn.out_features)
    _write_weights(group, block.synapse.weight, packed, mantissas,
                   None if isinstance(syn, nn.Conv2d) else where)
    mant = block.bias_mantissa
    if mant is not None:
        # netx reads a layer's bias as the neurons' 13-bit bias mantissa (exponent 6)
        group.create_dataset("bias", data=mant.cpu().numpy().astype(np.int16).reshape(-1))
    for key, value in neuron.device_params.items():
        group.create_dataset(f"neuron/{key}", data=value)


def _atomic_write(path, fill) -> None:
    """Run ``fill(h5py.File)`` on a temporary file next to ``path`` and rename it over ``path`` only if it succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory as `path`, so os.replace is an atomic rename on one filesystem; the leading
    # dot keeps a half-written file out of globs such as *.net.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 gives the file the permissions open() would (umask applied), unlike mkstemp's 0o600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with h5py.File(tmp, "w", **_FILE_OPTIONS) as f:
            fill(f)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _checked_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of ints such as (C, H, W) or (features,), got {input_shape!r}") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(
            f"input_shape must be the per-sample shape in lava-dl order, (C, H, W) or (features,), "
            f"without batch or time dimensions; got {shape}"
        )
    return shape


def _describe(index: int, block) -> str:
    return f"block {index} ({type(block).__module__}.{type(block).__qualname__}, netx /layer/{index + 1})"


def _check_exportable(index: int, block) -> None:
    if not callable(getattr(block, "export_hdf5", None)):
        raise ValueError(f"{_describe(index, block)} has no export_hdf5(); only lava-dl slayer blocks can be written")
    try:
        shape = block.shape
    except AttributeError:
        return
    if shape is None:
        # slayer would otherwise fail deep inside h5py on np.array(None) ("Object dtype ... has no native HDF5 equivalent").
        raise ValueError(
            f"{_describe(index, block)} has no neuron shape yet; slayer blocks learn it from a forward pass, "
            f"so run the network once on an example input before writing it"
        )


def _write_input_layer(group: h5py.Group, shape: tuple[int, ...]) -> None:
    # Written the way slayer's own AbstractInput.export_hdf5 writes type and shape, but with no
    # neuron group: netx then only takes the input shape from it (see the module docstring).
    group.create_dataset("type", (1,), "S10", [b"input"])
    group.create_dataset("shape", data=np.array(shape, dtype=np.int64))


def _layer_type(index: int, block, group: h5py.Group) -> str:
    if "type" not in group:
        raise ValueError(f"{_describe(index, block)} exported no layer type (its export_hdf5 wrote nothing netx can load)")
    return group["type"][0].decode("ascii")


def _check_layer(index: int, block, group: h5py.Group, current: tuple[int, ...]) -> tuple[int, ...]:
    """Refuse what netx cannot load or would load wrongly; return the shape the layer outputs."""
    where = _describe(index, block)
    kind = _layer_type(index, block, group)
    if kind == "input":
        raise ValueError(f"{where}: an input block inside the network; write_netx writes the input layer itself from input_shape")
    if kind not in NETX_LAYER_TYPES:
        hint = " (a sum pool can be written as a conv with groups=C and a ones kernel)" if kind == "pool" else ""
        raise ValueError(
            f"{where} exports a {kind!r} layer, which lava-dl netx cannot load: netx only builds "
            f"{', '.join(sorted(NETX_LAYER_TYPES))} layers and raises NotImplementedError for "
            f"{', '.join(_NETX_NOT_IMPLEMENTED)}{hint}"
        )
    if kind == "flatten":
        return (math.prod(current),)

    if "neuron/type" in group:
        neuron = group["neuron/type"][()]
        neuron = neuron.decode("ascii") if isinstance(neuron, bytes) else str(neuron)
        if neuron not in NETX_NEURON_TYPES:
            raise ValueError(f"{where} has {neuron} neurons; netx maps only {', '.join(sorted(NETX_NEURON_TYPES))} to Lava")
    if "neuron/weight_exp" in group:
        raise ValueError(f"{where} has a normalisation weight exponent (neuron/weight_exp), which netx silently drops")

    if kind == "conv":
        if "delay" in group:
            raise ValueError(f"{where} has axonal delays; netx ignores delays on conv layers, so Lava would differ")
        in_channels = int(group["inChannels"][()])
        if len(current) != 3 or current[0] != in_channels:
            raise ValueError(f"{where} is a conv layer with {in_channels} input channels but receives shape {current} (C, H, W)")
    else:  # dense, dense_rec
        in_features = int(group["inFeatures"][()])
        if len(current) != 1:
            raise ValueError(f"{where} is a dense layer but receives shape {current}; put a Flatten block before it")
        if current[0] != in_features:
            raise ValueError(f"{where} is a dense layer with {in_features} inputs but receives {current[0]}")
        if "weight" in group:
            _refuse_all_zero_dense(where, group["weight"][()])
    return tuple(int(n) for n in group["shape"][()])


def _write_weights(group, weight, packed, mantissas, dense: str | None) -> None:
    """The layer's ``weight`` dataset from its slices of mantissas, ``(first row, array)`` taken from ``mantissas``.

    ``dense`` names a dense layer, which may not be all zero (``_refuse_all_zero_dense``).
    """
    shape, rows, nonzero = tuple(weight.shape), (int(weight.shape[0]) if weight.dim() else 1), False
    start, part = next(mantissas)
    if start + len(part) == rows:  # a layer in one slice (and every compressed layer)
        group.create_dataset("weight", data=part.reshape(shape), **(packed if part.size > 1 else {}))
        nonzero = bool(np.any(part))
    else:
        # the same contiguous dataset, byte for byte, as one write of the whole array
        dataset = group.create_dataset("weight", shape=shape, dtype=part.dtype)
        while True:
            dataset[start:start + len(part)] = part
            nonzero = nonzero or bool(np.any(part))
            if start + len(part) == rows:
                break
            start, part = next(mantissas)
    if dense is not None and not nonzero:
        raise _all_zero_dense(dense, math.prod(shape))


def _refuse_all_zero_dense(where: str, weights: np.ndarray) -> None:
    if not np.any(weights):
        raise _all_zero_dense(where, np.size(weights))


def _all_zero_dense(where: str, size: int) -> ValueError:
    """netx's optimize_weight_bits scales a dense layer by 255 / max|weight|: an all-zero one fails at load time."""
    return ValueError(
        f"{where} is a dense layer whose {size} weights are all zero after 8-bit "
        f"quantisation; netx cannot load such a layer, and it would pass nothing. "
        f"Train the network, or scale its weights and thresholds up, so that some weights survive")


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; some filesystems refuse to open directories, which is harmless.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
