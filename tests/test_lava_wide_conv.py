"""Lava runs convs of any width: sum pools and OR pools are grouped convs with groups = channels.

Lava's conv process model stored groups, kernel size, stride, padding and dilation as int8; at 128
channels a pool wrapped to groups = -128 and Lava output no spike at all. fxlava.compat widens them.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import layer, neuron

import fxlava
from fxlava import compat
from tests.zoo._lively import lively


def _pool_net(channels: int, pool: str) -> nn.Sequential:
    # a max pool of spikes is an OR layer; an average pool into a neuron is a sum pool with its own neurons
    pool_layers = [layer.MaxPool2d(2, step_mode="m")] if pool == "max" else [
        layer.AvgPool2d(2, step_mode="m"), neuron.IFNode(v_threshold=0.5, step_mode="m")]
    return nn.Sequential(
        layer.Conv2d(1, channels, 3, padding=1, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"),
        *pool_layers, layer.Flatten(step_mode="m"),
        layer.Linear(channels * 4, 10, bias=False, step_mode="m"), neuron.IFNode(step_mode="m"))


def _lava_equals_lava_dl(model, x, tmp_path):
    net = fxlava.compile(model, x)
    path = net.export_hdf5(tmp_path / "net.net")
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    got = fxlava.run_lava(path, xin)
    assert expected.sum() > 0  # a silent network would make equality trivial
    assert torch.equal(got, expected), f"Lava {int(got.sum())} spikes, lava-dl {int(expected.sum())}"
    return net


@pytest.mark.lava
@pytest.mark.parametrize("channels,pool", [
    (128, "max"), (256, "avg"),
    pytest.param(129, "max", marks=pytest.mark.slow), pytest.param(512, "max", marks=pytest.mark.slow),
    pytest.param(129, "avg", marks=pytest.mark.slow)])
def test_pools_over_many_channels_run_in_lava_as_in_lava_dl(channels, pool, tmp_path):
    x = (torch.rand(6, 2, 1, 4, 4, generator=torch.Generator().manual_seed(channels)) < 0.4).float()
    net = _lava_equals_lava_dl(lively(_pool_net(channels, pool), x), x, tmp_path)
    assert net.lava_dl[1].synapse.groups == channels  # the pool really is a conv with groups = channels


@pytest.mark.lava
@pytest.mark.slow
def test_a_kernel_wider_than_127_runs_in_lava_as_in_lava_dl(tmp_path):
    model = nn.Sequential(layer.Conv2d(1, 3, (1, 130), bias=False, step_mode="m"), neuron.IFNode(step_mode="m"),
                          layer.Flatten(step_mode="m"), layer.Linear(3 * 2 * 3, 4, bias=False, step_mode="m"),
                          neuron.IFNode(step_mode="m"))
    x = (torch.rand(8, 2, 1, 2, 132, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    _lava_equals_lava_dl(lively(model, x), x, tmp_path)


def test_the_patched_conv_model_declares_wide_geometry():
    from lava.proc.conv.models import AbstractPyConvModel

    assert "lava.proc.conv.models" in compat.active_patches()
    for name in ("kernel_size", "stride", "padding", "dilation", "groups"):
        declared = getattr(AbstractPyConvModel, name)
        assert declared.d_type == __import__("numpy").int32, name


def test_the_conv_rewrite_fails_loudly_on_a_different_lava():
    with pytest.raises(ImportError, match="no longer declares"):
        compat._rewrite_conv_geometry("class M:\n    groups: np.ndarray = LavaPyType(np.ndarray, np.int16, precision=16)\n")
