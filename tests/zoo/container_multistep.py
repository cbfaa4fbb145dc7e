"""SpikingJelly's step containers in a multi-step model: StepModeContainer (stateless and stateful),
MultiStepContainer holding single-step synapse and neuron, SeqToANNContainer; neurons in 's' mode inside."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "maxpool", "conv", "flatten", "dense"]}


def build_model():
    return nn.Sequential(
        layer.StepModeContainer(False, "m", nn.Conv2d(1, 4, 3, padding=1, bias=False)),
        neuron.IFNode(step_mode="m"),
        layer.MultiStepContainer(nn.Conv2d(4, 4, 3, padding=1, bias=False),
                                 neuron.LIFNode(tau=2.0, decay_input=False)),
        layer.StepModeContainer(False, "m", nn.MaxPool2d(2)),
        layer.StepModeContainer(True, "m", nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), neuron.IFNode()),
        layer.SeqToANNContainer(nn.Flatten()),
        layer.StepModeContainer(False, "m", nn.Linear(6 * 2 * 2, 4, bias=False)),
        layer.StepModeContainer(True, "m", neuron.IFNode()),
    )


def example_input(T=8, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(26)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
