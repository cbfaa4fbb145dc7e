"""The tutorial's MNIST CSNN as plain SpikingJelly layers (multi-step)."""
import torch

from fxlava.examples.mnist_csnn import MNISTNet
from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "conv", "conv", "flatten", "dense", "dense"]}


def example_input(T=8, N=2):
    return (torch.rand(T, N, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()


def build():
    return lively(MNISTNet(channels=8), example_input())
