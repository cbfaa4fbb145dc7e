"""Run a netx hdf5 file on [N, *, T] batches in PyTorch, bit-exact with Lava's fixed-point simulator.

``load_netx(path)`` reads the file the way ``lava.lib.dl.netx.hdf5.Network`` does and returns an
``nn.Module`` that computes, for a whole batch and on CPU or GPU, the integer arithmetic of
Lava's ``fixed_pt`` process models (read from lava-nc 0.10.0):

- synapses (``lava/proc/conv/models.py``, ``lava/proc/dense/models.py``): a conv layer sums the
  file's integer weights (netx casts them with ``astype(int)``) and wraps the sum to 24 signed
  bits; a dense layer first passes its weights through netx's ``optimize_weight_bits`` and
  Lava's ``clip_weights`` / ``truncate_weights``, then shifts the sum by the weight exponent
  (an arithmetic shift, so a right shift floors). Axonal delays (``DelayDense``) add ``d``
  steps to the synapse's one-step latency.
- neurons (``lava/proc/lif/models.py``, ``PyLifResetModelBitAcc``; netx maps CUBA and LOIHI
  neurons to it): ``u = trunc(u (4096 - iDecay) / 4096) + (a << 6)`` wrapped to 24 bits,
  ``v = trunc(v (4096 - vDecay) / 4096) + u + (bias << 6)`` clipped to +-(2**23 - 1), a spike
  where ``v > vThMant << 6``, then ``v = 0`` there.

Lava delays every layer's output by one step (its synapse sends what it computed in the
previous step); the executor removes that latency exactly as ``fxlava.run_lava`` does, so
``load_netx(path)(x)`` equals ``fxlava.run_lava(path, x)`` on every spike, every sample starting
from rest. All states are integers held exactly in float64 (products stay below 2**53); synaptic
sums are taken in float32 when they provably stay below 2**24, else in float64.

An input layer with a neuron (lava-dl's own test networks have one) is run as Loihi runs it:
its neurons receive no synaptic input, and the network's input ``x`` is their bias mantissa at
each step (a static image repeated over time, as netx's Input block expects). Anything the
executor cannot run (another neuron or layer type, graded spikes) is refused with a
``NetxFileError`` naming the file, the layer and its type; so is a malformed file, naming the
field.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlava.errors import FxlavaError
from fxlava.target import BIAS_EXP, DECAY_SCALE, MAX_DELAY, V_TH_MANT_BITS, VOLTAGE_BITS, WEIGHT_MANT_BITS

__all__ = ["load_netx", "NetxNetwork", "NetxFileError", "netx_weights", "read_netx"]

_UV_MAX = 1 << (VOLTAGE_BITS - 1)  # Loihi's u and v are 24-bit signed
_DECAY_UNITY = DECAY_SCALE  # 4096 == 1.0
_ACT_SHIFT = 6  # Lava left-shifts synaptic input (and the threshold) by 6 to MSB-align them with u and v
_EXACT_F32 = float(1 << 24)
_NEURON_TYPES = ("CUBA", "LOIHI")
# netx's default for a dense layer without a neuron group: a non-leaky integrator that never fires
# (hdf5.py writes `1 << 18 - 1`, which Python reads as 1 << 17).
_DEFAULT_NEURON = {"type": "CUBA", "iDecay": 0, "vDecay": DECAY_SCALE, "vThMant": 1 << V_TH_MANT_BITS}


class NetxFileError(FxlavaError, ValueError):
    """A netx file fxlava cannot read or run; the message names the file, the layer and the field."""


@dataclass
class NetxLayer:
    """One layer of a netx file as Lava builds it (integers as Lava uses them)."""

    index: int  # its /layer/<index> group
    kind: str  # 'input', 'conv' or 'dense'
    shape: tuple  # output shape, lava-dl order: (C, H, W) or (features,)
    i_decay: int = DECAY_SCALE
    v_decay: int = 0
    v_th_mant: int = 0
    bias: Optional[np.ndarray] = None  # bias mantissa per neuron (lava-dl order), exponent 6
    weight: Optional[np.ndarray] = None  # conv (out, in, kH, kW); dense (out, in): as the synapse uses them
    weight_exp: int = 0  # dense: the synapse's shift of its sums
    delay: Optional[np.ndarray] = None  # dense: per-synapse delays (out, in), or None
    conv: dict = field(default_factory=dict)  # stride, padding, dilation, groups (PyTorch order)
    flatten_before: bool = False  # a netx flatten layer sits between this layer and the previous one


# --- reading ------------------------------------------------------------------------------------


class _Reader:
    """Reads fields of one file with errors that name the file and the field."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, what: str) -> NetxFileError:
        return NetxFileError(f"{self.path}: {where}: {what}")

    def get(self, group: h5py.Group, key: str, where: str, required: bool = True):
        try:
            present = key in group
        except Exception as exc:  # a damaged group's index raises from deep inside h5py
            raise self.fail(where, f"cannot list its fields ({type(exc).__name__}: {exc})") from None
        if not present:
            if required:
                raise self.fail(where, f"missing field '{key}'")
            return None
        try:
            item = group[key]
            return item if isinstance(item, h5py.Group) else item[()]
        except Exception as exc:
            raise self.fail(f"{where}/{key}", f"unreadable ({type(exc).__name__}: {exc})") from None

    def text(self, group, key, where) -> str:
        value = self.get(group, key, where)
        if isinstance(value, np.ndarray):
            if value.size == 0:
                raise self.fail(f"{where}/{key}", "empty")
            value = value.reshape(-1)[0]
        if isinstance(value, bytes):
            return value.decode("ascii", "replace")
        if isinstance(value, str):
            return value
        raise self.fail(f"{where}/{key}", f"expected a string, found {type(value).__name__}")

    def array(self, group, key, where, required=True, ndim=None, integer=False) -> Optional[np.ndarray]:
        value = self.get(group, key, where, required)
        if value is None:
            return None
        if isinstance(value, h5py.Group):
            raise self.fail(f"{where}/{key}", "is a group, expected a dataset")
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise self.fail(f"{where}/{key}", f"expected numbers, found dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise self.fail(f"{where}/{key}", "holds NaN or infinite values")
        if ndim is not None and arr.ndim not in ndim:
            raise self.fail(f"{where}/{key}", f"expected {' or '.join(map(str, ndim))} dimensions, found shape {arr.shape}")
        if integer and arr.dtype.kind == "f" and (arr != np.trunc(arr)).any():
            raise self.fail(f"{where}/{key}", "expected integers")
        return arr

    def integer(self, group, key, where, required=True, default=None) -> Optional[int]:
        arr = self.array(group, key, where, required=required, integer=True)
        if arr is None:
            return default
        if arr.size != 1:
            raise self.fail(f"{where}/{key}", f"expected one number, found shape {arr.shape}")
        return int(arr.reshape(-1)[0])

    def pair(self, group, key, where, default) -> tuple:
        arr = self.array(group, key, where, required=False, ndim=(0, 1), integer=True)
        if arr is None:
            return (default, default)
        if arr.ndim == 0:  # netx's expand(): a scalar means both axes
            return (int(arr), int(arr))
        if arr.size != 2:
            raise self.fail(f"{where}/{key}", f"expected 1 or 2 numbers, found {arr.size}")
        return (int(arr[0]), int(arr[1]))  # stored (H, W) like PyTorch; netx reverses it twice


def _optimize_weight_bits(weight: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """lava.lib.dl.netx.utils.optimize_weight_bits: (weights, num_weight_bits, weight_exponent, sign mode)."""
    max_weight, min_weight = int(weight.max()), int(weight.min())
    if (max_weight > 254 and min_weight < 0) or (min_weight < -256 and max_weight > 0):
        weight = np.clip(weight, -256, 254)
        max_weight, min_weight = int(weight.max()), int(weight.min())
    if max_weight < 0:
        sign_mode, is_signed, scale = 3, 0, -256 / min_weight  # INHIBITORY
    elif min_weight >= 0:
        if max_weight == 0:
            raise ValueError("all weights are zero (netx divides by the largest weight)")
        sign_mode, is_signed, scale = 2, 0, 255 / max_weight  # EXCITATORY
    else:
        sign_mode, is_signed = 1, 1  # MIXED
        scale = min(127 / max_weight if max_weight else math.inf, -128 / min_weight)
    scale_bits = int(np.floor(np.log2(scale))) + is_signed
    if scale_bits < 0:
        raise ValueError(f"weights up to {max(abs(max_weight), abs(min_weight))} do not fit Loihi's 8-bit synapse")
    n = 8
    while n > 0 and np.abs(weight / 2 ** n - np.round(weight / 2 ** n)).sum() != 0:
        n -= 1
    n -= is_signed
    num_weight_bits = 8 - scale_bits - n
    weight = np.left_shift(weight.astype(np.int32), scale_bits).astype(np.int64)
    return weight, num_weight_bits, -scale_bits, sign_mode


def netx_weights(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """The integer weights and weight exponent Lava's fixed_pt Dense synapse uses for a netx dense layer.

    netx's ``optimize_weight_bits``, then Lava's ``clip_weights(num_bits=8)`` and
    ``truncate_weights`` (``lava/utils/weightutils.py``), in that order.
    """
    weight, num_weight_bits, weight_exp, _ = _optimize_weight_bits(weight)
    # netx passes no sign mode to the synapse, so Lava's Dense model determines it again from the
    # shifted weights (determine_sign_mode), which can differ from netx's (all weights <= 0)
    sign_mode = 2 if weight.min() >= 0 else 3 if weight.max() <= 0 else 1
    mixed = int(sign_mode == 1)
    bits = WEIGHT_MANT_BITS
    w = -weight if sign_mode == 3 else weight.copy()
    w = np.clip(w, -(2 ** bits) * mixed, 2 ** bits - 1)
    drop = bits - num_weight_bits + mixed
    w = (w >> drop) << drop
    if sign_mode == 3:
        w = -w
    return w.astype(np.int64), weight_exp


def _neuron(reader: _Reader, group, where: str, required: bool) -> dict:
    neuron = reader.get(group, "neuron", where, required=required)
    if neuron is None:
        return dict(_DEFAULT_NEURON)
    if not isinstance(neuron, h5py.Group):
        raise reader.fail(f"{where}/neuron", "expected a group of neuron parameters")
    nwhere = f"{where}/neuron"
    kind = reader.text(neuron, "type", nwhere)
    if kind not in _NEURON_TYPES:
        raise reader.fail(where, f"{kind} neurons; the executor runs {' and '.join(_NEURON_TYPES)} neurons "
                                 f"(Lava's LIF) only")
    bits = reader.integer(neuron, "messageBits", nwhere, required=False, default=0)
    if bits:
        raise reader.fail(where, f"graded spikes (messageBits={bits}); the executor runs binary spikes only")
    params = {"type": kind}
    for key in ("iDecay", "vDecay", "vThMant"):
        params[key] = reader.integer(neuron, key, nwhere)
    if not 0 <= params["iDecay"] <= DECAY_SCALE or not 0 <= params["vDecay"] <= DECAY_SCALE:
        raise reader.fail(nwhere, f"decays must lie in [0, {DECAY_SCALE}]; found iDecay={params['iDecay']}, vDecay={params['vDecay']}")
    if params["vThMant"] < 0:
        raise reader.fail(f"{nwhere}/vThMant", f"negative threshold {params['vThMant']}")
    return params


def _bias(reader, group, where, shape) -> Optional[np.ndarray]:
    """Lava's bias_mant in lava-dl order: per neuron, per channel, or a scalar (netx AbstractBlock._neuron)."""
    bias = reader.array(group, "bias", where, required=False)
    if bias is None:
        return None
    bias = bias.astype(int)  # netx: copy key, astype(int) truncates
    if len(shape) == 1:
        if bias.size not in (1, shape[0]):
            raise reader.fail(f"{where}/bias", f"{bias.size} values for {shape[0]} neurons")
        return np.broadcast_to(bias.reshape(-1), shape).copy()
    if tuple(bias.shape) == tuple(reversed(shape)):  # per neuron, stored in Lava's (W, H, C) order
        return np.ascontiguousarray(bias.transpose(2, 1, 0))
    if bias.ndim == 1 and bias.shape[0] == shape[0]:  # per channel
        return np.broadcast_to(bias.reshape(-1, 1, 1), shape).copy()
    raise reader.fail(f"{where}/bias", f"shape {bias.shape} cannot be broadcast to neurons of shape {shape}")


def read_netx(path: str | os.PathLike, num_layers: Optional[int] = None) -> tuple[tuple, list[NetxLayer]]:
    """(input shape in lava-dl order, layers) of a netx file; ``num_layers`` as in netx's Network."""
    path = os.fspath(path)
    reader = _Reader(path)
    if not os.path.isfile(path):
        raise NetxFileError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise NetxFileError(f"{path}: not a readable hdf5 file ({type(exc).__name__}: {exc})") from None
    with f:
        root = reader.get(f, "layer", "file")
        if not isinstance(root, h5py.Group):
            raise reader.fail("/layer", "expected a group of layers")
        try:
            names = list(root.keys())
        except Exception as exc:
            raise reader.fail("/layer", f"cannot list its layers ({type(exc).__name__}: {exc})") from None
        count = len(names)
        if num_layers is not None:
            count = min(count, int(num_layers))
        for i in range(count):
            if str(i) not in names:
                raise reader.fail("/layer", f"layers must be numbered 0, 1, ...; /layer/{i} is missing")
        layers: list[NetxLayer] = []
        input_shape: Optional[tuple] = None
        current: Optional[tuple] = None
        flatten_next = False
        for i in range(count):
            where = f"/layer/{i}"
            group = reader.get(root, str(i), "/layer")
            if not isinstance(group, h5py.Group):
                raise reader.fail(where, "expected a group")
            kind = reader.text(group, "type", where)
            if kind == "input":
                if layers or input_shape is not None:
                    raise reader.fail(where, "an input layer after the first layer")
                shape = _shape(reader, group, where)
                input_shape = current = shape
                if reader.get(group, "neuron", where, required=False) is not None:
                    params = _neuron(reader, group, where, required=True)
                    layers.append(_layer(i, "input", shape, params))
            elif kind == "flatten":
                if current is None:
                    raise reader.fail(where, "a flatten layer before any layer with a shape (no input layer)")
                flatten_next = True
            elif kind == "conv":
                if current is None:
                    raise reader.fail(where, "the input shape cannot be inferred: the file has no input layer "
                                             "with a shape before this conv layer")
                layer = _conv(reader, group, where, i, current)
                layers.append(layer)
                current = layer.shape
                flatten_next = False
            elif kind == "dense":
                layer = _dense(reader, group, where, i, current, flatten_next)
                if input_shape is None:
                    input_shape = current = (layer.weight.shape[1],)
                layers.append(layer)
                current = layer.shape
                flatten_next = False
            else:
                raise reader.fail(where, f"a {kind!r} layer; the executor runs input, conv, dense and flatten layers")
        if not any(layer.kind != "input" for layer in layers):
            raise reader.fail("/layer", "no conv or dense layer to run")
        return input_shape, layers


def _shape(reader, group, where) -> tuple:
    shape = reader.array(group, "shape", where, ndim=(1,), integer=True)
    shape = tuple(int(n) for n in shape)
    if not shape or min(shape) < 1:
        raise reader.fail(f"{where}/shape", f"expected positive sizes, found {shape}")
    return shape


def _layer(index, kind, shape, params, **kw) -> NetxLayer:
    return NetxLayer(index=index, kind=kind, shape=tuple(shape), i_decay=params["iDecay"],
                     v_decay=params["vDecay"], v_th_mant=params["vThMant"], **kw)


def _conv(reader, group, where, index, current) -> NetxLayer:
    if len(current) != 3:
        raise reader.fail(where, f"a conv layer receives shape {current}; it needs (C, H, W)")
    shape = _shape(reader, group, where)
    if len(shape) != 3:
        raise reader.fail(f"{where}/shape", f"a conv layer's shape must be (C, H, W), found {shape}")
    params = _neuron(reader, group, where, required=True)
    weight = reader.array(group, "weight", where, ndim=(4, 5))
    if weight.ndim == 5 and weight.shape[4] != 1:
        raise reader.fail(f"{where}/weight", f"expected (out, in, kH, kW[, 1]), found shape {weight.shape}")
    weight = weight.reshape(weight.shape[:4]).astype(np.int64)  # netx: astype(int)
    groups = reader.integer(group, "groups", where, required=False, default=1)
    conv = {"stride": reader.pair(group, "stride", where, 1), "padding": reader.pair(group, "padding", where, 0),
            "dilation": reader.pair(group, "dilation", where, 1), "groups": groups}
    if groups < 1 or current[0] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise reader.fail(f"{where}/weight", f"shape {weight.shape} with groups={groups} does not take "
                                             f"{current[0]} input channels")
    out = _conv_output_shape(current, weight.shape, conv)
    if out != shape:
        raise reader.fail(f"{where}/shape", f"{shape}, but the conv of a {current} input gives {out}")
    if reader.get(group, "delay", where, required=False) is not None:
        raise reader.fail(where, "delays on a conv layer, which netx ignores")
    return _layer(index, "conv", shape, params, weight=weight, conv=conv, bias=_bias(reader, group, where, shape))


def _conv_output_shape(inp, wshape, conv) -> tuple:
    sizes = []
    for axis in (0, 1):
        k = (wshape[2 + axis] - 1) * conv["dilation"][axis] + 1
        sizes.append((inp[1 + axis] + 2 * conv["padding"][axis] - k) // conv["stride"][axis] + 1)
    return (wshape[0], *sizes)


def _dense(reader, group, where, index, current, flatten_next) -> NetxLayer:
    size = int(np.prod(_shape(reader, group, where)))  # netx: (np.prod(shape),)
    params = _neuron(reader, group, where, required=False)
    weight = reader.array(group, "weight", where, ndim=(1, 2)).astype(np.int64)
    if weight.ndim == 1:
        if weight.size % size:
            raise reader.fail(f"{where}/weight", f"{weight.size} values for {size} neurons")
        weight = weight.reshape(size, -1)
    if weight.shape[0] != size:
        raise reader.fail(f"{where}/weight", f"{weight.shape[0]} rows for {size} neurons")
    if current is not None and math.prod(current) != weight.shape[1]:
        raise reader.fail(f"{where}/weight", f"{weight.shape[1]} inputs, but the layer before outputs {current}")
    if current is not None and len(current) != 1 and not flatten_next:
        raise reader.fail(where, f"a dense layer after a layer of shape {current} without a flatten layer between")
    try:
        weight, weight_exp = netx_weights(weight)
    except ValueError as exc:
        raise reader.fail(f"{where}/weight", str(exc)) from None
    delay = reader.array(group, "delay", where, required=False, integer=False)
    if delay is not None:
        delay = _delays(reader, f"{where}/delay", delay, weight.shape)
    shape = (size,)
    return _layer(index, "dense", shape, params, weight=weight, weight_exp=weight_exp, delay=delay,
                  bias=_bias(reader, group, where, shape), flatten_before=bool(flatten_next and current is not None
                                                                                 and len(current) != 1))


def _delays(reader, where, delay, wshape) -> np.ndarray:
    """netx's create_dense: clip to [0, MAX_DELAY], expand per output (axonal) or per input, astype(int)."""
    if delay.max() > MAX_DELAY:
        delay = np.clip(delay, 0, MAX_DELAY)
    if delay.ndim == 0 or delay.size == 1:
        full = np.full(wshape, float(delay.reshape(-1)[0]))
    elif delay.ndim == 1 and delay.size == wshape[0]:
        full = np.repeat(delay.reshape(-1, 1), wshape[1], axis=1)
    elif delay.ndim == 1 and delay.size == wshape[1]:
        full = np.repeat(delay.reshape(1, -1), wshape[0], axis=0)
    elif tuple(delay.shape) == tuple(wshape):
        full = delay
    else:
        raise reader.fail(where, f"shape {delay.shape} does not fit weights of shape {wshape}")
    full = full.astype(int)
    if full.min() < 0:
        raise reader.fail(where, f"negative delay {full.min()}")
    return full


# --- running ------------------------------------------------------------------------------------


def _wrap24(x: torch.Tensor) -> torch.Tensor:
    """lava.proc.conv.utils.signed_clamp(x, 24): wrap to 24-bit signed, in place."""
    return x.add_(_UV_MAX).remainder_(2 * _UV_MAX).sub_(_UV_MAX)


class _Layer(nn.Module):
    """One netx layer: synapse (conv or dense, optionally delayed) and Lava's fixed-point LIF neurons."""

    def __init__(self, spec: NetxLayer):
        super().__init__()
        self.spec = spec
        self.kind = spec.kind
        self.shape = tuple(spec.shape)
        self.keep_u = _DECAY_UNITY - spec.i_decay
        self.keep_v = _DECAY_UNITY - spec.v_decay
        self.v_th = float(spec.v_th_mant << _ACT_SHIFT)
        bias = spec.bias if spec.bias is not None else None
        self.register_buffer("bias", None if bias is None else torch.from_numpy(np.asarray(bias) * float(1 << BIAS_EXP)), persistent=False)
        self.delays: list[int] = []
        self.exact_f32 = True
        self.may_wrap = self.may_wrap_input = False
        # float64 holds every state exactly (products of 24-bit states and 12-bit decays); float32 is
        # enough, and twice as fast, when no decay multiplies a state and no single input or bias can
        # leave 24 bits: sums of two values below 2**23 stay exact, and past the clip's bound the
        # rounding of a larger sum cannot change the clipped value.
        self.state_dtype = torch.float64
        if spec.weight is None:  # an input layer's neurons have no synapse
            self.register_buffer("weight", None, persistent=False)
            return
        w = torch.from_numpy(spec.weight.astype(np.float64))
        # The largest |sum| a synapse can produce: below 2**24 float32 sums of 0/1 spikes are exact.
        bound = w.abs().flatten(1).sum(1).max().item() if w.numel() else 0.0
        self.exact_f32 = bound < _EXACT_F32
        dtype = torch.float32 if self.exact_f32 else torch.float64
        if spec.delay is not None:
            self.delays = sorted(int(d) for d in np.unique(spec.delay))
            masks = torch.stack([torch.from_numpy(spec.delay == d) for d in self.delays])
            self.register_buffer("weight", (w.unsqueeze(0) * masks).to(dtype), persistent=False)
        else:
            self.register_buffer("weight", w.to(dtype), persistent=False)
        self.shift = float(2.0 ** spec.weight_exp)
        self.may_wrap = bound >= _UV_MAX
        # the current can leave 24 bits (and wrap) only if a single step's input can reach 2**23 / 64
        self.may_wrap_input = bound * (1 << _ACT_SHIFT) >= _UV_MAX
        b_max = float(np.abs(spec.bias).max()) * (1 << BIAS_EXP) if spec.bias is not None and spec.bias.size else 0.0
        if (self.keep_u in (0, _DECAY_UNITY) and self.keep_v in (0, _DECAY_UNITY) and not self.may_wrap_input
                and self.exact_f32 and b_max < _UV_MAX):
            self.state_dtype = torch.float32

    def synaptic_input(self, x: torch.Tensor) -> torch.Tensor:
        """[T, N, *in] spikes -> [T, N, *out] integer synaptic input (Lava's a_in), in the layer's state dtype."""
        t, n = x.shape[:2]
        flat = x.reshape(t * n, *x.shape[2:]).to(self.weight.dtype)
        if self.kind == "conv":
            c = self.spec.conv
            a = F.conv2d(flat, self.weight, None, c["stride"], c["padding"], c["dilation"], c["groups"])
            a = a.to(self.state_dtype)
            if self.may_wrap:  # Lava's conv wraps its sums to 24 bits
                a = _wrap24(a)
            return a.reshape(t, n, *a.shape[1:])
        flat = flat.reshape(t * n, -1)
        if not self.delays:
            a = self._shifted(flat @ self.weight.T)
            return a.reshape(t, n, -1)
        out = torch.zeros(t, n, self.weight.shape[1], dtype=self.state_dtype, device=x.device)
        for w, d in zip(self.weight, self.delays):
            if d >= t:
                continue
            a = self._shifted(flat @ w.T).reshape(t, n, -1)
            out[d:] += a[: t - d]
        return out

    def _shifted(self, a: torch.Tensor) -> torch.Tensor:
        a = a.to(self.state_dtype)
        if self.shift != 1.0:
            a = torch.floor(a * self.shift) if self.shift < 1.0 else a * self.shift
        return a

    def run_neurons(self, a: Optional[torch.Tensor], steps: int, drive: Optional[torch.Tensor] = None,
                    record: Optional[dict] = None) -> torch.Tensor:
        """Lava's PyLifResetModelBitAcc over ``steps`` steps from rest; a: [T, N, *] synaptic input or None."""
        ref = a if a is not None else drive
        state_shape = ref.shape[1:]
        device, dtype = ref.device, ref.dtype
        keep_u, keep_v = self.keep_u, self.keep_v
        bias = self.bias
        # Bounds on |u| and |v| decide which of Lava's range rules can act: u wraps past 2**23 and v
        # is clipped to +-(2**23 - 1). Decays and resets only shrink the states.
        a_max = ref.abs().max().item() * (1 << _ACT_SHIFT) if ref.numel() else 0.0
        b_max = bias.abs().max().item() if bias is not None and bias.numel() else 0.0
        u_max = a_max * (steps if keep_u == _DECAY_UNITY else 1) if a is not None else 0.0
        wrap_u = a is not None and (u_max >= _UV_MAX or keep_u not in (0, _DECAY_UNITY) and a_max * steps >= _UV_MAX)
        if wrap_u:
            u_max = float(2 * _UV_MAX)
        clip_v = steps * (u_max + b_max + (a_max if drive is not None else 0.0)) >= _UV_MAX - 1
        u = torch.zeros(state_shape, dtype=dtype, device=device)
        v = torch.zeros_like(u)
        spikes = torch.empty((steps, *state_shape), dtype=torch.float32, device=device)
        fired = torch.empty(state_shape, dtype=torch.bool, device=device)
        if a is not None:
            a = a.mul_(float(1 << _ACT_SHIFT))  # hardware left-shifts synaptic input (MSB alignment)
        for t in range(steps):
            # u = trunc(u (4096 - iDecay) / 4096) + a: exact in float64, truncated toward zero
            if a is None:
                pass
            elif keep_u == 0:
                u = a[t]
            else:
                if keep_u != _DECAY_UNITY:
                    u.mul_(keep_u / _DECAY_UNITY).trunc_()
                u.add_(a[t])
            if wrap_u:  # Lava wraps u (once) when it leaves (-2**23, 2**23]
                u = torch.where(u > _UV_MAX, u - 2 * _UV_MAX, torch.where(u <= -_UV_MAX, u + 2 * _UV_MAX, u))
            if keep_v == 0:
                v.copy_(u)
            else:
                if keep_v != _DECAY_UNITY:
                    v.mul_(keep_v / _DECAY_UNITY).trunc_()
                v.add_(u)
            if bias is not None:
                v.add_(bias)
            if drive is not None:
                v.add_(drive[t], alpha=float(1 << BIAS_EXP))
            if clip_v:
                v.clamp_(-(_UV_MAX - 1), _UV_MAX - 1)
            torch.gt(v, self.v_th, out=fired)
            spikes[t].copy_(fired)
            v.masked_fill_(fired, 0.0)
            if record is not None:  # as Lava's u and v Vars read after the step (v after the reset)
                record.setdefault("u", []).append(u.to(torch.float64, copy=True))
                record.setdefault("v", []).append(v.to(torch.float64, copy=True))
        if record is not None:
            record["u"] = torch.stack(record["u"])
            record["v"] = torch.stack(record["v"])
            record["s"] = spikes
        return spikes


class NetxNetwork(nn.Module):
    """A netx file's fixed-point network: [N, *in, T] -> [N, *out, T] spikes (lava-dl layout), Lava-exact."""

    def __init__(self, input_shape: tuple, layers: list[NetxLayer], path: str = ""):
        super().__init__()
        self.path = path
        self.input_shape = tuple(input_shape)
        self.layers = nn.ModuleList(_Layer(spec) for spec in layers)
        self.has_input_neurons = layers[0].kind == "input"
        self.output_shape = tuple(layers[-1].shape)

    @property
    def latency(self) -> int:
        """Steps by which Lava's raw output lags this module's output (one per layer, as run_lava removes)."""
        return len(self.layers)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x):
            x = torch.as_tensor(np.asarray(x))
        if x.dim() < 3:
            raise ValueError(f"x must be [N, *, T] in lava-dl layout (batch first, time last), got shape {tuple(x.shape)}")
        sample = tuple(x.shape[1:-1])
        if sample != self.input_shape:
            if len(self.input_shape) == 1 and math.prod(sample) == self.input_shape[0] or (
                    not self.has_input_neurons and self.layers[0].kind == "dense"
                    and math.prod(sample) == math.prod(self.input_shape)):
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            else:
                raise ValueError(f"x has per-sample shape {sample} but {self.path or 'the network'} expects "
                                 f"{self.input_shape} (lava-dl order, C, H, W)")
        if self.has_input_neurons:
            if x.is_floating_point() and bool((x != torch.trunc(x)).any()):
                raise ValueError("x drives the input layer's neurons as bias mantissas and must hold integers")
        elif not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("x must hold binary spikes (0 or 1)")
        return x

    def forward(self, x: torch.Tensor, record: bool = False):
        """Output spikes [N, *out, T]; with ``record=True`` also a list of per-layer dicts of u, v, s ([N, *, T])."""
        x = self._check_input(x)
        steps = x.shape[-1]
        device = self.layers[-1].weight.device if self.layers[-1].weight is not None else x.device
        s = x.to(device).movedim(-1, 0)  # time first: each step is one contiguous slab
        trace = [] if record else None
        with torch.no_grad():
            for layer in self.layers:
                rec = {} if record else None
                if layer.kind == "input":
                    s = layer.run_neurons(None, steps, drive=s.to(torch.float64), record=rec)
                else:
                    a = layer.synaptic_input(s)
                    s = layer.run_neurons(a, steps, record=rec)
                    del a
                if record:
                    trace.append({k: v.movedim(0, -1) for k, v in rec.items()})
        out = s.movedim(0, -1)
        return (out, trace) if record else out

    def extra_repr(self) -> str:
        return f"path={self.path!r}, input_shape={self.input_shape}, layers={[l.kind for l in self.layers]}"


def load_netx(path: str | os.PathLike, num_layers: Optional[int] = None) -> NetxNetwork:
    """A netx file as an nn.Module running Lava's fixed-point dynamics on [N, *, T] batches (CPU or GPU)."""
    input_shape, layers = read_netx(path, num_layers=num_layers)
    return NetxNetwork(input_shape, layers, path=os.fspath(path))
