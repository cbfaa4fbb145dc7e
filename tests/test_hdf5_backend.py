"""export_hdf5 writes from the compiled graph: lava-dl's layout, integer weights, no forward pass."""
import os
import time

import h5py
import numpy as np
import pytest
import torch

import fxlava
from fxlava.backends import hdf5
from fxlava.backends.hdf5 import write_netx
from fxlava.examples.mnist_csnn import MNISTNet


def spikes(shape, seed, rate=0.3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


@pytest.fixture(scope="module")
def csnn():
    model = MNISTNet(channels=8)
    torch.manual_seed(0)
    return fxlava.compile(model, spikes((4, 2, 1, 28, 28), seed=0))


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_same_fields_and_values_as_lava_dls_own_export(csnn, tmp_path):
    """Every field slayer's export_hdf5 writes, with the same value; only the weights' dtype differs."""
    ours = _datasets(csnn.export_hdf5(tmp_path / "ours.net"))
    theirs_path = tmp_path / "slayer.net"
    write_netx(csnn.lava_dl, theirs_path, csnn.input_shape)
    theirs = _datasets(theirs_path)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert np.array_equal(np.asarray(ours[name]), np.asarray(value)), name
        if name.endswith("/weight"):  # int8 where the mantissas fit, else int16 (only lava-dl's grid needs it)
            fits = value.min() >= -128 and value.max() <= 127
            assert ours[name].dtype == (np.int8 if fits else np.int16) and value.dtype == np.float32
        else:
            assert np.asarray(ours[name]).dtype == np.asarray(value).dtype, name


def test_lava_dl_is_built_without_a_forward_pass(monkeypatch):
    from lava.lib.dl import slayer

    def no_forward(self, *args):
        raise AssertionError("a slayer forward pass ran")

    model = MNISTNet(channels=4)
    net = fxlava.compile(model, spikes((4, 2, 1, 28, 28), seed=0))
    monkeypatch.setattr(slayer.neuron.cuba.Neuron, "forward", no_forward)
    seq = net.lava_dl
    monkeypatch.undo()
    assert [tuple(b.neuron.shape) for b in seq if hasattr(b, "neuron")] == [
        (4, 28, 28), (4, 14, 14), (4, 14, 14), (4, 7, 7), (128,), (10,)]
    x = fxlava.TNX_to_NXT(spikes((6, 3, 1, 28, 28), seed=1))
    assert torch.equal(seq(x), fxlava.TNX_to_NXT(net(fxlava.NXT_to_TNX(x))))


def test_weights_take_one_byte_each(tmp_path):
    # without co-scaling these weights' mantissas fit an int8 (test_co_scaled_weights_take_one_byte_each
    # has co-scaling on)
    csnn = fxlava.compile(MNISTNet(channels=8), spikes((4, 2, 1, 28, 28), seed=0), coscale=False)
    path = csnn.export_hdf5(tmp_path / "net.net")
    weights = 0
    with h5py.File(path, "r") as f:
        for i in f["layer"]:
            if "weight" in f["layer"][i]:
                ds = f["layer"][i]["weight"]
                assert ds.dtype == np.int8
                assert ds.id.get_storage_size() == ds.size
                weights += ds.size
    assert weights == sum(b.synapse.weight.numel() for b in csnn.blocks if hasattr(b, "synapse"))
    # besides the weights, hdf5's own metadata: under 8 KB per layer (groups, small datasets)
    assert os.path.getsize(path) <= weights + 8 * 1024 * 8


def test_co_scaled_weights_take_one_byte_each(tmp_path):
    # co-scaling fills each layer's weight range; on the 1/64 grid the mantissas still fit an int8
    csnn = fxlava.compile(MNISTNet(channels=8), spikes((4, 2, 1, 28, 28), seed=0))
    path = csnn.export_hdf5(tmp_path / "net.net")
    with h5py.File(path, "r") as f:
        written = [f["layer"][i]["weight"] for i in sorted(f["layer"], key=int) if "weight" in f["layer"][i]]
        assert all(ds.dtype == np.int8 and ds.id.get_storage_size() == ds.size for ds in written)
        mants = np.concatenate([ds[()].ravel() for ds in written])
    # the range is used: both ends within reach, and odd mantissas, which lava-dl's 2/64 grid lacks
    assert mants.min() < -100 and mants.max() > 100 and (mants % 2 != 0).any()
    assert all(b.scale != 1.0 for b in csnn.blocks if getattr(b, "kind", "") in ("conv", "dense"))


def test_a_mantissa_that_needs_int16_is_written_exactly(tmp_path):
    model = MNISTNet(channels=4)
    with torch.no_grad():
        model.conv_fc[0].weight[0, 0, 0, 0] = -4.2  # clipped to -4.0: mantissa -256
        model.conv_fc[0].weight[1, 0, 0, 0] = 1.99  # 128: no longer an int8 either
    x = spikes((4, 2, 1, 28, 28), seed=0)
    net = fxlava.compile(model, x, coscale=False)  # co-scaling would scale the layer to fit the grid
    path = net.export_hdf5(tmp_path / "net.net")
    with h5py.File(path, "r") as f:
        w = f["layer/1/weight"][()]
        assert w.dtype == np.int16 and w.min() == -256 and w.max() == 128
        assert f["layer/2/weight"].dtype == np.int8
    xin = fxlava.TNX_to_NXT(spikes((8, 3, 1, 28, 28), seed=2, rate=0.5))
    assert torch.equal(fxlava.load_netx(path)(xin), net.lava_dl(xin))


@pytest.mark.parametrize("coscale", [True, False])
def test_layers_written_in_slices_make_the_same_file(tmp_path, monkeypatch, coscale):
    """A large layer is computed and written in slices of rows; the file is byte for byte the one-write file.

    Shrinking the slice makes every layer of a small network take that path: int8 (co-scaled) and
    int16 mantissas (lava-dl's grid, a weight beyond int8)."""
    model = MNISTNet(channels=4)
    with torch.no_grad():
        model.conv_fc[0].weight[1, 0, 0, 0] = 3.5  # mantissa 224 without co-scaling: int16
    net = fxlava.compile(model, spikes((4, 2, 1, 28, 28), seed=0), coscale=coscale)
    whole = net.export_hdf5(tmp_path / "whole.net")
    computed = []
    real = hdf5._mantissas

    def counted(weight, *args):
        computed.append(weight.shape[0])
        return real(weight, *args)

    monkeypatch.setattr(hdf5, "SLICE", 50)
    monkeypatch.setattr(hdf5, "_mantissas", counted)
    sliced = net.export_hdf5(tmp_path / "sliced.net")
    synapses = [b for b in net.blocks if hasattr(b, "synapse")]
    assert len(computed) > 2 * len(synapses)  # slices, not layers
    with open(whole, "rb") as a, open(sliced, "rb") as b:
        assert a.read() == b.read()
    with h5py.File(sliced, "r") as f:
        assert (f["layer/1/weight"].dtype == np.int16) != coscale


@pytest.mark.parametrize("slice_size", [50, hdf5.SLICE])
def test_an_all_zero_dense_layer_is_refused_at_export_and_nothing_is_written(tmp_path, monkeypatch, slice_size):
    net = fxlava.compile(MNISTNet(channels=4), spikes((4, 2, 1, 28, 28), seed=0))
    with torch.no_grad():
        net.blocks[-1].synapse.weight.zero_()  # after compile: co-scaling refuses such a layer
    monkeypatch.setattr(hdf5, "SLICE", slice_size)
    with pytest.raises(ValueError, match=r"netx /layer/\d+\) is a dense layer whose \d+ weights are all zero"):
        net.export_hdf5(tmp_path / "zero.net")
    assert list(tmp_path.iterdir()) == []


def test_compressed_file_is_smaller_and_netx_reads_it_alike(csnn, tmp_path):
    from lava.lib.dl import netx

    plain = csnn.export_hdf5(tmp_path / "plain.net")
    packed = csnn.export_hdf5(tmp_path / "packed.net", compress=True)
    # gzip gains where mantissas repeat: without co-scaling, untrained weights are mostly small ones;
    # co-scaled int8 mantissas fill their range and barely compress
    few = fxlava.compile(MNISTNet(channels=8), spikes((4, 2, 1, 28, 28), seed=0), coscale=False)
    assert (os.path.getsize(few.export_hdf5(tmp_path / "few_packed.net", compress=True))
            < os.path.getsize(few.export_hdf5(tmp_path / "few_plain.net")))
    a, b = _datasets(plain), _datasets(packed)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    net = netx.hdf5.Network(net_config=packed)
    try:
        assert len(net.layers) == 6
    finally:
        net.net_config.f.close()
    xin = fxlava.TNX_to_NXT(spikes((5, 3, 1, 28, 28), seed=3))
    assert torch.equal(fxlava.load_netx(packed)(xin), csnn.lava_dl(xin))


def test_export_is_byte_identical_twice(csnn, tmp_path):
    first = csnn.export_hdf5(tmp_path / "first.net")
    time.sleep(1.1)  # HDF5 timestamps have one-second resolution
    second = csnn.export_hdf5(tmp_path / "second.net")
    with open(first, "rb") as f1, open(second, "rb") as f2:
        assert f1.read() == f2.read()


def test_failed_export_leaves_no_file_and_keeps_the_old_one(csnn, tmp_path, monkeypatch):
    calls = []

    def fails_on_the_third_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full half-way")
        return real(*args, **kwargs)

    real = hdf5._mantissas  # computes each layer's (or slice's) mantissas while the file is written
    monkeypatch.setattr(hdf5, "_mantissas", fails_on_the_third_layer)
    kept = tmp_path / "kept.net"
    kept.write_bytes(b"the previous network")
    with pytest.raises(RuntimeError, match="half-way"):
        csnn.export_hdf5(kept)
    assert kept.read_bytes() == b"the previous network"
    assert os.listdir(tmp_path) == ["kept.net"]


def test_block_bias_is_written_as_netx_bias_mantissas(tmp_path):
    """A block whose synapse has a per-channel ``bias`` (real units on the 1/64 grid) gets netx's layer ``bias``."""
    model = MNISTNet(channels=4)
    net = fxlava.compile(model, spikes((4, 2, 1, 28, 28), seed=0), coscale=False)
    block = net.blocks[0]
    block.synapse.bias = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0 / 64, 0.0]))
    path = net.export_hdf5(tmp_path / "net.net")
    with h5py.File(path, "r") as f:
        assert f["layer/1/bias"][()].tolist() == [32, -16, 1, 0]
        assert "bias" not in f["layer/2"]
