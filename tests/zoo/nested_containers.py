"""Containers in containers: an nn.ModuleList iterated in forward, nn.Sequential in nn.Sequential in a custom
module, SpikingJelly containers holding nested nn.Sequential, a max pool inside a container."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "maxpool", "conv", "flatten", "dense"]}


class Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(layer.Conv2d(cin, cout, 3, padding=1, bias=False, step_mode="m"), nn.Identity()),
            neuron.IFNode(step_mode="m"),
        )

    def forward(self, x):
        return self.body(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([Stage(2, 4), Stage(4, 6)])
        self.pool = layer.SeqToANNContainer(nn.Sequential(nn.Sequential(nn.MaxPool2d(2)), nn.Identity()))
        self.tail = nn.Sequential(
            layer.SeqToANNContainer(nn.Sequential(nn.Conv2d(6, 6, 3, groups=3, bias=False), nn.Dropout(0.1))),
            layer.MultiStepContainer(neuron.LIFNode(tau=2.0, decay_input=False)),
            layer.SeqToANNContainer(nn.Flatten(), nn.Linear(6 * 2 * 2, 5, bias=False)),
            layer.MultiStepContainer(nn.Sequential(neuron.IFNode())),
        )

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.tail(self.pool(x))


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 8, 8, generator=torch.Generator().manual_seed(25)) < 0.3).float()


def build():
    return lively(Net(), example_input())
