"""Ops that name axes, in a multi-step model: renumbered for the per-step graph, checked against SpikingJelly.

The canonical graph runs once per time step on [N, *]; a multi-step model's ops see [T, N, *]. Each op
below sits between two neurons (so it stays in the graph, not in the readout), and the per-step graph
must give SpikingJelly's spikes on every step, on grid weights.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava import frontend
from tests.zoo._lively import grid_weights
from tests.sj_models import run_sj as _sj

THRESHOLD = 1 + 1 / 128


class Between(nn.Module):
    """conv -> IF -> op -> IF, multi-step: the op's output is compared through the second neuron's spikes."""

    def __init__(self, op, cin=2, cout=4):
        super().__init__()
        self.op = op
        self.conv = layer.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.sn1 = neuron.IFNode(v_threshold=THRESHOLD)
        self.sn2 = neuron.IFNode(v_threshold=0.5)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.sn2(self.op(self.sn1(self.conv(x)), x))


def _spikes(shape, seed=1, rate=0.4):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _unrolled(chunks):
    a, b = chunks
    return torch.cat([b, a], dim=2)


OPS = {  # [T, N, C, H, W] axes, as a multi-step model writes them
    "cat dim=2": lambda y, x: torch.cat([y, x], dim=2),
    "cat dim=-3": lambda y, x: torch.cat([y, x], dim=-3),
    "cat dim=2 (keyword list)": lambda y, x: torch.cat(tensors=[x, y], dim=2),
    "stack dim=3": lambda y, x: torch.stack([y, y], dim=3).sum(3),
    "chunk dim=2": lambda y, x: _unrolled(y.chunk(2, dim=2)),
    "split dim=2": lambda y, x: _unrolled(torch.split(y, 2, dim=2)),
    "sum dim=2": lambda y, x: y.sum(dim=2, keepdim=True),
    "mean dims (3, 4)": lambda y, x: y.mean((3, 4), keepdim=True),
    "softmax dim=2": lambda y, x: F.softmax(y, dim=2),
    "flatten(3)": lambda y, x: y.flatten(3),
    "transpose(3, 4)": lambda y, x: y.transpose(3, 4),
    "permute channels last": lambda y, x: y.permute(0, 1, 3, 4, 2),
    "movedim(2, -1)": lambda y, x: torch.movedim(y, 2, -1),
    # time and batch merged for a plain 2-d module, then split again flattening each sample at once
    "flatten(0, 1) then view(T, N, -1)": lambda y, x: y.flatten(0, 1).view(y.shape[0], y.shape[1], -1),
    "view(T * N, -1) then view(T, N, -1)": lambda y, x: y.view(y.shape[0] * y.shape[1], -1).view(*y.shape[:2], -1),
}


@pytest.mark.parametrize("name", list(OPS))
def test_axes_are_renumbered_per_step(name):
    model = grid_weights(Between(OPS[name]), 0, -14, 21, 1 / 32).eval()
    x = _spikes((4, 2, 2, 6, 6))
    gm, _ = frontend.trace(model, x)
    ref = _sj(model, x)
    assert 0 < ref.sum() < ref.numel(), "the comparison needs some spikes and some silence"
    assert torch.equal(fxlava.run_graph(gm, x), ref)


TIME_OR_BATCH = {
    "cat along N": (lambda y, x: torch.cat([y, y], dim=1), r"cat\(\) along the time or batch axis"),
    "cat along T (default dim)": (lambda y, x: torch.cat([y, y]), r"cat\(\) along the time or batch axis"),
    "sum over T": (lambda y, x: y.sum(0, keepdim=True), r"sum\(\) along the time or batch axis"),
    "mean of everything": (lambda y, x: y.mean() + y, r"mean\(\) along the time or batch axis"),
    "softmax over N": (lambda y, x: y.softmax(1), r"softmax\(\) along the time or batch axis"),
    "T and N swapped inside": (lambda y, x: y.transpose(0, 1), r"a transpose of the time and batch axes inside"),
}


@pytest.mark.parametrize("name", list(TIME_OR_BATCH))
def test_ops_along_time_or_batch_inside_the_network_are_refused_with_the_line(name):
    op, pattern = TIME_OR_BATCH[name]
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern) as info:
        fxlava.compile(Between(op).eval(), _spikes((4, 2, 2, 6, 6)))
    assert "test_canonical_dims.py" in str(info.value)


class ChannelsLast(nn.Module):
    """Neurons run on a channels-last view and the layout is restored: a permute pair, layout only."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv1 = layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.sn1 = neuron.IFNode(v_threshold=THRESHOLD)
        self.conv2 = layer.Conv2d(4, 3, 3, padding=1, bias=False)
        self.sn2 = neuron.IFNode(v_threshold=THRESHOLD)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        y = self.conv1(x)
        if self.how == "permute":
            y = self.sn1(y.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        else:
            y = torch.movedim(self.sn1(torch.movedim(y, 2, -1)), -1, 2)
        return self.sn2(self.conv2(y))


@pytest.mark.parametrize("how", ["permute", "movedim"])
def test_a_permute_restored_after_elementwise_modules_is_layout(how):
    model = grid_weights(ChannelsLast(how), 2, -14, 21, 1 / 32).eval()
    x = _spikes((4, 2, 2, 6, 6), seed=3)
    net = fxlava.compile(model, x)
    ref = _sj(model, x)
    assert 0 < ref.sum() < ref.numel()
    assert torch.equal(net(x), ref)
    assert torch.equal(net(x), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    assert [b.kind for b in net.blocks] == ["conv", "conv"]


class NotRestored(ChannelsLast):
    def forward(self, x):
        y = self.sn1(self.conv1(x).permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 3, 2)  # H and W exchanged
        return self.sn2(self.conv2(y))


def test_a_permute_not_restored_is_refused():
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)- <permute> .*test_canonical_dims.py:\d+: y = self"):
        fxlava.compile(NotRestored("permute").eval(), _spikes((4, 2, 2, 6, 6)))


class TakesNT(nn.Module):
    """Takes [N, T, *] and transposes it itself, as SpikingJelly's memopt CIFAR10DVSVGG does."""

    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.sn = neuron.IFNode(v_threshold=THRESHOLD)
        self.fc = layer.Linear(4 * 6 * 6, 3, bias=False)
        self.sn2 = neuron.IFNode(v_threshold=THRESHOLD)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        x = x.transpose(0, 1).contiguous()  # [T, N, C, H, W]
        return self.sn2(self.fc(torch.flatten(self.sn(self.conv(x)), 2)))


def test_an_input_taken_as_n_t_and_transposed_in_forward_is_layout():
    model = grid_weights(TakesNT(), 4, -16, 18, 1 / 32).eval()
    x_nt = _spikes((3, 5, 2, 6, 6), seed=5)  # N = 3, T = 5, as the model takes it
    net = fxlava.compile(model, x_nt)
    x = x_nt.transpose(0, 1)
    ref = _sj(model, x_nt)
    assert 0 < ref.sum() < ref.numel()
    assert torch.equal(net(x), ref)
    assert torch.equal(net(x), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    assert any("takes its input as [N, T, *]" in m and "T = 5" in m for _, m in net.records)
