"""An average pool feeding a neuron: a sum-pool block (grouped ones conv) with the threshold x k^2."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "sumpool", "flatten", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(),
        layer.AvgPool2d(2), neuron.IFNode(v_threshold=0.5),
        layer.Flatten(), layer.Linear(4 * 4 * 4, 6, bias=False), neuron.LIFNode(tau=4.0, decay_input=False),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 8, 8, generator=torch.Generator().manual_seed(4)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
