"""SpikingJelly's default LIF (decay_input=True): the input's 1/tau goes into the weights, or the threshold.

conv -> LIF: the conv's weights x 1/tau; pool -> LIF: the sum pool's weights stay ones, the
threshold x k^2 tau; pool -> conv -> LIF: the merged conv's weights x 1/tau.
"""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "sumpool", "conv", "flatten", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.LIFNode(tau=2.0),
        layer.AvgPool2d(2), neuron.LIFNode(tau=3.0, v_threshold=0.25),
        layer.AvgPool2d(2), layer.Conv2d(4, 4, 3, padding=1, bias=False),
        neuron.LIFNode(tau=5.0, surrogate_function=surrogate.ATan(), detach_reset=True),
        layer.Flatten(), layer.Linear(4 * 4 * 4, 6, bias=False), neuron.LIFNode(tau=4.0, v_threshold=0.75),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=12, N=2):
    return (torch.rand(T, N, 2, 16, 16, generator=torch.Generator().manual_seed(21)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
