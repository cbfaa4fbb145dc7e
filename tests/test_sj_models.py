"""SpikingJelly 2.0's own models, built from the installed package, compiled as their authors wrote them.

Each one either compiles, with the compiled graph equal to lava-dl on every spike, or is refused only
for reasons Loihi's netx chain really lacks: a bias, a BatchNorm shift, a residual connection (or the
branch that feeds it), recurrence, attention, each named. Models with biases or BatchNorm shifts are
also compiled with those removed by hand, which proves the rest of their path. docs/support.md has
the table.
"""
import re

import pytest
import torch

import fxlava
from tests.sj_models import EXTRA_REASONS, MODELS, T, N, lively, sj, spikes, zero_bias_and_shifts

# the largest ones (128 x 128 event frames, ResNet-18) run with `make test-all`
SLOW = {"model.parametric_lif_net.CIFAR10DVSNet", "model.parametric_lif_net.DVSGestureNet",
        "model.spiking_resnet.spiking_resnet18", "model.sew_resnet.sew_resnet18"}
SLOW |= {"model.spiking_vgg.spiking_vgg11", "model.ms_resnet.max_resnet18", "model.masnn.att_ms_resnet18"}
SLOW_TO_COMPILE = {"examples.memopt.models.CIFAR10DVSVGG"}  # refused at once; 512 channels to compile


def _params(names, slow=SLOW):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


ALLOWED = [r"a synapse with a bias", r"a BatchNorm with a non-zero shift", r"a residual connection",
           r"a branch: netx runs only a straight chain", r"a recurrent container", r"^attention"]


def _graph_equals_lava_dl(net, x):
    if net.encoder is not None:  # the model takes images and makes their spikes itself
        x = net.encoder(x).detach()
    if net.graph_module.meta.get("fxlava_input_transposed"):  # the model takes [N, T, *]; net takes [T, N, *]
        x = x.transpose(0, 1)
    y = net(x)
    y_ladl = fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x)))
    assert y.shape == y_ladl.shape
    assert 0 < y.sum() < y.numel(), "the comparison needs some spikes and some silence"
    assert torch.equal(y, y_ladl)


@pytest.mark.parametrize("name", _params(MODELS))
def test_compiles_or_is_refused_only_for_a_named_reason(name):
    build, example, expected, _ = MODELS[name]
    model, x = build(), example()
    if expected == "compiles":
        net = fxlava.compile(lively(model), x)
        _graph_equals_lava_dl(net, x)
        return
    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(model, x)
    reasons = {i.reason for i in info.value.issues}
    for pattern in expected:
        assert any(re.search(pattern, r) for r in reasons), (pattern, reasons)
    allowed = ALLOWED + EXTRA_REASONS.get(name, [])
    assert all(any(re.search(a, r) for a in allowed) for r in reasons), reasons


@pytest.mark.parametrize("name", _params((n for n, m in MODELS.items() if m[3]), SLOW | SLOW_TO_COMPILE))
def test_with_biases_and_shifts_removed_compiles_exactly(name):
    build, example, _, _ = MODELS[name]
    model, x = lively(zero_bias_and_shifts(build())), example()
    net = fxlava.compile(model, x)
    _graph_equals_lava_dl(net, x)


def test_lava_exchange_tutorial_net_compiles():
    """examples/lava_mnist.py: SpikingJelly's own Lava tutorial network, BlockContainers and all."""
    model = sj("examples.lava_mnist").MNISTNet(channels=4).eval()
    x = spikes(T, N, 1, 28, 28)
    net = fxlava.compile(lively(model), x)
    _graph_equals_lava_dl(net, x)


def test_hand_written_neurons_of_the_r11_example_are_refused_once_each():
    """cifar10_r11's own LIF/IF classes do their arithmetic in forward(): one issue per neuron, not per op."""
    model = sj("examples.cifar10_r11_enabling_spikebased_backpropagation").ResNet11().eval()
    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(model, spikes(2, 1, 3, 32, 32))
    own = [i for i in info.value.issues if i.reason.startswith("a module whose forward()")]
    neurons = [n for n, m in model.named_modules() if type(m).__name__ in ("LIFNode", "IFNode")
               and type(m).__module__.endswith("cifar10_r11_enabling_spikebased_backpropagation")]
    assert sorted(i.path for i in own) == sorted(neurons)
    assert all("self.v" in i.source for i in own)
    assert any(i.reason.startswith("a residual connection") for i in info.value.issues)


def test_dqsn_returning_a_membrane_voltage_is_refused_at_compile():
    """spiking_dqn_state.DQSN returns its NonSpikingLIFNode's v: refused, not a crash in net(x)."""
    model = sj("examples.spiking_dqn_state").DQSN(4, 32, 2, 4).eval()
    with pytest.raises(fxlava.UnsupportedModelError, match=r"returns a module's attribute or a constant \(such as "
                                                           r"a neuron's v or v_seq\), not spikes"):
        fxlava.compile(model, spikes(4, 2, 4))
