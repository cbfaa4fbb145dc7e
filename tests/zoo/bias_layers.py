"""Biased convs and linears as Loihi bias currents: conv -> IF, pool -> conv (merged, bias kept) -> LIF with
decay_input (bias scaled by 1/tau with the weights), pool -> flatten -> linear (merged) -> PLIF."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively
from tests.zoo._trained import trained_biases

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"], "options": {"bias": "current"}}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 6, 3, padding=1), neuron.IFNode(),
        layer.AvgPool2d(2), layer.Conv2d(6, 8, 3, padding=1), neuron.LIFNode(tau=2.0),
        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(8 * 3 * 3, 10), neuron.ParametricLIFNode(init_tau=3.0),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=10, N=2):
    return (torch.rand(T, N, 2, 12, 12, generator=torch.Generator().manual_seed(31)) < 0.3).float()


def build():
    return lively(trained_biases(build_model(), 5), example_input())
