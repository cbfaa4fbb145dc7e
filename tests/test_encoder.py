"""A forward() that repeats a static input over time: its ops up to the first spiking layer run on the host.

SpikingJelly's conv_fashion_mnist.CSNN (and models written after it) take images [N, C, H, W] and
make [T, N, C, H, W] themselves; the first conv reads real values, which Loihi's input layer cannot
carry. fxlava cuts that spiking encoder off into ``net.encoder``; the rest compiles from its spikes.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import encoding, functional, layer, neuron

import fxlava
from tests.sj_models import N, T, lively, sj
from tests.sj_models import run_sj as _sj


def _images(n=N, seed=0):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _csnn():
    """SpikingJelly's own CSNN, weights on the grid; BatchNorms at their identity statistics with eps 0, so
    folding them changes no weight and the compiled network can be compared with SpikingJelly spike for spike."""
    model = lively(sj("examples.conv_fashion_mnist").CSNN(T=T, channels=4)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model


def test_spikingjellys_image_csnn_compiles_and_equals_spikingjelly():
    model, x = _csnn(), _images()
    net = fxlava.compile(model, x)
    assert net.encoder is not None and net.encoder.until == "conv_fc.2"
    spikes = net.encoder(x)
    assert spikes.shape == (T, N, 4, 28, 28) and 0 < spikes.sum() < spikes.numel()
    out = net(spikes)
    assert 0 < out.sum() < out.numel(), "the comparison needs some spikes and some silence"
    assert torch.equal(net.readout(out), _sj(model, x))  # the firing rate CSNN returns, exactly
    # the rest of the network is on Loihi, from the encoder's spikes
    assert torch.equal(out, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(spikes))))
    assert any("net.encoder" in message and "conv_fc.0 (Conv2d)" in message for _, message in net.records)
    assert net.input_shape == (4, 28, 28)


def test_the_user_model_is_not_changed():
    model, x = _csnn(), _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.step_mode for m in model.modules() if hasattr(m, "step_mode")]
    ref = _sj(model, x)
    fxlava.compile(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.step_mode for m in model.modules() if hasattr(m, "step_mode")] == modes
    assert torch.equal(_sj(model, x), ref)


def test_encoder_refuse_names_the_encoding_line():
    model, x = _csnn(), _images()
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)input encoding.*conv_fashion_mnist.py:\d+"):
        fxlava.compile(model, x, encoder="refuse")


class _SkipFromInput(nn.Module):
    """Reads the repeated input again after the first spiking layer: no prefix can be cut off."""

    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = layer.Linear(16, 16, bias=False), neuron.IFNode()
        self.fc2, self.sn2 = layer.Linear(16, 16, bias=False), neuron.IFNode()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        x_seq = x.unsqueeze(0).repeat(T, 1, 1, 1)  # [N, 1, 16] -> [T, N, 1, 16]
        return self.sn2(self.fc2(self.sn1(self.fc1(x_seq))) + x_seq)


def test_an_input_read_again_later_is_still_refused():
    with pytest.raises(fxlava.UnsupportedModelError, match="input encoding"):
        fxlava.compile(_SkipFromInput().eval(), torch.rand(N, 1, 16))


class _PoissonInside(nn.Module):
    """An encoder module of SpikingJelly inside forward(): its spikes are what Loihi gets."""

    def __init__(self):
        super().__init__()
        self.encode = encoding.PoissonEncoder(step_mode="m")
        self.fc, self.sn = layer.Linear(784, 10, bias=False), neuron.IFNode()
        functional.set_step_mode(self.fc, "m"), functional.set_step_mode(self.sn, "m")

    def forward(self, x):
        return self.sn(self.fc(self.encode(x.flatten(1).unsqueeze(0).repeat(T, 1, 1)))).mean(0)


def test_an_encoder_module_inside_forward_runs_on_the_host():
    model = lively(_PoissonInside()).eval()
    x = _images()
    net = fxlava.compile(model, x)
    assert net.encoder.until == "encode"
    torch.manual_seed(1)
    spikes = net.encoder(x)
    torch.manual_seed(1)
    ref = _sj(model, x)  # the same random draw
    assert torch.equal(net.readout(net(spikes)), ref)
    assert [b for b in net.blocks if hasattr(b, "synapse")][0].synapse.in_features == 784


def test_spikes_still_compile_without_an_encoder():
    model = sj("examples.conv_fashion_mnist").CSNN(T=T, channels=4).conv_fc
    functional.set_step_mode(model, "m")
    net = fxlava.compile(lively(model).eval(), (torch.rand(T, N, 1, 28, 28) < 0.3).float())
    assert net.encoder is None


@pytest.mark.lava
def test_the_netx_file_from_the_encoders_spikes_is_exact_in_lava(tmp_path):
    model, x = _csnn(), _images()
    net = fxlava.compile(model, x)
    path = net.export_hdf5(tmp_path / "csnn.net")
    spikes = fxlava.TNX_to_NXT(net.encoder(x).detach())
    expected = net.lava_dl(spikes)
    assert expected.sum() > 0
    assert torch.equal(fxlava.run_lava(path, spikes), expected)


class _SingleStepImageLoop(nn.Module):
    """Single-step layers run T times on the same image inside forward(): the first layer reads real values."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1, bias=False), neuron.IFNode(), layer.Flatten(),
                                 layer.Linear(4 * 8 * 8, 10, bias=False), neuron.IFNode())

    def forward(self, x):
        out = 0
        for _ in range(T):
            out = out + self.net(x)
        return out / T


class _MultiStepImage(_SingleStepImageLoop):
    """The fix the refusal gives: the same layers in multi-step mode, the image repeated over time."""

    def __init__(self):
        super().__init__()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.net(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)


def test_a_single_step_loop_over_a_static_image_runs_its_first_layer_on_the_host(tmp_path):
    """Single-step layers run T times on the same image inside forward(): each step's ops up to the first
    spiking layer run on the host (net.encoder), the rest folds into the per-step graph. Equal to
    SpikingJelly on every output, and to the same layers written in multi-step mode."""
    model = lively(_SingleStepImageLoop()).eval()
    x = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    net = fxlava.compile(model, x)
    assert net.encoder.until == "net.1"
    spikes = net.encoder(x)
    assert spikes.shape == (T, N, 4, 8, 8)
    expected = _sj(model, x)
    assert expected.sum() > 0
    assert torch.equal(net.readout(net(spikes)), expected)
    spikes_nct = fxlava.TNX_to_NXT(spikes)
    assert torch.equal(net(spikes), fxlava.NXT_to_TNX(net.lava_dl(spikes_nct)))
    assert torch.equal(fxlava.load_netx(net.export_hdf5(tmp_path / "loop.net"))(spikes_nct), net.lava_dl(spikes_nct))
    fixed = _MultiStepImage().eval()
    fixed.load_state_dict(model.state_dict())
    multi = fxlava.compile(fixed, x)
    assert torch.equal(multi.encoder(x), spikes) and torch.equal(multi(spikes), net(spikes))


def test_a_single_step_loop_over_a_static_image_is_refused_with_the_multi_step_fix_when_asked():
    with pytest.raises(fxlava.UnsupportedModelError,
                       match=r"(?s)runs the same single-step layers 4 times on its own input.*"
                             r"test_encoder.py:\d+: out = out \+ self.net\(x\).*set_step_mode"):
        fxlava.compile(_SingleStepImageLoop().eval(), torch.rand(N, 1, 8, 8), encoder="refuse")
