"""lower_residuals: residual networks as a chain, skip paths as relay channels; exact against SpikingJelly."""
import sys
import types

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava.passes import default_pipeline
from tests.zoo import sew_resnet_small, spiking_resnet_small
from tests.zoo._lively import grid_weights

THRESHOLD = 1 + 1 / 128  # vThMant 64: SpikingJelly's v >= th and Loihi's v > 64/64 agree on the 1/32 grid


def _grid(model, seed=0, step=1 / 32):
    """Weights on lava-dl's weight grid, so quantisation changes nothing and only the lowering is tested."""
    return grid_weights(model, seed, -14, 21, step).eval()


def _spikes(shape, seed, rate=0.4):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _if_neurons(net):
    """Every neuron of ``net`` replaced by an IF node at THRESHOLD."""
    for m in list(net.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, neuron.BaseNode):
                setattr(m, child_name, neuron.IFNode(v_threshold=THRESHOLD))
    return net


def _sew():
    net = _if_neurons(sew_resnet_small.Net())
    functional.set_step_mode(net, "m")
    return _grid(net, seed=1)


def _spiking():
    net = _if_neurons(spiking_resnet_small.Net())
    net = nn.Sequential(net.conv1, net.sn1, net.layer1)  # ends in the last block: every spike of it compared
    functional.set_step_mode(net, "m")
    return _grid(net, seed=2)


@pytest.mark.parametrize("build,relays", [(_sew, [0, 4, 4, 0, 8, 0, 6, 6]), (_spiking, [0, 4, 0, 4, 0])],
                         ids=["SEW ADD", "Spiking ResNet"])
def test_residual_nets_equal_spikingjelly_and_lava_dl_on_every_spike(build, relays):
    """On grid weights: the SpikingJelly model == the compiled graph (+ readout) == lava-dl, spike for spike."""
    model = build()
    for seed in range(3):
        x = _spikes((6, 2, 2, 12, 12), seed)
        net = fxlava.compile(model, x)
        assert [getattr(b, "relay_channels", 0) for b in net.blocks] == relays
        functional.reset_net(model)
        with torch.no_grad():
            expected = model(x)
        functional.reset_net(model)
        y = net(x)
        assert torch.equal(net.readout(y), expected)
        assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
        assert expected.sum() > 0 and y.sum() > 0


def test_the_graph_is_unchanged_by_the_pass():
    """run_graph before and after lower_residuals gives the same spikes (merged on the host where they feed the output)."""
    from fxlava import frontend
    from fxlava.pass_manager import CompileContext

    model = _sew()
    x = _spikes((5, 2, 2, 12, 12), 4)
    gm, mode = frontend.trace(model, x)
    ctx = CompileContext(example_input=x, step_mode=mode, input_shape=tuple(x.shape[2:]))
    pipeline = default_pipeline()
    for p in pipeline:
        if p.name == "lower_residuals":
            before = fxlava.run_graph(gm, x)
        gm = p(gm, ctx).graph_module
        gm.recompile()
        if p.name == "lower_residuals":
            after = fxlava.run_graph(gm, x)
            break
    assert not ctx.issues
    assert after.shape[2] == 2 * before.shape[2]  # the last block's output and its skip, side by side
    assert torch.equal(gm.meta["fxlava_readout"].merge(after), before)
    assert before.sum() > 0


def test_cost_is_recorded_and_in_the_layer_table():
    from fxlava.cli import layer_table

    model = sew_resnet_small.build()
    x = sew_resnet_small.example_input()
    net = fxlava.compile(model, x)
    lines = [m for p, m in net.records if p == "lower_residuals"]
    assert any(m.startswith("relay channels: ") and "% of the model's" in m for m in lines)
    assert any("runs on the host as the first step of net.readout" in m for m in lines)
    table = layer_table(net)
    header, *rows = table.splitlines()
    assert "relays" in header
    assert [r.split()[-2:] for r in rows if r.endswith(" neurons")] == [["576", "neurons"], ["576", "neurons"],
                                                                       ["288", "neurons"], ["216", "neurons"],
                                                                       ["216", "neurons"]]
    assert "relay channels (skip paths carried along): 1872 neurons (+57.8 % of the model's 3240)" in table


class _MergeThenHead(nn.Module):
    """A residual block whose merge is flattened into a spiking classifier (a user's SEW net with a Linear + IF head)."""

    def __init__(self, merge="add", down=False):
        super().__init__()
        self.stem = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
        self.body = nn.Sequential(layer.Conv2d(4, 4, 3, padding=1, stride=2 if down else 1, bias=False),
                                  neuron.IFNode(v_threshold=THRESHOLD),
                                  layer.Conv2d(4, 4, 3, padding=1, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
        self.skip = (nn.Sequential(layer.Conv2d(4, 4, 1, stride=2, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
                     if down else nn.Identity())
        self.merge = merge
        side = 4 if down else 8
        self.head = nn.Sequential(layer.Flatten(), layer.Linear((8 if merge == "cat" else 4) * side * side, 6, bias=False),
                                  neuron.IFNode(v_threshold=THRESHOLD))
        functional.set_step_mode(self, "m")

    def forward(self, x):
        x = self.stem(x)
        out, identity = self.body(x), self.skip(x)
        merged = torch.cat([out, identity], dim=2) if self.merge == "cat" else out + identity
        return self.head(merged)


@pytest.mark.parametrize("merge,down", [("add", False), ("add", True), ("cat", False)],
                         ids=["SEW ADD", "SEW ADD, downsampled skip", "concatenation"])
def test_a_flattened_merge_feeds_the_next_dense_layer_exactly(merge, down, tmp_path):
    """flatten(a + b) is flatten(a) + flatten(b): the chain flattens both sources side by side and the Linear
    reads each with its weights; equal to SpikingJelly, lava-dl and the netx file on every spike."""
    model = _grid(_MergeThenHead(merge, down), seed=5)
    grid_weights(model.head, 6, -6, 7)  # a head that reads hundreds of features: balanced, so it does not saturate
    x = _spikes((6, 3, 2, 8, 8), 6)
    net = fxlava.compile(model, x)
    assert net.blocks[-2].__class__.__name__ == "FlattenBlock"
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(x)
    y = net(x)
    assert torch.equal(net.readout(y), expected)
    x_nct = fxlava.TNX_to_NXT(x)
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(x_nct)))
    assert torch.equal(fxlava.load_netx(net.export_hdf5(tmp_path / "head.net"))(x_nct), net.lava_dl(x_nct))
    assert expected.sum() > 0 and expected.mean() < 0.9


class _FlatSkip(nn.Module):
    """A flattened source (added to itself: a coefficient of 2) that a skip path carries past a dense layer."""

    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(2, 2, 3, padding=1, bias=False)
        self.sn = neuron.IFNode()
        self.fc = layer.Linear(2 * 8 * 8, 4, bias=False)
        self.sn2 = neuron.IFNode()
        self.fc2 = layer.Linear(4 + 2 * 8 * 8, 4, bias=False)
        self.sn3 = neuron.IFNode()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        a = self.sn(self.conv(x))
        flat = a.flatten(2)
        return self.sn3(self.fc2(torch.cat([self.sn2(self.fc(flat + flat)), flat], dim=2)))


def test_a_flattened_source_rides_along_a_dense_layer_as_relays(tmp_path):
    model = _grid(_FlatSkip(), seed=3)
    grid_weights(model.fc, 1, -6, 7)
    grid_weights(model.fc2, 2, -6, 7)
    x = _spikes((6, 3, 2, 8, 8), 6)
    net = fxlava.compile(model, x)
    assert [getattr(b, "relay_channels", 0) for b in net.blocks] == [0, 0, 2 * 8 * 8, 0]
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(x)
    y = net(x)
    assert torch.equal(net.readout(y), expected) and 0 < expected.mean() < 0.9
    x_nct = fxlava.TNX_to_NXT(x)
    assert torch.equal(fxlava.load_netx(net.export_hdf5(tmp_path / "skip.net"))(x_nct), net.lava_dl(x_nct))
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(x_nct)))


# --- refusals ------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """SEW / Spiking-ResNet blocks with the knobs the refusals turn."""

    def __init__(self, merge="add", sn=None, sn_down=None, kernel=3, padding=1, down=None, current=False, kernel2=3,
                 padding2=1):
        super().__init__()
        self.conv1 = layer.Conv2d(2, 2, kernel, padding=padding, stride=1 if down is None else 2, bias=False)
        self.sn1 = sn() if sn else neuron.IFNode()
        self.conv2 = layer.Conv2d(2, 2, kernel2, padding=padding2, bias=False)
        self.sn2 = neuron.IFNode()
        self.down = down
        self.sn_down = sn_down() if sn_down else None
        self.merge = merge
        self.current = current
        functional.set_step_mode(self, "m")

    def forward(self, x):
        out = self.sn1(self.conv1(x))
        if self.current:  # Spiking ResNet: add into the neuron's input
            out = self.conv2(out)
            out += self.down(x) if self.down is not None else x
            return self.sn2(out)
        out = self.sn2(self.conv2(out))
        identity = x if self.down is None else self.sn_down(self.down(x))
        if self.merge == "and":
            return out * identity
        if self.merge == "iand":
            return identity * (1.0 - out)
        return out + identity


class _CatH(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(2, 2, 3, padding=1, bias=False)
        self.sn = neuron.IFNode()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return torch.cat([self.sn(self.conv(x)), x], dim=3)


REFUSED = [
    ("SEW AND", lambda: _Block(merge="and"), r"(?s)a merge by mul\(\), which is not linear in the spikes.*- <mul>"),
    ("SEW IAND", lambda: _Block(merge="iand"), r"(?s)a merge by mul\(\).*\(1 - y\).*- <mul>.*return identity \* "),
    ("decays differ", lambda: _Block(sn_down=lambda: neuron.LIFNode(tau=2.0),
                                     down=layer.Conv2d(2, 2, 1, stride=2, bias=False)),
     r"(?s)a neuron that shares a netx layer with sn1 \(both at depth 1 of the chain\) but has other decays "
     r"\(iDecay 4096 vs 4096, vDecay 2048 vs 0\).*- sn_down "),
    ("even kernel", lambda: _Block(kernel=2, padding=1, kernel2=2, padding2=0),
     r"(?s)a layer whose geometry cannot carry a relay \(kernel 2x2, padding 1x1\).*- sn1 "),
    ("stride not followed", lambda: _Block(current=True, down=layer.Conv2d(2, 2, 3, stride=2, padding=1, bias=False)),
     r"(?s)a skip path relayed through strided layers \(subsampled by 2x2\) that down reads at other pixels.*"
     r"- down .*fix: downsample the skip path with a 1x1 conv"),
    ("threshold above a relay", lambda: _Block(sn=lambda: neuron.IFNode(v_threshold=4.0)),
     r"(?s)threshold 4 \(vThMant 256\): a relay fires on a weight above the threshold, at most 3.96875.*- sn1 "),
    ("current decay", lambda: _Block(sn=lambda: neuron.CUBALIFNode(c_decay=0.5, v_decay=0.5)),
     r"(?s)has current decay 0.5: a relay's current would carry over.*- sn1 "),
    ("cat along H", _CatH, r"(?s)a concatenation along a spatial dimension \(of 2x8x8, 2x8x8\).*- <cat>"),
]


@pytest.mark.parametrize("name,build,pattern", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_naming_the_merge_or_layer(name, build, pattern):
    x = _spikes((4, 1, 2, 8, 8), 0)
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern) as info:
        fxlava.compile(build(), x)
    assert "a branch: netx runs only a straight chain" not in str(info.value)  # the merge says it, once


def test_every_refused_merge_at_once():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _Block(merge="and"), _Block(merge="iand")

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(Two(), _spikes((4, 1, 2, 8, 8), 0))
    assert [i.reason.split(",")[0] for i in info.value.issues] == ["a merge by mul()"] * 2


# --- SpikingJelly's own ResNets ------------------------------------------------------------------------------


@pytest.fixture
def sj_resnets(monkeypatch):
    """SpikingJelly 2.0's model files import torchvision's load_state_dict_from_url (for pretrained=True only)."""
    import importlib

    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    utils = types.ModuleType("torchvision.models.utils")
    utils.load_state_dict_from_url = None
    for name, mod in (("torchvision", torchvision), ("torchvision.models", models), ("torchvision.models.utils", utils)):
        monkeypatch.setitem(sys.modules, name, mod)
    out = {}
    for name in ("sew_resnet", "spiking_resnet"):
        monkeypatch.delitem(sys.modules, f"spikingjelly.activation_based.model.{name}", raising=False)
        out[name] = importlib.import_module(f"spikingjelly.activation_based.model.{name}")
    return out


def _lively_batchnorms(model, seed):
    """Trained-like BatchNorm statistics with shifts, so that the deep layers fire at T 2."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 1.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.1)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sew_resnet18", "spiking_resnet18"])
def test_spikingjelly_resnet18_graph_equals_lava_dl(sj_resnets, arch):
    """SpikingJelly 2.0's sew_resnet18 (ADD) and spiking_resnet18, unmodified, BatchNorm shifts as bias currents,
    3x32x32, T 2: graph == lava-dl."""
    torch.manual_seed(0)
    if arch == "sew_resnet18":
        model = sj_resnets["sew_resnet"].sew_resnet18(cnf="ADD", spiking_neuron=neuron.IFNode)
    else:
        model = sj_resnets["spiking_resnet"].spiking_resnet18(spiking_neuron=neuron.IFNode)
    functional.set_step_mode(model, "m")
    model = _lively_batchnorms(model, 0)
    x = _spikes((2, 1, 3, 32, 32), 5, rate=0.5)
    net = fxlava.compile(model, x, bias="current")
    assert len(net.blocks) == 18 and net.blocks[1].kind == "maxpool"
    assert sum(b.bias is not None for b in net.blocks) == 17  # every layer but the OR layer of the max pool
    assert net.readout.ops[-3:] == ("avgpool (AdaptiveAvgPool2d)", "flatten()", "fc (Linear)")
    y = net(x)
    assert y.sum() > 0
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    assert net.readout(y).shape == (2, 1, 1000)
