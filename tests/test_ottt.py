"""SpikingJelly's online-training LIF (OTTTLIFNode) and the OTTT VGG's Scale modules, exact against SpikingJelly.

In eval mode OTTTLIFNode calls functional.lif_step with LIFNode's arguments and keeps no trace: it is an
LIFNode. Scale multiplies spikes by a constant, which folds into the next synapse's weights.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from tests.sj_models import sj
from tests.zoo._lively import grid_weights

THRESHOLD = 1 + 1 / 128


def _ottt_net(scale=2.0, low=-10, high=14, **neuron_kw):
    Scale = sj("model.spiking_vggws_ottt").Scale
    kw = dict(v_reset=0.0, v_threshold=THRESHOLD, **neuron_kw)
    net = layer.OTTTSequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.OTTTLIFNode(**kw), Scale(scale),
        layer.AvgPool2d(2),
        layer.Conv2d(4, 4, 3, padding=1, bias=False), neuron.OTTTLIFNode(**kw), Scale(scale),
        layer.Flatten(1), layer.Linear(4 * 4 * 4, 3, bias=False), neuron.OTTTLIFNode(**kw))
    return grid_weights(net, 3, low, high, 1 / 32).eval()


def _spikes(shape, seed=1):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _sj_per_step(model, x):
    functional.reset_net(model)
    with torch.no_grad():
        out = torch.stack([model(x[t]) for t in range(x.shape[0])])
    functional.reset_net(model)
    return out


@pytest.mark.parametrize("scale,tau,decay_input,low,high", [(2.0, 2.0, False, -10, 14), (4.0, 2.0, True, -8, 16)])
def test_ottt_neurons_and_scales_equal_spikingjelly_on_every_spike(scale, tau, decay_input, low, high):
    model = _ottt_net(scale, low, high, tau=tau, decay_input=decay_input)
    x = _spikes((6, 2, 2, 8, 8))
    net = fxlava.compile(model, x)
    ref = _sj_per_step(model, x)
    y = net(x)
    assert 0 < ref.sum() < ref.numel()
    assert torch.equal(y, ref)
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    folded = " ".join(m for p, m in net.records if p == "fold_constant_scales")
    assert f"x {scale:g} into 4's weights" in folded and f"x {scale:g} into 8's weights" in folded


def test_ottt_neuron_with_its_default_soft_reset_is_refused_for_the_reset():
    model = layer.OTTTSequential(layer.Linear(4, 3, bias=False), neuron.OTTTLIFNode())
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)v_reset=None.*- 1 \(.*OTTTLIFNode\)"):
        fxlava.compile(model.eval(), _spikes((4, 2, 4)))


def test_a_scale_that_feeds_no_synapse_is_still_refused():
    class ScaledOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sn = layer.Linear(4, 3, bias=False), neuron.IFNode(v_threshold=THRESHOLD)
            self.fc2, self.sn2 = layer.Linear(3, 3, bias=False), neuron.IFNode(v_threshold=THRESHOLD)

        def forward(self, x):
            return self.sn2(self.sn(self.fc(x)) * 2.0)  # into a neuron, not a synapse

    with pytest.raises(fxlava.UnsupportedModelError, match=r"<mul>"):
        fxlava.compile(ScaledOut().eval(), _spikes((4, 2, 4)))
