"""Max pools at both ends: of the (binary) network input, and as the last layer; ceil_mode where it is exact."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["maxpool", "conv", "maxpool", "conv", "maxpool"]}


def build_model():
    net = nn.Sequential(
        layer.MaxPool2d(2, stride=1),
        layer.Conv2d(2, 4, 3, bias=False), neuron.IFNode(v_threshold=0.75),
        layer.MaxPool2d(3, stride=2, ceil_mode=True),  # 7x7 -> 3x3 with or without ceil_mode
        layer.Conv2d(4, 6, 3, padding=1, bias=False), neuron.LIFNode(tau=3.0, decay_input=False),
        layer.MaxPool2d((3, 2), stride=(1, 2), padding=(1, 0)),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 10, 10, generator=torch.Generator().manual_seed(22)) < 0.25).float()


def build():
    return lively(build_model(), example_input())
