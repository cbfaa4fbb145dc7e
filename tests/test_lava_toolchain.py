"""The toolchain below fxlava's compiler: slayer blocks -> write_netx -> netx -> Lava, spike for spike."""
import os
import time

import h5py
import pytest
import torch

import fxlava  # noqa: F401  (must precede lava imports: it makes Lava importable on Python 3.11)
from fxlava.backends.hdf5 import write_netx
from lava.lib.dl import netx, slayer

T = 16
NEURON = {"threshold": 1.0, "current_decay": 0.5, "voltage_decay": 0.1}
# Not square and with two channels, so a swapped H/W or a C-last flatten cannot go unnoticed.
CONV_INPUT = (2, 8, 6)


def _seeded_weights(net: torch.nn.Sequential, seed: int) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in net:
            if hasattr(block, "synapse"):
                block.synapse.weight.copy_(torch.randn(block.synapse.weight.shape, generator=gen))
    return net.eval()


def conv_net() -> torch.nn.Sequential:
    """Conv(2->4, 3x3, stride 2) -> Flatten -> Dense(48->10), no bias, delay_shift=False as SJ's lava_exchange."""
    net = torch.nn.Sequential(
        slayer.block.cuba.Conv(NEURON, 2, 4, 3, padding=1, stride=2, delay_shift=False),
        slayer.block.cuba.Flatten(),
        slayer.block.cuba.Dense(NEURON, 4 * 4 * 3, 10, delay_shift=False),
    )
    return _seeded_weights(net, seed=0)


def dense_net() -> torch.nn.Sequential:
    """Flatten -> Dense(24->16) -> Dense(16->12) -> Dense(12->6): three netx layers, flattened input."""
    net = torch.nn.Sequential(
        slayer.block.cuba.Flatten(),
        slayer.block.cuba.Dense(NEURON, 24, 16, delay_shift=False),
        slayer.block.cuba.Dense(NEURON, 16, 12, delay_shift=False),
        slayer.block.cuba.Dense(NEURON, 12, 6, delay_shift=False),
    )
    return _seeded_weights(net, seed=1)


def spikes(shape, seed: int, rate: float = 0.3) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def forward(net: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output; the forward pass also gives the blocks their neuron shapes."""
    outputs = []
    with torch.no_grad():
        for block in net:
            x = block(x)
            outputs.append(x)
    return outputs


def written(net, tmp_path, input_shape, name="net.net") -> str:
    example = spikes((1, *input_shape, T), seed=99)
    forward(net, example)
    path = str(tmp_path / name)
    write_netx(net, path, input_shape)
    return path


# ---------------------------------------------------------------- end to end in Lava


@pytest.mark.lava
def test_conv_flatten_dense_matches_lava_dl_spike_for_spike(tmp_path):
    from fxlava.lava_runner import lava_latency, run_lava

    net = conv_net()
    x = spikes((3, *CONV_INPUT, T), seed=5)
    hidden, _, expected = forward(net, x)
    # Every layer must really fire, or equality below would prove little.
    assert 0.1 < hidden.mean().item() < 0.9
    assert expected.sum().item() >= 50 and expected.mean().item() < 0.9
    assert all(expected[i].sum() > 0 for i in range(len(x)))

    path = str(tmp_path / "conv.net")
    write_netx(net, path, CONV_INPUT)

    loaded = netx.hdf5.Network(net_config=path)  # no input_shape: taken from /layer/0
    assert [type(layer).__name__ for layer in loaded.layers] == ["Conv", "Dense"]
    assert tuple(loaded.inp.shape) == tuple(reversed(CONV_INPUT))  # netx ports are (W, H, C)
    assert tuple(loaded.out.shape) == (10,)
    assert lava_latency(path) == 2

    out = run_lava(path, x)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out, expected)
    # Several samples per Lava input buffer, reloaded between them, must give the same spikes.
    assert torch.equal(run_lava(path, x.numpy(), samples_per_load=2), expected)


@pytest.mark.lava
def test_three_dense_layers_from_flattened_input_match_lava_dl(tmp_path):
    from fxlava.lava_runner import lava_latency, run_lava

    net = dense_net()
    x = spikes((2, 2, 3, 4, T), seed=7, rate=0.4)
    outputs = forward(net, x)
    assert all(o.sum().item() >= 20 for o in outputs[1:])

    path = written(net, tmp_path, (2, 3, 4))
    assert lava_latency(path) == 3  # one step per netx layer; the input and flatten layers add none
    assert torch.equal(run_lava(path, x, progress=True), outputs[-1])


@pytest.mark.lava
def test_run_lava_refuses_non_binary_input_and_wrong_shapes(tmp_path):
    from fxlava.lava_runner import run_lava

    net = conv_net()
    path = written(net, tmp_path, CONV_INPUT)
    with pytest.raises(ValueError, match="binary"):
        run_lava(path, 2 * spikes((1, *CONV_INPUT, T), seed=1))
    with pytest.raises(ValueError, match=r"expects \(2, 8, 6\)"):
        run_lava(path, spikes((1, 2, 6, 8, T), seed=1))


@pytest.mark.lava
def test_lava_workers_are_stopped_when_a_run_fails(tmp_path, monkeypatch):
    import multiprocessing

    import fxlava.lava_runner as lava_runner
    from tests.processes import LavaBar, forks_of_this_process

    counted = multiprocessing.Value("i", -1)  # written by the process that runs Lava

    def count_and_fail():
        counted.value = len(multiprocessing.active_children())
        raise RuntimeError("interrupted after the first sample")

    class FailingBar(LavaBar):
        on_update = staticmethod(count_and_fail)

    monkeypatch.setattr(lava_runner, "tqdm", FailingBar)
    path = written(conv_net(), tmp_path, CONV_INPUT)
    before = forks_of_this_process()
    with pytest.raises(fxlava.LavaRunError, match="interrupted after the first sample") as err:
        lava_runner.run_lava(path, spikes((2, *CONV_INPUT, T), seed=2))
    assert err.value.path == path
    assert counted.value > 0  # Lava had forked workers ...
    assert forks_of_this_process() - before == set()  # ... and none is left


# ---------------------------------------------------------------- write_netx


def test_same_network_written_twice_is_byte_identical(tmp_path):
    net = conv_net()
    first = written(net, tmp_path, CONV_INPUT, "first.net")
    # HDF5 object timestamps have one-second resolution: a clock tick between the writes would show.
    time.sleep(1.1)
    second = written(net, tmp_path, CONV_INPUT, "second.net")
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()


def test_written_file_has_a_shape_only_input_layer_then_the_blocks(tmp_path):
    path = written(conv_net(), tmp_path, CONV_INPUT)
    with h5py.File(path, "r") as f:
        assert sorted(f["layer"].keys()) == ["0", "1", "2", "3"]
        assert set(f["layer/0"].keys()) == {"type", "shape"}
        assert f["layer/0/type"][0] == b"input"
        assert tuple(f["layer/0/shape"][()]) == CONV_INPUT
        assert [f[f"layer/{i}/type"][0] for i in (1, 2, 3)] == [b"conv", b"flatten", b"dense"]
    assert os.listdir(tmp_path) == ["net.net"]


def test_written_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = written(conv_net(), tmp_path, CONV_INPUT)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


class _ExportFails(slayer.block.cuba.Dense):
    def export_hdf5(self, handle):
        handle.create_dataset("type", (1,), "S10", [b"dense"])
        raise RuntimeError("export broke half-way")


def _pool_net():
    return torch.nn.Sequential(
        slayer.block.cuba.Conv(NEURON, 2, 4, 3, padding=1, delay_shift=False),
        slayer.block.cuba.Pool(NEURON, 2, delay_shift=False),
        slayer.block.cuba.Flatten(),
        slayer.block.cuba.Dense(NEURON, 4 * 4 * 3, 10, delay_shift=False),
    )


def _export_fails_net():
    return torch.nn.Sequential(
        slayer.block.cuba.Flatten(), _ExportFails(NEURON, 96, 10, delay_shift=False)
    )


def _dense_without_flatten():
    conv, dense = conv_net()[0], conv_net()[2]
    forward(torch.nn.Sequential(conv), spikes((1, *CONV_INPUT, T), seed=3))
    forward(torch.nn.Sequential(dense), spikes((1, 48, T), seed=3))
    return torch.nn.Sequential(conv, dense)


def _forwarded_conv_net():
    net = conv_net()
    forward(net, spikes((1, *CONV_INPUT, T), seed=3))
    return net


FAILING_WRITES = {
    "export raises": (_export_fails_net, CONV_INPUT, True, RuntimeError, "half-way"),
    "pool": (_pool_net, CONV_INPUT, True, ValueError, r"'pool' layer, which lava-dl netx cannot load"),
    "no forward pass": (conv_net, CONV_INPUT, False, ValueError, "forward pass"),
    "wrong input shape": (_forwarded_conv_net, (3, 8, 6), False, ValueError, "2 input channels but receives shape"),
    "dense without flatten": (_dense_without_flatten, CONV_INPUT, False, ValueError, "put a Flatten block before it"),
    "ends in flatten": (lambda: conv_net()[:2], CONV_INPUT, True, ValueError, "ends in a flatten"),
    "not a slayer block": (lambda: torch.nn.Sequential(torch.nn.ReLU()), (4,), False, ValueError, "export_hdf5"),
}


@pytest.mark.parametrize("case", list(FAILING_WRITES))
def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, case):
    make, input_shape, run_forward, error, match = FAILING_WRITES[case]
    net = make()
    if run_forward:
        forward(net, spikes((1, *input_shape, T), seed=3))
    fresh = tmp_path / "fresh.net"
    with pytest.raises(error, match=match):
        write_netx(net, fresh, input_shape)
    assert os.listdir(tmp_path) == []

    kept = tmp_path / "kept.net"
    kept.write_bytes(b"the previous network")
    with pytest.raises(error, match=match):
        write_netx(net, kept, input_shape)
    assert kept.read_bytes() == b"the previous network"
    assert os.listdir(tmp_path) == ["kept.net"]


def test_an_all_zero_dense_layer_is_refused_and_nothing_is_written(tmp_path):
    net = conv_net()
    with torch.no_grad():
        net[2].synapse.weight.zero_()
    with pytest.raises(ValueError, match=r"netx /layer/3\) is a dense layer whose 480 weights are all zero"):
        written(net, tmp_path, CONV_INPUT)
    assert list(tmp_path.iterdir()) == []
