"""Models fxlava must refuse, each with a message that names every offending module and a fix."""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, lava_exchange, layer, neuron

import fxlava


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


X = torch.zeros(4, 1, 1, 8, 8)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 1, 3, padding=1, bias=False, step_mode="m")
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x):
        return self.sn(self.conv(x)) + x


class _SewAnd(Residual):
    def forward(self, x):
        return self.sn(self.conv(x)) * x


CASES = [
    ("two biased layers",
     _seq(layer.Conv2d(1, 2, 3, bias=True), neuron.IFNode(), layer.Flatten(), layer.Linear(72, 3), neuron.IFNode()),
     r"(?s)synapse with a bias. Loihi has a bias .*only when asked.*- 0 .*Conv2d.*fix: .*bias=\"current\".*"
     r"bias=False.*- 3 .*Linear"),
    ("soft reset",
     _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.IFNode(v_reset=None)),
     r"(?s)soft-reset neuron.*- 2 .*IFNode.*fix: construct the neuron with v_reset=0.0"),
    ("non-zero reset",
     _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.LIFNode(v_reset=-0.5, decay_input=False)),
     r"(?s)v_reset=-0.5.*- 2 .*LIFNode"),
    ("relu between layers",
     _seq(layer.Flatten(), layer.Linear(64, 8, bias=False), nn.ReLU(), layer.Linear(8, 3, bias=False), neuron.IFNode()),
     r"(?s)no Loihi equivalent.*- 2 .*ReLU.*spiking neuron"),
    ("unsupported neuron",
     _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.QIFNode()),
     r"(?s)neuron with no Loihi CUBA equivalent \(QIFNode: .*quadratic.*\).*- 2 "),
    ("SEW's AND merge", _SewAnd(),
     r"(?s)a merge by mul\(\), which is not linear in the spikes \(SEW's AND is x \* y, IAND x \* \(1 - y\)\).*"
     r"\n  - <mul> \(function mul\)\n      at .*test_failcases.py:\d+: return self.sn\(self.conv\(x\)\) \* x"
     r"\n      fix: merge the paths with an addition"),
    ("everything at once",
     _seq(layer.Conv2d(1, 2, 3, bias=True), neuron.IFNode(v_reset=None), nn.ReLU(), layer.Flatten(),
          layer.Linear(72, 3, bias=True), neuron.IFNode()),
     r"(?s)4 unsupported items.*bias.*- 0 .*- 4 .*soft-reset.*- 1 .*no Loihi equivalent.*- 2 \(.*ReLU"),
    ("synapse without neuron",
     _seq(layer.Flatten(), layer.Linear(64, 8, bias=False), layer.Linear(8, 3, bias=False), neuron.IFNode()),
     r"(?s)synapse not followed by a spiking neuron.*- 1 "),
]


@pytest.mark.parametrize("name,model,pattern", CASES, ids=[c[0] for c in CASES])
def test_refused_with_clear_message(name, model, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern):
        fxlava.compile(model, X)


class _PoolWithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 2, 3, bias=False, step_mode="m")
        self.sn = neuron.IFNode(step_mode="m")
        self.pool = layer.MaxPool2d(2, return_indices=True, step_mode="m")

    def forward(self, x):
        return self.pool(self.sn(self.conv(x)))[0]


class _OwnForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)

    def forward(self, x):
        return self.conv(x)


def _multi_step_inside():
    net = nn.Sequential(layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, bias=False)), layer.MultiStepContainer(neuron.IFNode()))
    net[1][0].step_mode = "m"  # after construction, which checks it
    return net


def _conv_if(*mods):
    return (layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode()) + mods


# (name, model, example input, pattern): max pools, conv padding, containers and step modes
STRUCTURE_CASES = [
    ("max pool after a synapse",
     _seq(layer.Conv2d(1, 2, 3, bias=False), layer.MaxPool2d(2), layer.Conv2d(2, 2, 3, bias=False), neuron.IFNode()), X,
     r"(?s)max pool of values that are not spikes \(its input comes from 0 \(Conv2d\).*- 1 \(.*MaxPool2d\)"
     r".*fix: put the max pool after a spiking neuron"),
    ("max pool after an average pool",
     _seq(*_conv_if(layer.AvgPool2d(2), layer.MaxPool2d(1), layer.Flatten(), layer.Linear(18, 2, bias=False),
                    neuron.IFNode())), X,
     r"(?s)an average pool that cannot become a Loihi layer \(a pool that feeds no synapse or neuron\).*"
     r"- 2 \(.*AvgPool2d\).*fix: it feeds 3 \(MaxPool2d\); an average pool must feed a conv"),
    ("max pool of a non-binary input",
     _seq(layer.MaxPool2d(2), layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode()), torch.full((4, 1, 1, 8, 8), 0.5),
     r"(?s)max pool of the network input, and the example input is not binary.*- 0 \(.*MaxPool2d\)"
     r".*fix: compile with spike input"),
    ("max pool with partial ceil_mode windows",
     _seq(*_conv_if(layer.MaxPool2d(3, 2, ceil_mode=True))), X,
     r"(?s)ceil_mode adds partial windows.*- 2 \(.*MaxPool2d\).*fix: use ceil_mode=False"),
    ("max pool returning indices", _PoolWithIndices(), X,
     r"(?s)max pool that returns indices.*- pool \(.*MaxPool2d\).*fix: construct it with return_indices=False"),
    ("max pool feeding a neuron", _seq(*_conv_if(layer.MaxPool2d(2), neuron.IFNode())), X,
     r"(?s)max pool that feeds a spiking neuron with no synapse.*- 2 \(.*MaxPool2d\)"),
    ("adaptive max pool, uneven windows", _seq(*_conv_if(layer.SeqToANNContainer(nn.AdaptiveMaxPool2d(4)),
                                                         layer.Conv2d(2, 2, 1, bias=False), neuron.IFNode())), X,
     r"(?s)adaptive pool to \(4, 4\) of a 6x6 input: unequal, overlapping windows.*- 2.0 \(.*AdaptiveMaxPool2d\)"
     r".*fix: choose an output size that divides 6x6"),
    ("adaptive avg pool, uneven windows", _seq(*_conv_if(layer.AdaptiveAvgPool2d((4, 3)),
                                                         layer.Conv2d(2, 2, 1, bias=False), neuron.IFNode())), X,
     r"(?s)adaptive pool to \(4, 3\) of a 6x6 input.*- 2 \(.*AdaptiveAvgPool2d\)"),
    ("reflect padding",
     _seq(layer.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=False), neuron.IFNode()), X,
     r"(?s)padding_mode='reflect': netx convs pad with zeros only.*- 0 \(.*Conv2d\).*fix: .*padding_mode='zeros'"),
    ("circular padding",
     _seq(layer.Conv2d(1, 2, 3, padding=(0, 1), padding_mode="circular", bias=False), neuron.IFNode()), X,
     r"(?s)padding_mode='circular'.*- 0 \(.*Conv2d\)"),
    ("one-sided 'same' padding",
     _seq(layer.Conv2d(1, 2, (3, 4), padding="same", bias=False), neuron.IFNode()), X,
     r"(?s)padding='same' and kernel \(3, 4\).*- 0 \(.*Conv2d\).*fix: use an odd kernel size"),
    ("zero padding module", _seq(layer.SeqToANNContainer(nn.ZeroPad2d(1)), *_conv_if()), X,
     r"(?s)no Loihi equivalent.*- 0.0 \(.*ZeroPad2d\).*fix: drop it and give the next conv padding="),
    ("neuron inside SeqToANNContainer",
     nn.Sequential(layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, bias=False), neuron.IFNode())), X,
     r"(?s)neuron inside a container that merges time into the batch.*- 0.1 \(.*IFNode\).*fix: move the neuron out of 0"),
    ("container in a container",
     nn.Sequential(layer.MultiStepContainer(layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, bias=False)), neuron.IFNode())),
     X, r"(?s)step container inside another.*- 0.0 \(.*SeqToANNContainer\).*fix: put its layers directly"),
    ("multi-step module inside a container", _multi_step_inside(), X,
     r"(?s)multi-step module inside a SpikingJelly container.*- 1.0 \(.*IFNode\)"),
    ("module with its own forward inside a container",
     nn.Sequential(layer.SeqToANNContainer(_OwnForward()), neuron.IFNode(step_mode="m")), X,
     r"(?s)own forward\(\) inside a SpikingJelly container.*- 0.0 \(.*_OwnForward\).*fix: call it outside"),
]


@pytest.mark.parametrize("name,model,x,pattern", STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES])
def test_structure_refused_with_clear_message(name, model, x, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern):
        fxlava.compile(model, x)


class _MyLIF(neuron.LIFNode):
    """A user's neuron with its own charge: not an LIFNode."""

    def neuronal_charge(self, x):
        self.v = self.v + x


def _with(m, **attrs):
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _bn(bn, mean=0.0, beta=0.0):
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        if bn.bias is not None:
            bn.bias.fill_(beta)
    return bn


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 1, 3, padding=1, bias=False, step_mode="m")
        self.a = neuron.IFNode(step_mode="m")
        self.b = neuron.LIFNode(step_mode="m")

    def forward(self, x):
        y = self.conv(x)
        return self.a(y) * self.b(y)


def _lin(*mods):
    return (layer.Flatten(), layer.Linear(64, 3, bias=False)) + mods


_NO_CUBA = (r"(?s)a neuron with no Loihi CUBA equivalent \({}: [^)]*{}[^)]*\):.*- 2 \(.*{}\)"
            r".*fix: use neuron.IFNode, LIFNode")

# (name, model, pattern): neurons, stateful modules and normalisations (substitute_neurons, fold_batchnorm)
NEURON_BN_CASES = [
    ("soft reset LIF",
     _seq(*_lin(neuron.LIFNode(v_reset=None))),
     r"(?s)soft-reset neuron \(v_reset=None\): Loihi resets the voltage to 0:\n  - 2 \(.*LIFNode\)"
     r".*fix: construct the neuron with v_reset=0.0"),
    ("non-zero reset PLIF",
     _seq(*_lin(neuron.ParametricLIFNode(v_reset=0.25))),
     r"(?s)neuron with v_reset=0.25: Loihi resets the voltage to 0:\n  - 2 \(.*ParametricLIFNode\).*fix: construct"),
    ("QIF", _seq(*_lin(neuron.QIFNode())), _NO_CUBA.format("QIFNode", "quadratic", "QIFNode")),
    ("EIF", _seq(*_lin(neuron.EIFNode())), _NO_CUBA.format("EIFNode", "exponential", "EIFNode")),
    ("Izhikevich", _seq(*_lin(neuron.IzhikevichNode())),
     _NO_CUBA.format("IzhikevichNode", "adaptation", "IzhikevichNode")),
    ("LIAF", _seq(*_lin(neuron.LIAFNode(act=torch.relu, threshold_related=False))),
     _NO_CUBA.format("LIAFNode", "analog activation", "LIAFNode")),
    ("KLIF", _seq(*_lin(neuron.KLIFNode())), _NO_CUBA.format("KLIFNode", "ReLU", "KLIFNode")),
    ("GatedLIF", _seq(*_lin(neuron.GatedLIFNode(T=4))), _NO_CUBA.format("GatedLIFNode", "gates", "GatedLIFNode")),
    ("non-spiking LIF", _seq(*_lin(neuron.NonSpikingLIFNode())),
     _NO_CUBA.format("NonSpikingLIFNode", "membrane potential, not spikes", "NonSpikingLIFNode")),
    ("parallel spiking neuron", _seq(*_lin(neuron.IFNode(), neuron.PSN(T=4))),
     r"(?s)no Loihi CUBA equivalent \(PSN: parallel spiking neuron.*- 3 \(.*psn.PSN\)"),
    ("subclass of a neuron", _seq(*_lin(_MyLIF(decay_input=False))),
     r"(?s)a subclass of LIFNode \(_MyLIF\) that changes its dynamics: it overrides neuronal_charge, so it is not "
     r"a LIFNode:\n  - 2 \(tests.test_failcases._MyLIF\)"
     r".*fix: use LIFNode itself"),
    ("element-wise recurrent container",
     _seq(*_lin(layer.ElementWiseRecurrentContainer(neuron.IFNode(), element_wise_function=lambda y, x: x + y))),
     r"(?s)a recurrent container: its output feeds back into its input.*\n  - 2 \(.*ElementWiseRecurrentContainer\)"
     r".*fix: remove the recurrence"),
    ("linear recurrent container",
     _seq(*_lin(layer.LinearRecurrentContainer(neuron.IFNode(), 3, 3, bias=False))),
     r"(?s)a recurrent container.*\n  - 2 \(.*LinearRecurrentContainer\).*fix: remove the recurrence"),
    ("synapse filter",
     _seq(*_lin(layer.SynapseFilter(tau=5.0), neuron.IFNode())),
     r"(?s)synaptic current filter.*\n  - 2 \(.*SynapseFilter\).*fix: remove it, or use neuron.CUBALIFNode"),
    ("SpikingJelly's Lava scale changed",
     _seq(*_lin(_with(neuron.IFNode(), lava_s_cale=128))),
     r"(?s)lava_s_cale=128.*netx's CUBA blocks use scale 64:\n  - 2 \(.*IFNode\).*fix: leave lava_s_cale at 1 << 6"),
    ("CubaLIFNode threshold off Loihi's grid",
     _seq(*_lin(lava_exchange.CubaLIFNode(0.5, 0.5, v_threshold=0.3))),
     r"(?s)CubaLIFNode with v_threshold=0.3, not a multiple of 1/64: it fires from voltage 1229/4096, Loihi "
     r"\(vThMant=19\) from 1217/4096:\n  - 2 \(.*CubaLIFNode\)"
     r".*fix: use a multiple of 1/64, e.g. v_threshold=0.296875"),
    ("CubaLIFNode scale",
     _seq(*_lin(lava_exchange.CubaLIFNode(0.5, 0.5, scale=1 << 7))),
     r"(?s)CubaLIFNode with scale=128: netx's CUBA blocks use scale 64:\n  - 2 .*fix: construct it with scale=1 << 6"),
    ("CubaLIFNode norm",
     _seq(*_lin(lava_exchange.CubaLIFNode(0.5, 0.5, norm=lava_exchange.BatchNorm2d(3)))),
     r"(?s)CubaLIFNode with norm=BatchNorm2d.*netx does not export:\n  - 2 .*fix: construct it with norm=None"),
    ("CubaLIFNode per-neuron decay",
     _seq(*_lin(lava_exchange.CubaLIFNode(torch.tensor([0.5, 0.25, 0.125]), 0.5))),
     r"(?s)one current_decay per neuron \(shape \(3,\)\): Loihi's CUBA layers share one decay:\n  - 2 "),
    ("CubaLIFNode after an average pool",
     _seq(layer.Conv2d(1, 2, 3, padding=1, bias=False), neuron.IFNode(), layer.AvgPool2d(2),
          lava_exchange.CubaLIFNode(1.0, 0.0)),
     r"(?s)CubaLIFNode fed by an average pool.*\n  - 3 \(.*CubaLIFNode\)"
     r".*fix: put a conv or linear layer after the pool"),
    ("BatchNorm with a shift",
     _seq(layer.Conv2d(1, 2, 3, bias=False), _bn(layer.BatchNorm2d(2), beta=0.1), neuron.IFNode()),
     r"(?s)BatchNorm with a non-zero shift .*a bias, which fxlava compiles as the neuron's bias current only when "
     r"asked:\n  - 1 \(.*BatchNorm2d\).*fix: 2 of 2 channels have a shift.*bias=\"current\".*affine=False"),
    ("BatchNorm with a running mean",
     _seq(*_lin(_bn(layer.BatchNorm1d(3, affine=False), mean=0.5), neuron.IFNode())),
     r"(?s)non-zero shift.*\n  - 2 \(.*BatchNorm1d\).*fix: 3 of 3 channels have a shift \(largest \|shift\| 0.5"),
    ("BatchNorm not after a synapse",
     _seq(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(), layer.BatchNorm2d(2, affine=False), layer.Flatten(),
          layer.Linear(72, 3, bias=False), neuron.IFNode()),
     r"(?s)BatchNorm not directly after a conv or linear synapse.*\n  - 2 \(.*BatchNorm2d\)"
     r".*fix: it comes after 1 \(IFNode\); move it right after the Conv2d/Linear"),
    ("BatchNorm without running statistics",
     _seq(layer.Conv2d(1, 2, 3, bias=False), layer.BatchNorm2d(2, track_running_stats=False), neuron.IFNode()),
     r"(?s)BatchNorm without running statistics \(track_running_stats=False\).*\n  - 1 .*"
     r"fix: construct it with track_running_stats=True"),
    ("per-time-step BatchNorm",
     _seq(layer.Conv2d(1, 2, 3, bias=False), layer.TemporalEffectiveBatchNorm2d(T=4, num_features=2), neuron.IFNode()),
     r"(?s)scales every time step differently \(TemporalEffectiveBatchNorm2d\).*\n  - 1 .*fix: use layer.BatchNorm2d"),
    ("LayerNorm",
     _seq(*_lin(layer.SeqToANNContainer(nn.LayerNorm(3)), neuron.IFNode())),
     r"(?s)normalisation with no fixed per-channel scale \(LayerNorm\).*\n  - 2.0 \(.*LayerNorm\).*fix: remove it"),
    ("branch into two neurons",
     _TwoHeads(),
     r"(?s)a merge by mul\(\), which is not linear in the spikes.*\n  - <mul> \(function mul\)"
     r"\n      at .*return self.a\(y\) \* self.b\(y\)\n      fix: merge the paths with an addition"),
    ("all at once, grouped by reason, in model order",
     _seq(layer.Conv2d(1, 2, 3, bias=False), _bn(layer.BatchNorm2d(2), mean=1.0), neuron.QIFNode(),
          layer.Conv2d(2, 2, 3, bias=False), neuron.LIFNode(v_reset=None), layer.Flatten(),
          layer.Linear(32, 3, bias=False), neuron.EIFNode()),
     r"(?s)fxlava cannot compile this model: 4 unsupported items\..*"
     r"\n\na BatchNorm with a non-zero shift.*\n  - 1 .*"
     r"\n\na neuron with no Loihi CUBA equivalent \(QIFNode.*\n  - 2 .*"
     r"\n\na soft-reset neuron.*\n  - 4 .*"
     r"\n\na neuron with no Loihi CUBA equivalent \(EIFNode.*\n  - 7 "),
]


@pytest.mark.parametrize("name,model,pattern", NEURON_BN_CASES, ids=[c[0] for c in NEURON_BN_CASES])
def test_neuron_or_norm_refused_with_clear_message(name, model, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern) as info:
        fxlava.compile(model, X)
    assert len({i.node for i in info.value.issues}) == len(info.value.issues)  # each module reported once


def test_error_lists_each_issue_with_path_and_source_line():
    """Without lower_residuals, fuse_blocks names the branch: its fork, both paths and the merge, in one item."""
    pipeline = fxlava.default_pipeline().remove("lower_residuals")
    with pytest.raises(fxlava.UnsupportedModelError,
                       match=r"(?s)a residual connection \(a branch merged again by an add\): netx runs only a straight chain "
                             r"of layers:\n  - <x>\n      fix: the output "
                             r"of the input x feeds 2 paths, merged again by add\(\) \(at .*test_failcases.py:\d+: "
                             r"return self.sn\(self.conv\(x\)\) \+ x\):\n +path 1: conv -> sn \(at "
                             r".*test_failcases.py.*\n +path 2: the fork's output itself") as info:
        fxlava.compile(Residual(), X, pipeline=pipeline)
    text = str(info.value)
    assert "test_failcases.py" in text and "return self.sn(self.conv(x)) + x" in text
    assert len(info.value.issues) == 1  # one branch: its fork, both paths and the merge in one item


class _SeqToAnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)  # biased: refused by default
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x):
        return self.sn(functional.seq_to_ann_forward(x, self.conv))


def test_a_refusal_names_the_users_line_not_spikingjellys_plumbing():
    """An op run through functional.seq_to_ann_forward (or a container) is named at the user's call."""
    with pytest.raises(fxlava.UnsupportedModelError, match=r"a bias[\s\S]*- conv \(torch.nn.modules.conv.Conv2d\)\n"
                                                           r" +at .*test_failcases.py:\d+: return self.sn\("
                                                           r"functional.seq_to_ann_forward\(x, self.conv\)\)"):
        fxlava.compile(_SeqToAnn(), torch.zeros(4, 2, 2, 8, 8))


def test_bad_example_input():
    with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
        fxlava.compile(_seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.IFNode()), torch.zeros(8, 8))
