"""BatchNorms right after synapses, folded into their weights (eval mode, no shift): SJ and torch forms."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

from tests.zoo._lively import lively

EXPECT = {"blocks": ["conv", "conv", "flatten", "dense"]}


def _statistics(bn, seed):
    """Running statistics and gamma as after training; beta and running_mean 0, so no shift."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.2)
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 1.5 + 0.25)
    return bn


def build_model():
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), _statistics(layer.BatchNorm2d(4, affine=False), 1),
        neuron.IFNode(),
        layer.SeqToANNContainer(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), _statistics(nn.BatchNorm2d(6), 2)),
        neuron.LIFNode(tau=2.0),
        layer.Flatten(),
        layer.Linear(6 * 4 * 4, 5, bias=False), _statistics(layer.BatchNorm1d(5, eps=1e-3), 3),
        neuron.LIFNode(tau=4.0, decay_input=False),
    )
    functional.set_step_mode(net, "m")
    return net.eval()  # running statistics, also while lively() tunes the weights


def example_input(T=10, N=2):
    return (torch.rand(T, N, 1, 8, 8, generator=torch.Generator().manual_seed(24)) < 0.3).float()


def build():
    return lively(build_model(), example_input())
