"""Thresholds other than 1 on every neuron type fxlava compiles, also where a pool scales them."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, lava_exchange, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "sumpool", "conv", "flatten", "dense", "dense", "dense", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), neuron.IFNode(v_threshold=0.5),
        layer.AvgPool2d(2), neuron.LIFNode(tau=2.0, v_threshold=0.25),
        layer.Conv2d(4, 4, 3, padding=1, bias=False), neuron.LIFNode(tau=3.0, decay_input=False, v_threshold=1.75),
        layer.Flatten(),
        layer.Linear(4 * 4 * 4, 12, bias=False), neuron.ParametricLIFNode(init_tau=2.5, v_threshold=2.0),
        layer.Linear(12, 10, bias=False), neuron.CUBALIFNode(c_decay=0.5, v_decay=0.75, v_threshold=0.625),
        layer.Linear(10, 8, bias=False), lava_exchange.CubaLIFNode(0.125, 0.25, v_threshold=3.25),
        layer.Linear(8, 4, bias=False), neuron.IFNode(v_threshold=0.078125),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=12, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(25)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
