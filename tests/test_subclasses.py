"""A module is compiled by its type only when it computes what that type computes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava.subclasses import changed_methods, compute_methods, computes_as

X = (torch.rand(12, 4, 1, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5).float()
# off the 1/32 grid of the voltages below: SpikingJelly fires at v >= threshold and Loihi at v > threshold,
# which agree when no voltage equals the threshold
THRESHOLD = 1.0 + 1 / 128


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net.eval()


# ------------------------------------------------------------------ subclasses that compute something else

class DoubledConv(layer.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class ReluConv(layer.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return F.relu(super()._conv_forward(x, weight, bias))


class ScaledLinear(layer.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class NoisyDropout(nn.Dropout):
    def forward(self, x):
        return x + 0.1


class ChargedLIF(neuron.LIFNode):
    """The user's own charge: not an LIFNode any more (whether or not this SpikingJelly calls it)."""

    def neuronal_charge(self, x):
        self.v = self.v + 2 * x


class StepIF(neuron.IFNode):
    def single_step_forward(self, x):
        return super().single_step_forward(x * 2)


class UnitWS(layer.WSConv2d):
    def get_weight(self):
        return torch.sign(self.weight)


REFUSED = [
    ("conv forward", _seq(DoubledConv(1, 2, 3, bias=False), neuron.IFNode()), r"DoubledConv overrides forward"),
    ("conv _conv_forward", _seq(ReluConv(1, 2, 3, bias=False), neuron.IFNode()), r"ReluConv overrides _conv_forward"),
    ("linear forward", _seq(layer.Flatten(), ScaledLinear(16, 3, bias=False), neuron.IFNode()),
     r"ScaledLinear overrides forward of torch.nn.modules.linear.Linear"),
    ("dropout forward", _seq(layer.Flatten(), NoisyDropout(), layer.Linear(16, 3, bias=False), neuron.IFNode()),
     r"NoisyDropout overrides forward"),
    ("lif neuronal_charge", _seq(layer.Flatten(), layer.Linear(16, 3, bias=False), ChargedLIF()),
     r"a subclass of LIFNode \(ChargedLIF\) that changes its dynamics: it overrides neuronal_charge"),
    ("if single_step_forward", _seq(layer.Flatten(), layer.Linear(16, 3, bias=False), StepIF()),
     r"a subclass of IFNode \(StepIF\) .* overrides single_step_forward"),
    ("ws get_weight", _seq(UnitWS(1, 2, 3, bias=False), neuron.IFNode()), r"UnitWS overrides get_weight of .*WSConv2d"),
]


@pytest.mark.parametrize("name,model,pattern", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_subclass_with_a_changed_forward_is_refused_naming_its_class(name, model, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern) as info:
        fxlava.compile(model, X)
    assert len(info.value.issues) == 1
    issue = info.value.issues[0]
    assert issue.module_type.endswith(type(model[[i for i, m in enumerate(model) if type(m).__module__ == __name__][0]])
                                      .__qualname__)


# ------------------------------------------------------------------ subclasses that compute what their base does

class MyConv(layer.Conv2d):
    """Only a different constructor: still a Conv2d."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding=1, bias=False, step_mode="m")


class MyLIF(neuron.LIFNode):
    def __init__(self):
        super().__init__(tau=4.0, decay_input=False, v_threshold=THRESHOLD)

    def describe(self):  # not reached by forward
        return "mine"


def test_subclasses_that_only_change_construction_compile_as_their_base():
    torch.manual_seed(0)
    mine = _seq(MyConv(1, 3), MyLIF(), layer.Flatten(), layer.Linear(48, 2, bias=False), neuron.IFNode())
    plain = _seq(layer.Conv2d(1, 3, 3, padding=1, bias=False),
                 neuron.LIFNode(tau=4.0, decay_input=False, v_threshold=THRESHOLD),
                 layer.Flatten(), layer.Linear(48, 2, bias=False), neuron.IFNode())
    plain.load_state_dict(mine.state_dict())
    with torch.no_grad():
        for m in (mine, plain):
            m[0].weight.mul_(8)
            m[3].weight.mul_(8)
    ours, theirs = fxlava.compile(mine, X), fxlava.compile(plain, X)
    assert theirs(X).sum() > 0
    assert torch.equal(ours(X), theirs(X))


def test_spikingjellys_step_mode_wrappers_are_their_torch_layers():
    for cls, base in ((layer.Conv2d, nn.Conv2d), (layer.Linear, nn.Linear), (layer.MaxPool2d, nn.MaxPool2d),
                      (layer.AvgPool2d, nn.AvgPool2d), (layer.Flatten, nn.Flatten)):
        assert "forward" in compute_methods(base)
        assert changed_methods(cls, base) == [], cls
    assert changed_methods(DoubledConv, nn.Conv2d) == ["forward"]
    assert "_conv_forward" in compute_methods(nn.Conv2d)  # reached from Conv2d.forward
    assert computes_as(MyLIF(), (neuron.LIFNode, neuron.IFNode)) is neuron.LIFNode
    assert computes_as(ChargedLIF(), (neuron.LIFNode,)) is None


# ------------------------------------------------------------------ weight standardisation, folded exactly

def _ws_model(gain: bool = True):
    """WSConv2d -> IF -> WSLinear -> IF, with weights whose standardised values lie on Loihi's 2/64 grid.

    Per output channel the raw weights have mean 0 and fan_in * variance a power of 4, so the
    standardisation divides by a power of two; a gain that is a multiple of 1/8 (conv) or 1/4 (linear)
    keeps the products on the grid. eps (1e-4) is below half a float32 ulp of those denominators.
    """
    conv = layer.WSConv2d(1, 4, 2, stride=2, bias=False, gain=gain)
    fc = layer.WSLinear(16, 5, bias=False, gain=gain)
    kernel = torch.tensor([3.0, -1.0, -1.0, -1.0]) * 32  # fan_in 4: 4 * var = 16384, the divisor is 128
    row = torch.tensor([4.0, -4, 3, -3, 1, -1, 2, -2] + [0.0] * 8) * 8  # fan_in 16: 16 * var = 4096, divisor 64
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in range(4):
            sign = 1 if c % 2 == 0 else -1
            conv.weight[c].copy_((sign * kernel.roll(c)).reshape(1, 2, 2))
        for r in range(5):
            fc.weight[r].copy_(row[torch.randperm(16, generator=g)])
        if gain:
            conv.gain.copy_(torch.tensor([2.0, 3.0, 4.0, 2.5]).reshape(4, 1, 1, 1))
            fc.gain.copy_(torch.tensor([4.0, 2.0, 3.0, 6.0, 5.0]).reshape(5, 1))
    threshold = THRESHOLD if gain else THRESHOLD / 4
    return _seq(conv, neuron.IFNode(v_threshold=threshold), layer.Flatten(), fc, neuron.IFNode(v_threshold=threshold))


@pytest.mark.parametrize("gain", [True, False])
def test_weight_standardised_layers_are_exact_against_spikingjellys_forward(gain):
    model = _ws_model(gain)
    grid = 2 / 64
    for ws in (model[0], model[3]):
        w = ws.get_weight().detach()
        assert torch.equal(torch.round(w / grid) * grid, w)  # the weights where quantisation is exact
        assert not torch.equal(w, ws.weight)  # and standardisation changes them
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(X)
    functional.reset_net(model)
    net = fxlava.compile(model, X)
    assert expected.sum() > 20 and (expected.sum((0, 1)) > 0).sum() >= 3  # several output neurons fire
    assert torch.equal(net(X), expected)
    kinds = [type(net.graph_module.get_submodule(n.target)).__name__ for n in net.graph_module.graph.nodes
             if n.op == "call_module"]
    assert "WSConv2d" not in kinds and "WSLinear" not in kinds
    assert any("WSConv2d -> Conv2d with the standardised weight" in r for r in map(str, net.records))


@pytest.mark.lava
def test_weight_standardised_layers_run_in_lava_as_in_lava_dl(tmp_path):
    net = fxlava.compile(_ws_model(), X)
    path = net.export_hdf5(tmp_path / "ws.net")
    xin = fxlava.TNX_to_NXT(X)
    expected = net.lava_dl(xin)
    assert expected.sum() > 0
    assert torch.equal(fxlava.run_lava(path, xin), expected)


# ------------------------------------------------------------------ containers

class DoublingContainer(layer.SeqToANNContainer):
    def forward(self, x_seq):
        return 2 * super().forward(x_seq)


class NamedContainer(layer.SeqToANNContainer):
    def __init__(self, cin, cout):
        super().__init__(layer.Conv2d(cin, cout, 3, padding=1, bias=False))


def test_a_container_subclass_is_traced_for_what_its_forward_does():
    # a user's container is not a leaf of the trace: its own forward is traced, and what it adds is refused
    refused = nn.Sequential(DoublingContainer(layer.Conv2d(1, 2, 3, padding=1, bias=False)),
                            neuron.IFNode(step_mode="m")).eval()
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)function mul.*return 2 \* super\(\).forward\(x_seq\)"):
        fxlava.compile(refused, X)
    mine = nn.Sequential(NamedContainer(1, 2), neuron.IFNode(step_mode="m"), layer.Flatten(step_mode="m"),
                         layer.Linear(32, 3, bias=False, step_mode="m"), neuron.IFNode(step_mode="m")).eval()
    net = fxlava.compile(mine, X)
    assert [b.kind for b in net.blocks] == ["conv", "flatten", "dense"]
