"""Write lava-dl slayer blocks as a netx hdf5 file that ``lava.lib.dl.netx.hdf5.Network`` loads as is.

The layers themselves are written by each block's own ``export_hdf5``, so the file holds exactly
what lava-dl would write; this module adds what lava-dl leaves out:

- ``/layer/0`` is an ``input`` layer holding only ``type`` and ``shape``. netx reads its shape
  (reversed, so (C, H, W) becomes Lava's (W, H, C)) as the input shape of the first conv layer
  and creates no process for it, so it adds no step of latency in Lava. An input layer with a
  ``neuron`` group would instead become a netx ``Input`` block, whose in-port netx never connects
  (it expects the input as neuron bias).
- Blocks netx cannot load, or would load wrongly, are refused with a ``ValueError`` instead of
  producing a file that fails (or silently differs) later in Lava.
- The file is written atomically and byte-for-byte deterministically.
"""
from __future__ import annotations

import math
import os
import secrets
from typing import Iterable, Sequence

import h5py
import numpy as np

from fxlava.target import NETX_LAYER_TYPES, NETX_NEURON_TYPES
from fxlava.target import NETX_NOT_IMPLEMENTED as _NETX_NOT_IMPLEMENTED

__all__ = ["write_netx", "NETX_LAYER_TYPES", "NETX_NEURON_TYPES"]

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

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory as `path`, so os.replace is an atomic rename on one filesystem; the leading
    # dot keeps a half-written file out of globs such as *.net.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # os.open with 0o666 gives the file the permissions open() would (umask applied), unlike mkstemp's 0o600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with h5py.File(tmp, "w", **_FILE_OPTIONS) as f:
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
        if "weight" in group and not np.any(group["weight"][()]):
            # netx's optimize_weight_bits scales by 255 / max(weight): OverflowError at load time
            raise ValueError(
                f"{where} is a dense layer whose {group['weight'].size} weights are all zero after 8-bit "
                f"quantisation (steps of 2/64); netx cannot load such a layer, and it would pass nothing. "
                f"Train the network, or scale its weights and thresholds up, so that some weights survive")
    return tuple(int(n) for n in group["shape"][()])


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
