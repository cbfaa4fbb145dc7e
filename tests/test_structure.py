"""Structure: max pools of spikes as OR neurons, grouped/depthwise/dilated/non-square convs, containers, step modes.

Each equivalence runs the user's SpikingJelly model in floating point and the compiled graph on the
same spikes and compares every spike. The models use IF neurons, weights on lava-dl's 2/64 grid
(quantisation changes nothing) and thresholds of k/64 + 1/128: on the 2/64 grid of voltages
SpikingJelly's ``v >= threshold`` and Loihi's ``v > vThMant / 64`` then fire on the same steps.
"""
import h5py
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava import frontend
from fxlava.neuron import CubaNeuron
from fxlava.passes.maxpool_to_or import OR_THRESHOLD, OR_WEIGHT, or_neuron
from tests.zoo._lively import grid_weights

THRESHOLD = 1 + 1 / 128  # vThMant 64; see the module docstring


def _if(**kw):
    return neuron.IFNode(v_threshold=THRESHOLD, **kw)


def _grid(model, seed=0, step=1 / 32):
    """Weights: random multiples of ``step`` (a multiple of 2/64), small enough to stay in the 8-bit range."""
    return grid_weights(model, seed, -20, 21, step).eval()  # the compiled network is the model in eval mode (no dropout)


def _seq(*mods, step_mode="m"):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, step_mode)
    return net


def _spikes(shape, rate=0.4, seed=1):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _sj(model, x, step_mode="m"):
    """The user's model in floating point, from rest, on [T, N, *]."""
    functional.reset_net(model)
    with torch.no_grad():
        out = model(x) if step_mode == "m" else torch.stack([model(x[t]) for t in range(x.shape[0])])
    functional.reset_net(model)
    return out


def _assert_same_spikes(model, x, step_mode="m"):
    net = fxlava.compile(model, x)
    ref, got = _sj(model, x, step_mode), net(x)
    assert got.shape == ref.shape
    assert 0 < ref.sum() < ref.numel(), "the comparison needs some spikes and some silence"
    assert torch.equal(got, ref)
    # and the lava-dl network built from the compiled graph spikes the same
    assert torch.equal(got, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    return net


# --- the OR neuron -------------------------------------------------------------------------------


def test_or_neuron_fires_iff_its_window_held_a_spike_and_forgets():
    cuba = or_neuron()
    assert (cuba.v_th_mant, cuba.i_decay, cuba.v_decay) == (32, 4096, 4096)
    assert OR_WEIGHT == 1.0 and OR_THRESHOLD == 0.5
    # synaptic input = number of spikes in the window (times the weight 1.0), one channel per row
    counts = torch.tensor([[0, 1, 0, 0, 4, 0, 9, 1], [0, 0, 0, 0, 0, 0, 0, 0], [2, 2, 0, 3, 0, 0, 0, 1]],
                          dtype=torch.float32)[None]
    assert torch.equal(cuba(counts * OR_WEIGHT), (counts > 0).float())


MAXPOOLS = [
    ("k2", dict(kernel_size=2)),
    ("k3 s1", dict(kernel_size=3, stride=1)),
    ("k3 s2 p1 (overlap, -inf padding)", dict(kernel_size=3, stride=2, padding=1)),
    ("k2 s1 d2", dict(kernel_size=2, stride=1, dilation=2)),
    ("k3 s1 p1 d2", dict(kernel_size=3, stride=1, padding=1, dilation=2)),
    ("non-square k(3,2) s(1,2) p(1,0)", dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0))),
    ("ceil_mode that adds no window", dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("k4 s3 (windows skip inputs)", dict(kernel_size=4, stride=3)),
]


@pytest.mark.parametrize("settings", [m[1] for m in MAXPOOLS], ids=[m[0] for m in MAXPOOLS])
def test_maxpool_output_is_the_or_neurons_output_at_the_same_step(settings):
    """A network ending in a max pool: the SJ max pool's output at step t == the compiled pooling neuron's at t."""
    model = _grid(_seq(layer.Conv2d(2, 3, 3, padding=1, bias=False), _if(), layer.MaxPool2d(**settings)))
    x = _spikes((6, 3, 2, 9, 11))
    net = _assert_same_spikes(model, x)
    assert [b.kind for b in net.blocks] == ["conv", "maxpool"]
    block = net.blocks[1]
    assert block.synapse.groups == 3 and torch.all(block.synapse.weight == OR_WEIGHT)
    assert not block.synapse.weight.requires_grad
    assert block.neuron.v_th_mant == 32 and block.source == ("2",)


def test_maxpool_inside_a_network_functional_and_chained():
    """conv -> IF -> F.max_pool2d -> max pool -> conv -> IF -> flatten -> linear -> IF, all spikes equal SJ's."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = layer.Conv2d(2, 4, 3, padding=1, bias=False, step_mode="m")
            self.sn1 = _if(step_mode="m")
            self.pool = layer.MaxPool2d(2, stride=1, step_mode="m")
            self.conv2 = layer.Conv2d(4, 4, 3, bias=False, step_mode="m")
            self.sn2 = _if(step_mode="m")
            self.fc = layer.Linear(4 * 2 * 2, 3, bias=False, step_mode="m")
            self.sn3 = _if(step_mode="m")

        def forward(self, x):
            T, N = x.shape[:2]
            x = self.sn1(self.conv1(x))
            x = F.max_pool2d(x.flatten(0, 1), 2).view(T, N, 4, 5, 5)
            x = self.sn2(self.conv2(self.pool(x)))
            return self.sn3(self.fc(x.flatten(2)))

    net = _assert_same_spikes(_grid(Net(), seed=3, step=1 / 16), _spikes((8, 3, 2, 10, 10), seed=4))
    assert [b.kind for b in net.blocks] == ["conv", "maxpool", "maxpool", "conv", "flatten", "dense"]


def test_maxpool_of_the_binary_network_input():
    model = _grid(_seq(layer.MaxPool2d(2), layer.Conv2d(1, 3, 3, bias=False), _if()), seed=5, step=1 / 16)
    net = _assert_same_spikes(model, _spikes((6, 3, 1, 10, 10), rate=0.2, seed=6))
    assert [b.kind for b in net.blocks] == ["maxpool", "conv"]


def test_maxpool_then_average_pool_merged_into_the_next_conv():
    """max pool -> avg pool -> conv: the OR layer, then a conv with the avg pool's 1/4 folded in (exact on 1/8)."""
    model = _grid(_seq(layer.Conv2d(1, 2, 3, padding=1, bias=False), _if(), layer.MaxPool2d(2, stride=1),
                       layer.AvgPool2d(2), layer.Conv2d(2, 3, 3, padding=1, bias=False), _if()), seed=7, step=1 / 8)
    net = _assert_same_spikes(model, _spikes((6, 2, 1, 9, 9), seed=8))
    assert [b.kind for b in net.blocks] == ["conv", "maxpool", "conv"]


def test_or_neuron_keeps_the_pooled_neurons_surrogate():
    from spikingjelly.activation_based import surrogate

    model = _grid(_seq(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(surrogate_function=surrogate.ATan(3.0)),
                       layer.MaxPool2d(2)))
    net = fxlava.compile(model, _spikes((4, 2, 1, 8, 8)))
    sg = net.blocks[1].neuron.surrogate_function
    assert isinstance(sg, surrogate.ATan) and sg.alpha == 3.0
    assert sg is not net.blocks[0].neuron.surrogate_function


# --- convs ---------------------------------------------------------------------------------------


CONVS = [
    ("depthwise", dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4)),
    ("grouped x2 multiplier", dict(in_channels=4, out_channels=8, kernel_size=3, groups=2)),
    ("dilation 2", dict(in_channels=4, out_channels=3, kernel_size=3, dilation=2, padding=2)),
    ("non-square kernel", dict(in_channels=4, out_channels=3, kernel_size=(1, 5))),
    ("stride (2, 1), padding (0, 2)", dict(in_channels=4, out_channels=3, kernel_size=(2, 3), stride=(2, 1),
                                           padding=(0, 2))),
    ("dilation (1, 3), groups", dict(in_channels=4, out_channels=6, kernel_size=(3, 2), dilation=(1, 3), groups=2)),
    ("padding='same' odd kernel", dict(in_channels=4, out_channels=3, kernel_size=(3, 5), padding="same")),
    ("padding='same' even kernel, even dilation", dict(in_channels=4, out_channels=3, kernel_size=2, dilation=2,
                                                        padding="same")),
    ("padding='valid'", dict(in_channels=4, out_channels=3, kernel_size=3, padding="valid")),
    ("reflect mode without padding", dict(in_channels=4, out_channels=3, kernel_size=3, padding_mode="reflect")),
]


@pytest.mark.parametrize("settings", [c[1] for c in CONVS], ids=[c[0] for c in CONVS])
def test_conv_settings_compile_exactly_and_reach_netx(settings, tmp_path):
    model = _grid(_seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), _if(),
                       layer.Conv2d(**settings, bias=False), _if()), seed=9)
    x = _spikes((6, 2, 2, 7, 10), seed=10)
    net = _assert_same_spikes(model, x)
    user = model[2]
    conv = net.blocks[1].synapse
    padding = {"same": None, "valid": (0, 0)}.get(user.padding, user.padding)
    if padding is None:  # 'same': half the dilated kernel on each side
        padding = tuple(d * (k - 1) // 2 for k, d in zip(user.kernel_size, user.dilation))
    want = dict(kernel_size=user.kernel_size, stride=user.stride, padding=padding, dilation=user.dilation,
                groups=user.groups)
    assert {k: getattr(conv, k) for k in want} == want
    # slayer's block and the netx file carry the same geometry ((H, W) order in both)
    slayer_conv = net.lava_dl[1].synapse
    assert tuple(slayer_conv.kernel_size[:2]) == want["kernel_size"]
    assert (tuple(slayer_conv.stride[:2]), tuple(slayer_conv.padding[:2]), tuple(slayer_conv.dilation[:2]),
            slayer_conv.groups) == (want["stride"], want["padding"], want["dilation"], want["groups"])
    path = net.export_hdf5(tmp_path / "net.net")
    with h5py.File(path, "r") as f:
        layer2 = f["layer/2"]
        assert tuple(layer2["stride"][()]) == want["stride"]
        assert tuple(layer2["padding"][()]) == want["padding"]
        assert tuple(layer2["dilation"][()]) == want["dilation"]
        assert int(layer2["groups"][()]) == want["groups"]
        assert layer2["weight"].shape == tuple(user.weight.shape)
    # the user's model still has its own padding
    assert model[2].padding == user.padding and model[2].padding_mode == settings.get("padding_mode", "zeros")


def test_padding_same_is_checked_against_torch():
    """resolve_conv_padding turns 'same' into integers; the canonical graph computes the same before and after."""
    from fxlava.pass_manager import CompileContext
    from fxlava.passes import resolve_conv_padding

    model = _grid(_seq(layer.Conv2d(1, 2, (3, 5), padding="same", dilation=(1, 2), bias=False), _if()))
    x = _spikes((5, 2, 1, 8, 9))
    gm, mode = frontend.trace(model, x)
    before = frontend.run_per_step(gm, x)
    res = resolve_conv_padding(gm, CompileContext(example_input=x, step_mode=mode, input_shape=(1, 8, 9)))
    assert res.modified and gm.get_submodule("0").padding == (1, 4)
    assert torch.equal(before, frontend.run_per_step(gm, x))
    assert model[0].padding == "same"  # the user's model is untouched


# --- containers and step modes -------------------------------------------------------------------


class _Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(layer.Conv2d(cin, cout, 3, padding=1, bias=False)), _if())

    def forward(self, x):
        return self.body(x)


class _ModuleListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([_Stage(1, 3), _Stage(3, 3)])
        self.head = nn.Sequential(nn.Sequential(layer.Flatten(), layer.Linear(3 * 8 * 8, 4, bias=False)), _if())

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _multi(m):
    functional.set_step_mode(m, "m")
    return m


S, M = layer.SeqToANNContainer, layer.MultiStepContainer

CONTAINERS = [
    ("ModuleList of nested Sequentials, multi-step", lambda: _multi(_ModuleListNet()), "m"),
    ("ModuleList of nested Sequentials, single-step", lambda: _ModuleListNet(), "s"),
    ("SeqToANNContainer(Sequential(conv)) + MultiStepContainer(neuron)",
     lambda: nn.Sequential(S(nn.Sequential(nn.Conv2d(1, 3, 3, bias=False))), M(_if()),
                           S(nn.Flatten(), nn.Linear(3 * 6 * 6, 4, bias=False)), M(nn.Sequential(_if()))), "m"),
    ("SeqToANNContainer(Sequential), neurons 's' in MultiStepContainer beside 'm' neurons",
     lambda: nn.Sequential(S(nn.Sequential(nn.Conv2d(1, 3, 3, bias=False)), nn.Dropout(0.3)), _if(step_mode="m"),
                           M(nn.Conv2d(3, 3, 3, bias=False), _if()), layer.Flatten(step_mode="m"),
                           layer.Linear(3 * 4 * 4, 4, bias=False, step_mode="m"), _if(step_mode="m")), "m"),
    ("StepModeContainer stateless and stateful, 'm'",
     lambda: nn.Sequential(layer.StepModeContainer(False, "m", nn.Conv2d(1, 3, 3, bias=False)),
                           layer.StepModeContainer(True, "m", _if(), nn.MaxPool2d(2)),
                           layer.StepModeContainer(False, "m", nn.Flatten(), nn.Linear(3 * 3 * 3, 4, bias=False)),
                           layer.StepModeContainer(True, "m", _if())), "m"),
    ("StepModeContainer 's' in a single-step model",
     lambda: nn.Sequential(layer.StepModeContainer(True, "s", nn.Conv2d(1, 3, 3, bias=False), _if()),
                           nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), nn.Linear(3 * 3 * 3, 4, bias=False),
                           _if()), "s"),
]


@pytest.mark.parametrize("build,mode", [c[1:] for c in CONTAINERS], ids=[c[0] for c in CONTAINERS])
def test_containers_and_step_modes(build, mode):
    model = _grid(build(), seed=11)
    x = _spikes((6, 2, 1, 8, 8), seed=12)
    gm, detected = frontend.trace(model, x)
    assert detected == mode
    assert torch.equal(frontend.run_per_step(gm, x), _sj(model, x, mode))  # the canonical graph is the model
    _assert_same_spikes(model, x, mode)


def test_neuron_step_modes_inside_multistep_containers_are_not_a_mix():
    model = nn.Sequential(M(nn.Conv2d(1, 2, 3, bias=False), neuron.IFNode()), neuron.IFNode(step_mode="m"))
    assert model[0][1].step_mode == "s"
    assert frontend.detect_step_mode(model) == "m"
    # a single-step neuron outside any container in the same model is a mix
    mixed = nn.Sequential(M(nn.Conv2d(1, 2, 3, bias=False), neuron.IFNode()), neuron.IFNode(step_mode="s"))
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)both single-step and multi-step.*- 1 "):
        frontend.detect_step_mode(mixed)


def test_or_layer_counts_in_lava_latency(tmp_path):
    """The OR layer is a netx conv layer: lava_latency (the steps run_lava drops) counts it."""
    from fxlava.lava_runner import lava_latency

    model = _grid(_seq(layer.Conv2d(1, 2, 3, bias=False), _if(), layer.MaxPool2d(2)))
    net = fxlava.compile(model, _spikes((4, 1, 1, 8, 8)))
    assert lava_latency(net.export_hdf5(tmp_path / "or.net")) == 2
    assert isinstance(net.blocks[1].neuron, CubaNeuron)
