"""Models fxlava must refuse, each with a message that names every offending module and a fix."""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

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


CASES = [
    ("two biased layers",
     _seq(layer.Conv2d(1, 2, 3, bias=True), neuron.IFNode(), layer.Flatten(), layer.Linear(72, 3), neuron.IFNode()),
     r"(?s)synapse with a bias.*- 0 .*Conv2d.*bias=False.*- 3 .*Linear"),
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
     _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.ParametricLIFNode()),
     r"(?s)neuron fxlava does not compile \(ParametricLIFNode\).*- 2 "),
    ("decay_input LIF (until the coverage work)",
     _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.LIFNode(decay_input=True)),
     r"(?s)decay_input=True.*- 2 .*LIFNode"),
    ("residual branch", Residual(), r"(?s)a branch.*a merge"),
    ("everything at once",
     _seq(layer.Conv2d(1, 2, 3, bias=True), neuron.IFNode(v_reset=None), nn.ReLU(), layer.Flatten(),
          layer.Linear(72, 3, bias=True), neuron.IFNode()),
     r"(?s)4 unsupported items.*ReLU.*soft-reset.*- 0 .*- 4 "),
    ("synapse without neuron",
     _seq(layer.Flatten(), layer.Linear(64, 8, bias=False), layer.Linear(8, 3, bias=False), neuron.IFNode()),
     r"(?s)synapse not followed by a spiking neuron.*- 1 "),
]


@pytest.mark.parametrize("name,model,pattern", CASES, ids=[c[0] for c in CASES])
def test_refused_with_clear_message(name, model, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern):
        fxlava.compile(model, X)


def test_error_lists_each_issue_with_path_and_source_line():
    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(Residual(), X)
    text = str(info.value)
    assert "test_failcases.py" in text and "return self.sn(self.conv(x)) + x" in text
    assert len(info.value.issues) == 2


def test_bad_example_input():
    with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
        fxlava.compile(_seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.IFNode()), torch.zeros(8, 8))
