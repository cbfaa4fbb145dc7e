"""A model left in single-step mode, with plain torch.nn layers and torch.flatten(x, 1) in forward."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, bias=False)
        self.if1 = neuron.IFNode()
        self.fc = nn.Linear(4 * 4 * 4, 3, bias=False)
        self.if2 = neuron.IFNode()

    def forward(self, x):  # x: [N, C, H, W], one time step
        x = self.if1(self.conv(x))
        return self.if2(self.fc(torch.flatten(x, 1)))


def example_input(T=12, N=2):
    return (torch.rand(T, N, 1, 9, 9, generator=torch.Generator().manual_seed(6)) < 0.35).float()


def build():
    return lively(Net(), example_input())
