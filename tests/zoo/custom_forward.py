"""A class with its own forward: SeqToANNContainer synapses, x.flatten(2), LIF neurons."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron, surrogate

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = layer.SeqToANNContainer(nn.Conv2d(2, 6, 3, padding=1, bias=False))
        self.sn1 = neuron.LIFNode(tau=2.0, decay_input=False, step_mode="m", surrogate_function=surrogate.ATan())
        self.conv2 = layer.SeqToANNContainer(nn.Conv2d(6, 6, 3, stride=2, bias=False))
        self.sn2 = neuron.IFNode(v_threshold=0.75, step_mode="m")
        self.fc = layer.SeqToANNContainer(nn.Linear(6 * 4 * 4, 5, bias=False))
        self.sn3 = neuron.IFNode(step_mode="m", detach_reset=True)

    def forward(self, x):
        x = self.sn1(self.conv1(x))
        x = self.sn2(self.conv2(x))
        x = x.flatten(2)
        return self.sn3(self.fc(x))


def example_input(T=10, N=3):
    return (torch.rand(T, N, 2, 10, 10, generator=torch.Generator().manual_seed(2)) < 0.4).float()


def build():
    return lively(Net(), example_input())
