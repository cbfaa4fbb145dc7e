"""A small SEW ResNet (cnf='ADD'), written as SpikingJelly's sew_resnet writes its BasicBlock: skip paths as relays.

Three blocks, one with a 1x1 stride-2 downsample and a neuron of its own; a sum of spikes feeding a conv
(the merge becomes that conv's synapse over both sources), and a last sum that feeds the output
(summed on the host, in net.readout).
"""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import grid_weights


EXPECT = {"blocks": ["conv"] * 8}


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, spiking_neuron=neuron.IFNode, **kwargs):
        super().__init__()
        self.conv1 = layer.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.sn1 = spiking_neuron(**kwargs)
        self.conv2 = layer.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.sn2 = spiking_neuron(**kwargs)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(layer.Conv2d(inplanes, planes, 1, stride=stride, bias=False))
            self.downsample_sn = spiking_neuron(**kwargs)

    def forward(self, x):
        identity = x
        out = self.sn1(self.conv1(x))
        out = self.sn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample_sn(self.downsample(x))
        return identity + out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.sn1 = neuron.IFNode()
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 8, stride=2))
        self.conv2 = layer.Conv2d(8, 6, 3, padding=1, bias=False)
        self.sn2 = neuron.LIFNode(tau=2.0)
        self.layer2 = BasicBlock(6, 6, spiking_neuron=neuron.LIFNode, tau=2.0)

    def forward(self, x):
        x = self.layer1(self.sn1(self.conv1(x)))
        return self.layer2(self.sn2(self.conv2(x)))


SEED = 1


def build_model():
    net = Net()
    functional.set_step_mode(net, "m")
    return net


def example_input(T=8, N=2):
    return (torch.rand(T, N, 2, 12, 12, generator=torch.Generator().manual_seed(41)) < 0.3).float()


def build():
    """Seeded weights on lava-dl's grid, biased positive so that every layer fires (lively() takes minutes here)."""
    return grid_weights(build_model(), SEED, -12, 15)
