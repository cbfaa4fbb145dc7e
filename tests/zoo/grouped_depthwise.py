"""Depthwise and grouped convs (with a channel multiplier), plain torch.nn layers in SeqToANNContainers."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "conv", "conv", "flatten", "dense"]}


def build_model():
    S = layer.SeqToANNContainer
    net = nn.Sequential(
        S(nn.Conv2d(2, 8, 3, padding=1, bias=False)), neuron.IFNode(),
        S(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)), neuron.IFNode(v_threshold=0.5),   # depthwise
        S(nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=False)), neuron.LIFNode(tau=2.0, decay_input=False),
        S(nn.Conv2d(12, 24, 1, groups=12, bias=False)), neuron.IFNode(),                         # x2 per channel
        S(nn.Flatten(), nn.Linear(24 * 4 * 4, 6, bias=False)), neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 10, 10, generator=torch.Generator().manual_seed(23)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
