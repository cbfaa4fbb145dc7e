"""The MNIST CSNN of SpikingJelly's Lava tutorial, written as plain SpikingJelly layers (no BlockContainer)."""
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron, surrogate


def _if():
    return neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)


class MNISTNet(nn.Module):
    """conv-IF x4 (28 -> 14 -> 7), flatten, linear-IF x2; multi-step, no bias, as in the tutorial."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv_fc = nn.Sequential(
            layer.Conv2d(1, channels, kernel_size=3, stride=1, padding=1, bias=False), _if(),
            layer.Conv2d(channels, channels, kernel_size=2, stride=2, bias=False), _if(),
            layer.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False), _if(),
            layer.Conv2d(channels, channels, kernel_size=2, stride=2, bias=False), _if(),
            layer.Flatten(),
            layer.Linear(channels * 7 * 7, 128, bias=False), _if(),
            layer.Linear(128, 10, bias=False), _if(),
        )
        from spikingjelly.activation_based import functional

        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.conv_fc(x)


def build(channels: int = 16) -> MNISTNet:
    """The tutorial's network (the CLI's MODEL entry point)."""
    return MNISTNet(channels)
