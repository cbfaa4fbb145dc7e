"""SpikingJelly's own parametric_lif_net.MNISTNet (128 channels, max pools) in Lava, every spike against lava-dl.

Its max pools become OR layers, grouped convs with 128 groups: before fxlava.compat widened Lava's
int8 conv fields, Lava ran this network and output no spike at all.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron
from spikingjelly.activation_based.model import parametric_lif_net

import fxlava
from tests.zoo._lively import lively


def mnistnet_without_bias_or_batchnorm(channels: int = 128) -> nn.Module:
    """SpikingJelly's MNISTNet, built by its own constructor, with its BatchNorms dropped and its linears unbiased."""
    net = parametric_lif_net.MNISTNet(channels=channels, spiking_neuron=neuron.ParametricLIFNode,
                                      init_tau=2.0, decay_input=False, detach_reset=True)
    seq = net.conv_fc
    for i, m in enumerate(seq):
        if isinstance(m, nn.BatchNorm2d):
            seq[i] = nn.Identity()
        elif isinstance(m, nn.Linear) and m.bias is not None:
            seq[i] = layer.Linear(m.in_features, m.out_features, bias=False)
    functional.set_step_mode(net, "m")
    return net


def example_input(T: int = 4, N: int = 2) -> torch.Tensor:
    return (torch.rand(T, N, 1, 28, 28, generator=torch.Generator().manual_seed(7)) < 0.3).float()


@pytest.mark.lava
@pytest.mark.slow
def test_sj_mnistnet_runs_in_lava_as_in_lava_dl(tmp_path):
    x = example_input()
    model = lively(mnistnet_without_bias_or_batchnorm(), x, rate=0.1)
    net = fxlava.compile(model, x)
    assert [b.kind for b in net.blocks] == ["conv", "maxpool", "conv", "maxpool", "flatten", "dense", "dense"]
    assert net.lava_dl[1].synapse.groups == 128
    assert net.readout.ops  # the VotingLayer runs on the host
    path = net.export_hdf5(tmp_path / "mnistnet.net")
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    got = fxlava.run_lava(path, xin)
    assert expected.sum() > 0
    assert torch.equal(got, expected), f"Lava {int(got.sum())} spikes, lava-dl {int(expected.sum())}"
