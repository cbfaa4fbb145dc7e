"""fxlava.load_netx: a netx file's fixed-point dynamics in PyTorch, against Lava, lava-dl and Loihi's traces."""
import os
import shutil
import sysconfig

import h5py
import numpy as np
import pytest
import torch

import fxlava
from fxlava.netx_executor import NetxFileError, load_netx, netx_weights
from tests.zoo import NAMES, load

# lava-dl's wheel ships its netx test networks (and Loihi's reference traces) in site-packages
NETX_TESTS = os.path.join(sysconfig.get_paths()["purelib"], "tests", "lava", "lib", "dl", "netx")
GTS = os.path.join(NETX_TESTS, "gts")


def spikes(shape, seed, rate=0.3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def lava_dl_copy(src, dst, keep=None):
    """A copy of a lava-dl test network that Lava's CPU simulator can run: the input layer keeps only
    its shape (Lava has no CPU model for an input layer with a neuron), and layers after ``keep`` go."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        first = f["layer/0"]
        for key in [k for k in first.keys() if k not in ("type", "shape")]:
            del first[key]
        if keep is not None:
            for key in [k for k in f["layer"].keys() if int(k) > keep]:
                del f["layer"][key]
    return str(dst)


# ---------------------------------------------------------------- fxlava's own files


@pytest.mark.parametrize("name", NAMES)
def test_executor_equals_lava_dl_on_every_zoo_model(name, tmp_path):
    z = load(name)
    torch.manual_seed(0)
    model, x = z.build(), z.example_input()
    try:
        net = fxlava.compile(model, x)
    except fxlava.UnsupportedModelError:
        pytest.skip(f"{name} is a refusal case")
    path = net.export_hdf5(tmp_path / "net.net")
    xin = fxlava.TNX_to_NXT(spikes((x.shape[0], 5, *x.shape[2:]), seed=1, rate=0.4))
    with torch.no_grad():
        expected = net.lava_dl(xin)
    got = load_netx(path)(xin)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.lava
def test_executor_equals_lava_on_the_demo_network(tmp_path):
    from fxlava.examples.mnist_csnn import MNISTNet

    model = MNISTNet(channels=16)
    model.load_state_dict(torch.load(os.path.join(os.path.dirname(fxlava.__file__), "examples",
                                                  "mnist_csnn_trained.pt"), weights_only=True))
    x = spikes((8, 3, 1, 28, 28), seed=2)
    net = fxlava.compile(model, x)
    path = net.export_hdf5(tmp_path / "demo.net")
    xin = fxlava.TNX_to_NXT(x)
    got = load_netx(path)(xin)
    assert got.sum() > 0
    assert torch.equal(got, fxlava.run_lava(path, xin))


# ---------------------------------------------------------------- lava-dl's own netx test networks


@pytest.mark.lava
@pytest.mark.parametrize("name, keep, shape", [("mnist.net", 2, (784,)), ("tiny.net", None, (3, 16, 16))])
def test_executor_equals_lava_on_lava_dl_test_networks(name, keep, shape, tmp_path):
    # mnist.net: CUBA with voltage decay; its last layer has no neuron and never fires, so the copy
    # ends after layer 2. tiny.net: LOIHI neurons, per-channel bias, stride-2 convs.
    path = lava_dl_copy(os.path.join(NETX_TESTS, name), tmp_path / name, keep)
    x = spikes((3, *shape, 16), seed=3)
    got = load_netx(path)(x)
    assert got.sum() > 0
    assert torch.equal(got, fxlava.run_lava(path, x))


@pytest.mark.lava
@pytest.mark.slow
def test_executor_equals_lava_on_pilotnet_lif(tmp_path):
    # pilotnet is silent at T 8 after all its layers; cut after layer 8 every layer is exercised
    path = lava_dl_copy(os.path.join(GTS, "pilotnet_lif", "network.net"), tmp_path / "pilot.net", keep=8)
    x = spikes((2, 3, 66, 200, 8), seed=4)
    got = load_netx(path)(x)
    assert got.sum() > 0
    assert torch.equal(got, fxlava.run_lava(path, x))


def test_full_mnist_net_runs_its_input_neurons_and_the_silent_last_layer():
    net = load_netx(os.path.join(NETX_TESTS, "mnist.net"))
    assert [layer.kind for layer in net.layers] == ["input", "dense", "dense", "dense"]
    x = torch.randint(0, 80, (2, 784, 16)).float()  # the input neurons' bias mantissa at each step
    out, trace = net(x, record=True)
    assert trace[0]["s"].sum() > 0 and trace[2]["s"].sum() > 0
    # netx gives a dense layer without a neuron group a threshold of 1 << 17: above Lava's voltage clip
    assert out.shape == (2, 10, 16) and out.sum() == 0


def test_pilotnet_lif_matches_loihi_reference_traces_layer_by_layer():
    """lava-dl's gts/pilotnet_lif: Loihi's spikes, currents and voltages of all 9 layers for one image.

    The image drives the input layer's neurons as bias (as netx's Input block expects). The traces
    were recorded with the network reset every 16 steps and one step of latency per layer, so
    layer k's first 16 steps from rest are the reference's steps k .. k + 15. Loihi reports the
    voltage of a neuron that just fired as 128; Lava (and the executor) as 0 after the reset.
    """
    root = os.path.join(GTS, "pilotnet_lif")
    net = load_netx(os.path.join(root, "network.net"))
    image = np.load(os.path.join(root, "image.npy"))  # (W, H, C)
    steps = 16
    x = torch.from_numpy(image.transpose(2, 1, 0).astype(np.float64))[None, ..., None].repeat(1, 1, 1, 1, steps)
    _, trace = net(x, record=True)
    # fc-3's files (float64, 25 steps, a reset at step 8) come from another recording: its input
    # spikes (fc-2's, matched below) arrive at other steps; it is not compared.
    names = ["input"] + [f"conv-{i}" for i in range(5)] + [f"fc-{i}" for i in range(3)]
    assert len(trace) == len(names) + 1
    for k, name in enumerate(names):
        ref_s = np.load(os.path.join(root, "input-s.npy" if name == "input" else f"{name}.npy"))
        ref_s = ref_s.astype(bool)[..., k:k + steps]
        s, u, v = (trace[k][q][0].numpy() for q in "suv")
        if s.ndim == 4:  # (C, H, W, T) -> Lava's (W, H, C, T)
            s, u, v = (a.transpose(2, 1, 0, 3) for a in (s, u, v))
        assert ref_s.shape == s.shape, name
        assert ref_s.sum() > 0, name
        assert np.array_equal(s.astype(bool), ref_s), name
        if name != "input":
            ref_u = np.load(os.path.join(root, f"{name}-u.npy"))[..., k:k + steps]
            ref_v = np.load(os.path.join(root, f"{name}-v.npy"))[..., k:k + steps]
            assert np.array_equal(u, ref_u), name
            assert np.array_equal(v[~ref_s], ref_v[~ref_s]), name
            assert (ref_v[ref_s] == 128).all() and (v[ref_s] == 0).all(), name


def test_ntidigits_axonal_delays_match_the_reference_output():
    """lava-dl's gts/ntidigits (dense layers with per-neuron axonal delays) against its recorded output.

    The reference is Lava's raw output: the source adds one step and each of the three layers one.
    """
    root = os.path.join(GTS, "ntidigits")
    net = load_netx(os.path.join(root, "ntidigits.net"), num_layers=5)  # layer 5 is an 'average' layer
    assert net.layers[0].delays and max(net.layers[0].delays) > 0
    steps = 1000  # causal: a prefix of the input gives a prefix of the output
    x = torch.from_numpy(np.load(os.path.join(root, "input.npy"))[:, :steps]).float()[None]
    reference = torch.from_numpy(np.load(os.path.join(root, "output.npy"))).float()
    got = net(x)[0]
    shift = net.latency + 1
    assert got.sum() > 1000
    assert torch.equal(got[:, : steps], reference[:, shift:steps + shift])


@pytest.mark.lava
@pytest.mark.slow
def test_ntidigits_executor_equals_lava_with_delays():
    root = os.path.join(GTS, "ntidigits")
    x = torch.from_numpy(np.load(os.path.join(root, "input.npy"))[:, :150]).float()
    x = torch.stack([x, x.roll(7, dims=-1)])  # two samples: in-flight delays must not leak between them
    got = load_netx(os.path.join(root, "ntidigits.net"), num_layers=5)(x)
    assert got.sum() > 0
    assert torch.equal(got, fxlava.run_lava(os.path.join(root, "ntidigits.net"), x, num_layers=5))


# ---------------------------------------------------------------- Lava's weight arithmetic


def _lava_weights(weight):
    from lava.lib.dl.netx.utils import optimize_weight_bits
    from lava.utils.weightutils import clip_weights, determine_sign_mode, truncate_weights

    w, bits, exp, _ = optimize_weight_bits(weight.copy())
    sign = determine_sign_mode(w)
    w = truncate_weights(clip_weights(w, sign, num_bits=8), sign, bits)
    return w, exp


@pytest.mark.parametrize("low, high, step", [(-256, 255, 2), (-20, 30, 1), (0, 100, 4), (-96, 0, 8),
                                             (-256, 300, 2), (-1, 1, 1), (4, 64, 4)])
def test_dense_weights_and_exponent_equal_netx_and_lava(low, high, step):
    gen = np.random.default_rng(abs(low) + high + step)
    weight = gen.integers(low // step, high // step, size=(7, 9), endpoint=True) * step
    weight[0, 0], weight[-1, -1] = low - low % step, high - high % step
    expected_w, expected_exp = _lava_weights(weight)
    w, exp = netx_weights(weight)
    assert exp == expected_exp
    assert np.array_equal(w, expected_w)
    x = gen.integers(0, 2, size=(9, 5))
    # what the synapse sends: its sums shifted by the exponent (a right shift floors)
    assert np.array_equal(np.right_shift(w @ x, -exp), np.right_shift(expected_w @ x, -expected_exp))


# ---------------------------------------------------------------- refusals and damaged files


def test_refuses_a_layer_type_naming_layer_and_type():
    with pytest.raises(NetxFileError, match=r"ntidigits.net: /layer/5: a 'average' layer"):
        load_netx(os.path.join(GTS, "ntidigits", "ntidigits.net"))


def test_refuses_sigma_delta_neurons_naming_layer_and_type():
    with pytest.raises(NetxFileError, match=r"network.net: /layer/0: SDNN neurons"):
        load_netx(os.path.join(GTS, "pilotnet_sdnn", "network.net"))


def _damage(tmp_path, how):
    path = lava_dl_copy(os.path.join(NETX_TESTS, "tiny.net"), tmp_path / "tiny.net")
    if how == "truncated":
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "not hdf5":
        with open(path, "wb") as f:
            f.write(b"not an hdf5 file at all" * 10)
    elif how == "empty":
        open(path, "wb").close()
    else:
        with h5py.File(path, "r+") as f:
            if how == "no weight":
                del f["layer/2/weight"]
            elif how == "no layers":
                del f["layer"]
            elif how == "bad shape":
                del f["layer/1/shape"]
                f["layer/1/shape"] = np.array([24, 7, 6])
            elif how == "string weight":
                del f["layer/1/weight"]
                f["layer/1/weight"] = np.array([b"x"])
            elif how == "nan bias":
                del f["layer/1/bias"]
                f["layer/1/bias"] = np.full(24, np.nan)
            elif how == "gap":
                f.move("layer/2", "layer/5")
            elif how == "no type":
                del f["layer/1/type"]
    return path


DAMAGE = {
    "truncated": r"tiny.net: not a readable hdf5 file",
    "not hdf5": r"tiny.net: not a readable hdf5 file",
    "empty": r"tiny.net: not a readable hdf5 file",
    "no weight": r"tiny.net: /layer/2: missing field 'weight'",
    "no layers": r"tiny.net: file: missing field 'layer'",
    "bad shape": r"tiny.net: /layer/1/shape: \(24, 7, 6\), but the conv of a \(3, 16, 16\) input gives \(24, 6, 6\)",
    "string weight": r"tiny.net: /layer/1/weight: expected numbers",
    "nan bias": r"tiny.net: /layer/1/bias: holds NaN",
    "gap": r"tiny.net: /layer: layers must be numbered 0, 1, ...; /layer/2 is missing",
    "no type": r"tiny.net: /layer/1: missing field 'type'",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_file_gives_a_clear_error_naming_file_and_field(tmp_path, how):
    path = _damage(tmp_path, how)
    with pytest.raises(NetxFileError, match=DAMAGE[how]):
        load_netx(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(NetxFileError, match=r"nothing.net: no such file"):
        load_netx(tmp_path / "nothing.net")


def test_bad_input_is_refused(tmp_path):
    net = load_netx(lava_dl_copy(os.path.join(NETX_TESTS, "tiny.net"), tmp_path / "tiny.net"))
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 16, 15\) but .* expects \(3, 16, 16\)"):
        net(torch.zeros(1, 3, 16, 15, 4))
    with pytest.raises(ValueError, match="binary spikes"):
        net(torch.full((1, 3, 16, 16, 4), 2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_executor_on_gpu_equals_cpu(tmp_path):  # pragma: no cover - no GPU here
    path = lava_dl_copy(os.path.join(NETX_TESTS, "tiny.net"), tmp_path / "tiny.net")
    x = spikes((4, 3, 16, 16, 16), seed=5)
    cpu = load_netx(path)(x)
    gpu = load_netx(path).cuda()(x.cuda())
    assert torch.equal(gpu.cpu(), cpu)


def _handwritten_overflow_net(path):
    """input (64, 6, 6) -> conv with 15-bit weights (Lava uses conv weights as they are).

    The conv's sums pass 2**23 (Lava wraps them to 24 bits), its current passes 2**23 after the
    shift by 6 (wrapped) and its voltage hits the clip: the arithmetic only large numbers reach.
    """
    gen = np.random.default_rng(7)
    with h5py.File(path, "w") as f:
        f["layer/0/type"] = np.array([b"input"], dtype="S10")
        f["layer/0/shape"] = np.array([64, 6, 6])
        conv = f.create_group("layer/1")
        conv["type"] = np.array([b"conv"], dtype="S10")
        conv["shape"] = np.array([4, 6, 6])
        # channel 0: sums past 2**23 (the conv's wrap); channels 1-3: sums of 2**17 .. 2**19, whose
        # current (sum << 6) passes 2**23 and wraps once
        weight = gen.integers(-100, 900, size=(4, 64, 3, 3))
        weight[0] = gen.integers(8000, 32000, size=(64, 3, 3))
        conv["weight"] = weight.astype(np.int32)
        for key, value in {"inChannels": 64, "outChannels": 4, "groups": 1}.items():
            conv[key] = value
        for key, value in {"kernelSize": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}.items():
            conv[key] = np.array(value)
        conv["neuron/type"] = "CUBA"
        conv["neuron/iDecay"], conv["neuron/vDecay"], conv["neuron/vThMant"], conv["neuron/refDelay"] = 1024, 128, 50000, 1
    return str(path)


@pytest.mark.lava
def test_overflowing_sums_currents_and_voltages_equal_lava(tmp_path):
    path = _handwritten_overflow_net(tmp_path / "overflow.net")
    x = spikes((2, 64, 6, 6, 12), seed=8, rate=0.9)
    net = load_netx(path)
    got, trace = net(x, record=True)
    assert net.layers[0].may_wrap and trace[0]["u"].abs().max() >= 2 ** 22  # the wrapping paths ran
    assert trace[0]["s"].sum() > 0 and got.sum() > 0
    assert torch.equal(got, fxlava.run_lava(path, x))


def test_lava_mnist_reports_the_netx_files_accuracy_through_the_executor(tmp_path):
    """The example's evaluation of the exported file on held-out digits (here 60 of them, trained demo weights)."""
    from fxlava.examples.lava_mnist import netx_check
    from fxlava.examples.mnist_csnn import MNISTNet
    from fxlava.examples.mnist_data import load_mnist

    model = MNISTNet(channels=16)
    model.load_state_dict(torch.load(os.path.join(os.path.dirname(fxlava.__file__), "examples",
                                                  "mnist_csnn_trained.pt"), weights_only=True))
    data = load_mnist()
    net = fxlava.compile(model, spikes((8, 2, 1, 28, 28), seed=0))
    path = net.export_hdf5(tmp_path / "net_la.net")
    r = netx_check(net.lava_dl, path, data.test_x[:60], data.test_y[:60], T=8, seed=1, batch=25)
    assert r["samples"] == 60 and r["same_spikes"] and r["output_spikes"] > 0
    assert r["acc_netx"] == r["acc_lava_dl"] and r["acc_netx"] > 0.8
