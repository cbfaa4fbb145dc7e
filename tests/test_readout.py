"""What a model does with its output spikes (a rate, a VotingLayer) runs on the host as net.readout."""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

import fxlava


class RateOut(nn.Module):
    """Users' usual ending: the firing rate over time, as in SpikingJelly's tutorials."""

    def __init__(self, voting=False, step_mode="m"):
        super().__init__()
        self.fc1 = layer.Linear(20, 30, bias=False)
        self.sn1 = neuron.IFNode()
        self.fc2 = layer.Linear(30, 20 if voting else 10, bias=False)
        self.sn2 = neuron.IFNode()
        self.vote = layer.VotingLayer(2) if voting else None
        functional.set_step_mode(self, step_mode)
        with torch.no_grad():  # weights on Loihi's grid, large enough to fire
            for fc in (self.fc1, self.fc2):
                fc.weight.copy_(torch.randint(-40, 60, fc.weight.shape) / 32)

    def forward(self, x):
        y = self.sn2(self.fc2(self.sn1(self.fc1(x))))
        if self.vote is not None:
            y = self.vote(y)
        return y.mean(0) if self.sn2.step_mode == "m" else y


def _x(T=6, N=5):
    return (torch.rand(T, N, 20, generator=torch.Generator().manual_seed(0)) < 0.5).float()


@pytest.mark.parametrize("voting", [False, True])
def test_rate_readout_is_split_off_and_recorded(voting):
    model, x = RateOut(voting), _x()
    net = fxlava.compile(model, x)
    spikes = net(x)
    assert spikes.shape == (6, 5, 20 if voting else 10) and spikes.sum() > 0
    assert any("readout after sn2" in m and "mean" in m for _, m in net.records)
    expected = spikes.mean(0) if not voting else model.vote(spikes).mean(0)
    assert torch.equal(net.readout(spikes), expected)
    assert [b.kind for b in net.blocks] == ["dense", "dense"]


def test_readout_per_step_in_single_step_mode():
    model, x = RateOut(voting=True, step_mode="s"), _x()
    net = fxlava.compile(model, x)
    spikes = net(x)
    assert torch.equal(net.readout(spikes), torch.stack([model.vote(s) for s in spikes]))


def test_no_tail_means_identity_readout():
    model = nn.Sequential(layer.Linear(20, 10, bias=False), neuron.IFNode())
    functional.set_step_mode(model, "m")
    net = fxlava.compile(model, _x())
    y = net(_x())
    assert net.readout(y) is y and not net.readout.ops


def test_a_trailing_head_without_a_neuron_runs_on_the_host():
    """A classification head after the last spiking layer (SpikingJelly's ResNets end in fc) is net.readout."""
    model = nn.Sequential(layer.Linear(20, 10, bias=False), neuron.IFNode(), layer.Linear(10, 3, bias=True))
    functional.set_step_mode(model, "m")
    x = _x()
    net = fxlava.compile(model, x)
    assert [b.kind for b in net.blocks] == ["dense"]
    assert net.readout.ops == ("2 (Linear)",)
    assert any("runs on the host" in message and "2 (Linear)" in message for _, message in net.records)
    y = net(x)
    assert y.shape[-1] == 10 and y.sum() > 0
    with torch.no_grad():
        assert torch.equal(net.readout(y), model[2](y))  # the model's own head, in float, on the output spikes


def test_a_head_and_its_rate_over_time_run_on_the_host():
    """fc(x).mean(0) after the last spiking layer: the head and the rate are net.readout; arithmetic that could
    be a hand-written neuron after a head stays in the graph, to be named."""
    class Rate(nn.Module):
        def __init__(self, spike=False):
            super().__init__()
            self.fc1, self.sn = layer.Linear(20, 10, bias=False), neuron.IFNode()
            self.head = layer.Linear(10, 3)
            self.spike = spike
            functional.set_step_mode(self, "m")

        def forward(self, x):
            y = self.head(self.sn(self.fc1(x)))
            return (y >= 1.0).float() if self.spike else y.mean(0).softmax(-1)

    torch.manual_seed(0)
    model, x = Rate(), _x()
    net = fxlava.compile(model, x)
    assert net.readout.ops == ("head (Linear)", ".mean()", ".softmax()")
    y = net(x)
    assert y.shape[-1] == 10 and y.sum() > 0
    with torch.no_grad():  # the model's own head and rate, in float, on the output spikes
        assert torch.equal(net.readout(y), model.head(y).mean(0).softmax(-1))
    with pytest.raises(fxlava.UnsupportedModelError, match=r"head"):
        fxlava.compile(Rate(spike=True), x)


def test_encoding_inside_forward_is_named_with_a_fix():
    class Repeats(nn.Module):  # static images in, a rate out, and no spiking layer after the encoder's
        def __init__(self):
            super().__init__()
            self.conv, self.sn = layer.Conv2d(1, 4, 3, bias=False), neuron.IFNode()
            functional.set_step_mode(self, "m")

        def forward(self, img):
            return self.sn(self.conv(img.unsqueeze(0).repeat(4, 1, 1, 1, 1))).mean(0)

    with pytest.raises(fxlava.UnsupportedModelError) as err:
        fxlava.compile(Repeats(), torch.rand(2, 1, 8, 8))
    text = str(err.value)
    assert "an input encoding inside forward()" in text and "<unsqueeze>" in text and "<repeat>" in text
    assert "PoissonEncoder" in text


def test_cli_prints_the_readout(tmp_path, capsys):
    from fxlava import cli

    (tmp_path / "rate_model.py").write_text(
        "import torch.nn as nn\n"
        "from spikingjelly.activation_based import functional, layer, neuron\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc, self.sn = layer.Linear(20, 10, bias=False), neuron.IFNode()\n"
        "        functional.set_step_mode(self, 'm')\n"
        "    def forward(self, x):\n"
        "        return self.sn(self.fc(x)).mean(0)\n")
    out = tmp_path / "rate.net"
    code = cli.main([f"{tmp_path / 'rate_model.py'}:Net", "--input-shape", "4,2,20", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "readout of the output spikes, run on the host (net.readout), after sn: .mean()" in printed
