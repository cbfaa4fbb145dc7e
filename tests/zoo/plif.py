"""ParametricLIFNode, both decay_input settings, with trained (non-initial) time constants frozen at compile."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "flatten", "dense", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), neuron.ParametricLIFNode(init_tau=2.0),
        layer.Flatten(),
        layer.Linear(4 * 8 * 8, 16, bias=False), neuron.ParametricLIFNode(init_tau=3.0, decay_input=False,
                                                                         v_threshold=1.25),
        layer.Linear(16, 5, bias=False), neuron.ParametricLIFNode(init_tau=8.0, v_threshold=0.5),
    )
    # as after training: each w moved away from its initial value
    with torch.no_grad():
        for k, plif in enumerate(m for m in net if isinstance(m, neuron.ParametricLIFNode)):
            plif.w.add_(0.37 * (k + 1))
    functional.set_step_mode(net, "m")
    return net


def example_input(T=12, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(22)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
