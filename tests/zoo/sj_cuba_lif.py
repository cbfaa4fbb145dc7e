"""SpikingJelly's own fixed-point CUBA neuron (lava_exchange.CubaLIFNode) used directly in a model."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, lava_exchange, layer, surrogate

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "flatten", "dense", "dense"]}


def build_model():
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1, bias=False),
        lava_exchange.CubaLIFNode(current_decay=0.25, voltage_decay=0.03),
        layer.Flatten(),
        layer.Linear(4 * 6 * 6, 12, bias=False),
        lava_exchange.CubaLIFNode(current_decay=1.0, voltage_decay=0.1, v_threshold=0.75, requires_grad=True,
                                  surrogate_function=surrogate.ATan(), detach_reset=True),
        layer.Linear(12, 5, bias=False),
        lava_exchange.CubaLIFNode(current_decay=0.5, voltage_decay=0.0, v_threshold=1.5),
    )
    functional.set_step_mode(net, "m")
    return net


def example_input(T=16, N=2):
    return (torch.rand(T, N, 2, 6, 6, generator=torch.Generator().manual_seed(23)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
