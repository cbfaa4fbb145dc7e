"""A forward that pools with F.avg_pool2d on [T*N, ...] and reshapes back (the SeqToANN idiom by hand)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = layer.Conv2d(1, 4, 3, padding=1, bias=False, step_mode="m")
        self.sn1 = neuron.IFNode(step_mode="m")
        self.conv2 = layer.Conv2d(4, 4, 3, padding=1, bias=False, step_mode="m")
        self.sn2 = neuron.IFNode(step_mode="m")
        self.fc = layer.Linear(4 * 2 * 2, 5, bias=False, step_mode="m")
        self.sn3 = neuron.IFNode(step_mode="m")

    def forward(self, x):
        T, N = x.shape[0], x.shape[1]
        x = self.sn1(self.conv1(x))
        y = F.avg_pool2d(x.flatten(0, 1), 2)
        x = self.sn2(self.conv2(y.view(T, N, 4, 4, 4)))
        x = F.avg_pool2d(x.flatten(0, 1), 2)
        x = torch.flatten(x, 1).reshape(T, N, -1)
        return self.sn3(self.fc(x))


def example_input(T=8, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(7)) < 0.3).float()


def build():
    return lively(Net(), example_input())
