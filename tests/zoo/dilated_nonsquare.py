"""Non-square input and kernels, per-dimension stride/padding/dilation tuples, padding='same' and 'valid'."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "conv", "conv", "flatten", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 4, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), bias=False),  # 9x14 -> 7x7
        neuron.IFNode(),
        layer.Conv2d(4, 4, (3, 5), padding="same", dilation=(2, 1), groups=2, bias=False), neuron.IFNode(),
        layer.Conv2d(4, 6, (1, 3), stride=(2, 1), padding=0, padding_mode="reflect", bias=False),  # 7x7 -> 4x5
        neuron.LIFNode(tau=2.0, decay_input=False),
        layer.Conv2d(6, 6, (2, 3), padding="valid", dilation=(1, 2), bias=False), neuron.IFNode(),  # -> 3x1
        layer.Flatten(), layer.Linear(6 * 3 * 1, 4, bias=False), neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 9, 14, generator=torch.Generator().manual_seed(24)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
