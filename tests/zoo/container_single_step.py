"""A model left in single-step mode: nested nn.Sequential, StepModeContainer('s'), a max pool of spikes
(functional and module) and a depthwise conv, run one time step per call."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "maxpool", "conv", "maxpool", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), neuron.IFNode()),
            nn.MaxPool2d(2),
            layer.StepModeContainer(True, "s", nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
                                    neuron.LIFNode(tau=2.0, decay_input=False)),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 3, bias=False), neuron.IFNode())

    def forward(self, x):  # x: [N, C, H, W], one time step
        x = F.max_pool2d(self.features(x), 2)
        return self.classifier(x)


def example_input(T=12, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(27)) < 0.35).float()


def build():
    return lively(Net(), example_input())
