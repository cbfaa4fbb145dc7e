"""BatchNorms with a shift (trained running statistics, affine or not) folded into biases, as Loihi bias
currents: conv -> BN2d -> LIF -> max pool, biased conv -> BN2d(affine=False) -> IF, biased linear -> BN1d -> LIF."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively
from tests.zoo._trained import trained_batchnorm, trained_biases

EXPECT = {"blocks": ["conv", "maxpool", "conv", "flatten", "dense"], "options": {"bias": "current"}}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), trained_batchnorm(layer.BatchNorm2d(8), 1),
        neuron.LIFNode(tau=2.0, decay_input=False), layer.MaxPool2d(2),
        layer.Conv2d(8, 8, 3, padding=1), trained_batchnorm(layer.BatchNorm2d(8, affine=False), 2),
        neuron.IFNode(), layer.Flatten(),
        layer.Linear(8 * 6 * 6, 10), trained_batchnorm(layer.BatchNorm1d(10), 3), neuron.LIFNode(tau=3.0),
    )
    functional.set_step_mode(net, "m")
    return trained_biases(net, 7).eval()  # running statistics, also while lively() tunes the weights


def example_input(T=10, N=2):
    return (torch.rand(T, N, 2, 12, 12, generator=torch.Generator().manual_seed(32)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
