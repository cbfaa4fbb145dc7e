"""An LIF MLP with thresholds other than 1 and different taus."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

from tests.zoo._lively import lively

EXPECT = {"blocks": ["flatten", "dense", "dense", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Flatten(),
        layer.Linear(36, 32, bias=False), neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=0.5),
        layer.Linear(32, 16, bias=False), neuron.LIFNode(tau=50.0, decay_input=False,
                                                         surrogate_function=surrogate.ATan()),
        layer.Linear(16, 4, bias=False), neuron.LIFNode(tau=10.0, decay_input=False, v_threshold=1.5),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=16, N=3):
    return (torch.rand(T, N, 1, 6, 6, generator=torch.Generator().manual_seed(5)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
