"""torch.nn layers driven by functional.seq_to_ann_forward (flatten(0, 1) / unflatten), nn.Linear on [T, N, F], a rate readout."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.sn1 = neuron.LIFNode(tau=4.0, step_mode="m")
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.sn2 = neuron.IFNode(step_mode="m")
        self.fc = nn.Linear(8 * 5 * 5, 6, bias=False)  # acts on the last dimension of [T, N, F]
        self.sn3 = neuron.IFNode(step_mode="m")

    def forward(self, x):
        x = self.sn1(functional.seq_to_ann_forward(x, self.conv1))
        x = self.sn2(functional.seq_to_ann_forward(x, self.conv2))
        return self.sn3(self.fc(x.flatten(2))).mean(0)


def example_input(T=6, N=3):
    return (torch.rand(T, N, 1, 10, 10, generator=torch.Generator().manual_seed(5)) < 0.4).float()


def build():
    return lively(Net(), example_input())
