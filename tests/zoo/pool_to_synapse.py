"""Average pools that feed synapses: pool -> conv (merged) and pool -> flatten -> linear (merged)."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), neuron.IFNode(),
        layer.AvgPool2d(2), layer.Conv2d(4, 6, 3, padding=1, bias=False), neuron.IFNode(),
        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(6 * 3 * 3, 7, bias=False), neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 1, 12, 12, generator=torch.Generator().manual_seed(3)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
