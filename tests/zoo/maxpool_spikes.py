"""Max pools of spikes: layer.MaxPool2d, an overlapping padded F.max_pool2d, and a dilated stride-1 pool."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron, surrogate

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "maxpool", "conv", "maxpool", "maxpool", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = layer.Conv2d(2, 6, 3, padding=1, bias=False, step_mode="m")
        self.sn1 = neuron.IFNode(step_mode="m", surrogate_function=surrogate.ATan())
        self.pool1 = layer.MaxPool2d(2, step_mode="m")
        self.conv2 = layer.Conv2d(6, 8, 3, padding=1, bias=False, step_mode="m")
        self.sn2 = neuron.LIFNode(tau=2.0, decay_input=False, step_mode="m")
        self.pool3 = layer.MaxPool2d(2, stride=1, dilation=2, step_mode="m")
        self.fc = layer.Linear(8 * 2 * 2, 5, bias=False, step_mode="m")
        self.sn3 = neuron.IFNode(step_mode="m")

    def forward(self, x):
        T, N = x.shape[0], x.shape[1]
        x = self.pool1(self.sn1(self.conv1(x)))
        x = self.sn2(self.conv2(x))
        x = F.max_pool2d(x.flatten(0, 1), 3, stride=2, padding=1)  # overlapping windows, -inf padding
        x = self.pool3(x.view(T, N, 8, 4, 4))
        return self.sn3(self.fc(x.flatten(2)))


def example_input(T=10, N=2):
    return (torch.rand(T, N, 2, 16, 16, generator=torch.Generator().manual_seed(21)) < 0.3).float()


def build():
    return lively(Net(), example_input())
