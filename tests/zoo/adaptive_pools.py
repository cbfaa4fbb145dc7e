"""Adaptive pools with evenly dividing sizes: AdaptiveMaxPool2d of spikes, AdaptiveAvgPool2d((1, 1)) before the classifier."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "maxpool", "conv", "flatten", "dense"]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            layer.Conv2d(2, 6, 3, padding=1, bias=False), neuron.IFNode(),
            layer.SeqToANNContainer(nn.AdaptiveMaxPool2d((6, 4))),  # 12x8 -> 6x4: windows of 2x2
            layer.Conv2d(6, 8, 3, padding=1, bias=False), neuron.LIFNode(tau=2.0),
            layer.AdaptiveAvgPool2d(1),  # global average: merged into the classifier's weights
        )
        self.classifier = nn.Sequential(layer.Flatten(), layer.Linear(8, 5, bias=False), neuron.IFNode())
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.classifier(self.features(x))


def example_input(T=8, N=3):
    return (torch.rand(T, N, 2, 12, 8, generator=torch.Generator().manual_seed(7)) < 0.4).float()


def build():
    return lively(Net(), example_input())
