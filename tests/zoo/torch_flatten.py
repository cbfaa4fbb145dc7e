"""Multi-step model with torch.nn.Flatten(start_dim=2) on [T, N, C, H, W] and torch.nn.Linear on [T, N, F]."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "flatten", "dense", "dense"]}


def build_model():
    return nn.Sequential(
        layer.Conv2d(1, 3, 3, stride=2, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"),
        nn.Flatten(start_dim=2),
        nn.Linear(3 * 3 * 3, 12, bias=False), neuron.LIFNode(tau=3.0, decay_input=False, step_mode="m"),
        nn.Dropout(0.2),
        nn.Linear(12, 4, bias=False), neuron.IFNode(step_mode="m"),
    )


def example_input(T=8, N=2):
    return (torch.rand(T, N, 1, 7, 7, generator=torch.Generator().manual_seed(8)) < 0.35).float()


def build():
    return lively(build_model(), example_input())
