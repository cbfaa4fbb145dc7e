"""A forward() that loops over the time steps and sums its output spikes (a spike count, then a rate).

    out = 0
    for t in range(x.shape[0]):
        out = out + self.net(x[t])
    return out / x.shape[0]

Traced on the example, the loop is T copies of one step joined by a chain of adds. The spikes are
whole numbers, so that chain is ``stack([...]).sum(0)``: the per-step network goes to Loihi, the
sum (and what follows) to ``net.readout``, and the result equals the model's on every output.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron

import fxlava
from tests.zoo._lively import grid_weights
from tests.sj_models import run_sj as _sj

T, N = 6, 3


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.sn1 = nn.Linear(64, 32, bias=False), neuron.IFNode()
        self.fc2, self.sn2 = nn.Linear(32, 10, bias=False), neuron.IFNode()

    def step(self, x_t):
        return self.sn2(self.fc2(self.sn1(self.fc1(x_t))))


class RateFromZero(_Net):
    def forward(self, x):
        out = 0
        for t in range(x.shape[0]):
            out = out + self.step(x[t])
        return out / x.shape[0]


class CountInPlace(_Net):
    def forward(self, x):
        count = torch.zeros(x.shape[1], 10)
        for x_t in x:
            count += self.step(x_t)
        return count


class FirstStepStarts(_Net):
    def forward(self, x):
        out = self.step(x[0])
        for t in range(1, x.shape[0]):
            out = out + self.step(x[t])
        return out


class SomeStepsOnly(_Net):
    def forward(self, x):
        out = 0
        for t in range(x.shape[0] - 1):  # the last step is left out: not a sum over time
            out = out + self.step(x[t])
        return out


class MultiStepForward(_Net):
    """SpikingJelly's own loop: functional.multi_step_forward takes each step with x_seq.select(0, t)."""

    def forward(self, x):
        from spikingjelly.activation_based import functional

        return functional.multi_step_forward(x, [self.fc1, self.sn1, self.fc2, self.sn2]).sum(0)


class StartsFromOnes(_Net):
    def forward(self, x):
        out = torch.ones(x.shape[1], 10)  # not a count of spikes
        for x_t in x:
            out = out + self.step(x_t)
        return out


def _x(seed=0):
    return (torch.rand(T, N, 64, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


@pytest.mark.parametrize("cls", [RateFromZero, CountInPlace, FirstStepStarts, MultiStepForward])
def test_a_sum_over_the_steps_compiles_one_step_and_equals_the_model(cls):
    model, x = grid_weights(cls(), 0, -8, 12).eval(), _x()
    net = fxlava.compile(model, x)
    assert any("loops over the 6 time steps" in message for _, message in net.records)
    assert ".sum()" in net.readout.ops
    y = net(x)
    assert y.shape == (T, N, 10) and 0 < y.sum() < y.numel()
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    for seed in (0, 1):  # on the example and on another input, twice: the count starts from zero each time
        x = _x(seed)
        assert torch.equal(net.readout(net(x)), _sj(model, x))
        assert torch.equal(net.readout(net(x)), _sj(model, x))


@pytest.mark.parametrize("cls", [SomeStepsOnly, StartsFromOnes])
def test_other_sums_are_not_taken_for_a_time_loop(cls):
    with pytest.raises(fxlava.UnsupportedModelError):
        fxlava.compile(grid_weights(cls(), 0, -8, 12).eval(), _x())


def test_tracing_leaves_the_models_constants_alone():
    """count += y on a constant tensor: tracing runs each op on the example, and must not run it in place."""
    from fxlava.frontend.tracer import SpikingTracer

    model = grid_weights(CountInPlace(), 0, -8, 12).eval()
    gm = torch.fx.GraphModule(model, SpikingTracer((_x(),)).trace(model))
    constants = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"
                 and n.target.startswith("_tensor_constant")]
    assert constants and not any(c.any() for c in constants)
