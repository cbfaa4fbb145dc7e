"""Tracing the models people write: blocks traced into, shape queries answered from the example input,
Dropout anywhere, the output checked, a user's neuron refused once, no warning the user cannot act on.

Equivalences compare the user's SpikingJelly model in floating point with the compiled graph and with
lava-dl on the same spikes, every spike (weights on the 2/64 grid, thresholds k/64 + 1/128: see
tests/test_structure.py).
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava import frontend
from tests.zoo._lively import grid_weights

THRESHOLD = 1 + 1 / 128


def _if(**kw):
    return neuron.IFNode(v_threshold=THRESHOLD, **kw)


def _grid(model, seed=0, step=1 / 32):
    return grid_weights(model, seed, -20, 21, step).eval()


def _spikes(shape, rate=0.4, seed=1):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _sj(model, x, per_step=False):
    functional.reset_net(model)
    with torch.no_grad():
        out = torch.stack([model(x[t]) for t in range(x.shape[0])]) if per_step else model(x)
    functional.reset_net(model)
    return out


def _assert_same_spikes(model, x, per_step=False):
    net = fxlava.compile(model, x)
    ref, got = _sj(model, x, per_step), net(x)
    assert 0 < ref.sum() < ref.numel(), "the comparison needs some spikes and some silence"
    assert torch.equal(got, ref)
    assert torch.equal(got, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    return net


# --- blocks are traced into; nodes keep their path ----------------------------------------------


class ConvBlock(nn.Module):
    """A user's block, written like SpikingJelly's examples' VGGBlock."""

    def __init__(self, cin, cout, pool=False):
        super().__init__()
        self.proj = nn.Sequential(*([layer.AvgPool2d(2)] if pool else []), layer.Conv2d(cin, cout, 3, padding=1,
                                                                                          bias=False))
        self.neuron = _if()

    def forward(self, x_seq):
        return self.neuron(self.proj(x_seq))


class BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(ConvBlock(2, 4), ConvBlock(4, 4, pool=True))
        self.fc = layer.Linear(4 * 4 * 4, 3, bias=False)
        self.sn = _if()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.sn(self.fc(self.features(x).flatten(2)))


def test_user_blocks_are_traced_into_and_nodes_keep_their_paths():
    model = _grid(BlockNet(), seed=2, step=1 / 16)
    net = _assert_same_spikes(model, _spikes((6, 2, 2, 8, 8), seed=3))
    assert [b.kind for b in net.blocks] == ["conv", "conv", "flatten", "dense"]
    gm, _ = frontend.trace(model, _spikes((6, 2, 2, 8, 8)))
    paths = [n.meta["fxlava_path"] for n in gm.graph.nodes if n.op == "call_module"]
    assert paths[:5] == ["features.0.proj.0", "features.0.neuron", "features.1.proj.0", "features.1.proj.1",
                         "features.1.neuron"]


# --- shape queries ------------------------------------------------------------------------------


class ShapeChecks(nn.Module):
    """Static shape checks as in SpikingJelly's model zoo (spikformer, ms_resnet): they must trace."""

    def __init__(self, T=4):
        super().__init__()
        self.T = T
        self.conv = layer.Conv2d(2, 3, 3, padding=1, bias=False)
        self.sn1 = _if()
        self.fc = layer.Linear(3 * 6 * 6, 4, bias=False)
        self.sn2 = _if()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        if x.ndim == 4:  # static images: repeat them over T (not taken for [T, N, C, H, W] spikes)
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        assert x.dim() == 5, "expects [T, N, C, H, W]"
        T, N = x.shape[:2]
        assert len(x) == T and x.size(1) == N and x.size()[2] == 2
        y = self.sn1(self.conv(x))
        return self.sn2(self.fc(y.reshape(T, N, -1)))


def test_shape_queries_are_answered_from_the_example_input_and_recorded():
    model = _grid(ShapeChecks(), seed=4, step=1 / 16)
    x = _spikes((5, 3, 2, 6, 6), seed=5)
    net = _assert_same_spikes(model, x)
    assert [b.kind for b in net.blocks] == ["conv", "flatten", "dense"]
    record = " ".join(m for p, m in net.records if p == "trace")
    assert "specialised to rank 5 and T = 5" in record and "ndim" in record


class TimeLoop(nn.Module):
    """A forward that loops over the time steps itself, with multi-step layers inside."""

    def __init__(self):
        super().__init__()
        self.fc1 = layer.Linear(6, 5, bias=False, step_mode="m")
        self.sn1 = _if(step_mode="m")
        self.fc2 = layer.Linear(5, 3, bias=False, step_mode="m")
        self.sn2 = _if(step_mode="m")

    def forward(self, x):
        y = self.sn1(self.fc1(x))
        z = torch.zeros(y.shape[1], y.shape[2])  # shapes known: zeros() gets plain ints
        out = [y[t] + z for t in range(y.shape[0])]
        return self.sn2(self.fc2(torch.stack(out)))


def test_python_loop_over_a_known_T_traces():
    model = _grid(TimeLoop(), seed=6, step=1 / 16)
    x = _spikes((4, 3, 6), seed=7)
    gm, _ = frontend.trace(model, x)
    # the loop is unrolled T times, then folded into the per-step graph: no stack left
    assert gm.meta["fxlava_time_loops"] == 1
    assert not any(n.target is torch.stack for n in gm.graph.nodes)
    ref = _sj(model, x)
    assert 0 < ref.sum() < ref.numel()
    assert torch.equal(fxlava.run_graph(gm, x), ref)  # the per-step graph (y[t] + 0 is not compiled, only traced)


class StepLoop(nn.Module):
    """Single-step modules called once per time step, outputs stacked: as users of SpikingJelly's
    single-step mode write it (lif_fc_mnist.py, spiking_dqn_state.py loop like this outside the model)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(layer.Conv2d(1, 3, 3, bias=False), _if(), layer.Flatten(),
                                 layer.Linear(3 * 4 * 4, 4, bias=False), _if())

    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            out.append(self.net(x[t]))
        return torch.stack(out).mean(0)


class StepLoopIter(StepLoop):
    def forward(self, x):
        return torch.stack([self.net(x_t) for x_t in x])


def _module_types(gm):
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("cls", [StepLoop, StepLoopIter])
def test_single_step_modules_called_T_times_trace_to_the_multi_step_graph(cls):
    model = _grid(cls(), seed=10, step=1 / 16)
    x = _spikes((5, 2, 1, 6, 6), rate=0.5, seed=11)
    net = fxlava.compile(model, x)
    ref = _sj(model, x)
    y = net(x)
    assert 0 < y.sum() < y.numel()
    assert torch.equal(net.readout(y), ref)  # the model's own output, mean(0) included, on every spike
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    assert any("loops over the 5 time steps" in m for _, m in net.records)
    # the same per-step graph as the same layers in multi-step mode
    multi = copy.deepcopy(model.net)
    functional.set_step_mode(multi, "m")
    assert _module_types(frontend.trace(model, x)[0]) == _module_types(frontend.trace(multi, x)[0])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = layer.Linear(6, 3, bias=False, step_mode="m")
        self.sn = _if(step_mode="m")

    def forward(self, x):
        if x.sum() > 0:  # control flow on values: cannot be traced
            x = x * 2
        return self.sn(self.fc(x))


def test_data_dependent_control_flow_is_refused_naming_the_line_and_the_construct():
    with pytest.raises(fxlava.UnsupportedModelError,
                       match=r"(?s)forward\(\) cannot be traced: Python control flow .* on a tensor's values.*"
                             r"at .*test_tracing.py:\d+: if x.sum\(\) > 0:"):
        fxlava.compile(DataDependent(), _spikes((4, 2, 6)))


def test_example_input_the_model_cannot_take_is_reported_with_its_line_and_no_dump(capfd):
    class TakesImages(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer.Conv2d(1, 2, 3, bias=False, step_mode="m")
            self.sn = _if(step_mode="m")

        def forward(self, x):  # [N, C, H, W] images, like conv_fashion_mnist.CSNN
            return self.sn(self.conv(x.unsqueeze(0).expand(4, -1, -1, -1, -1)))

    with pytest.raises(fxlava.FxlavaError, match=r"(?s)failed at .*test_tracing.py:\d+: return self.sn\(self.conv"
                                                 r"\(x.unsqueeze\(0\).expand.*fix: pass an example input"):
        fxlava.compile(TakesImages(), _spikes((4, 2, 1, 6, 6)))
    assert "Traceback" not in capfd.readouterr().err


# --- shape-only ops and Dropout -----------------------------------------------------------------


class UnitAxes(nn.Module):
    """BatchNorm1d applied through x.unsqueeze(3) ... .squeeze(3), as papers' code does."""

    def __init__(self, restore=True):
        super().__init__()
        self.restore = restore
        self.fc = layer.Linear(6, 5, bias=False)
        self.bn = layer.BatchNorm1d(5)
        self.sn = _if()
        self.fc2 = layer.Linear(5, 3, bias=False)
        self.sn2 = _if()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        y = self.bn(self.fc(x).unsqueeze(3))
        y = self.sn(y.squeeze(3) if self.restore else y)
        return self.sn2(self.fc2(y if self.restore else y.flatten(2)))


def test_unit_axes_added_and_removed_around_a_batchnorm_are_layout():
    model = _grid(UnitAxes(), seed=12, step=1 / 16)
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0, 1.5]))  # a scale, no shift: folds
        model.bn.bias.zero_()
    net = _assert_same_spikes(model, _spikes((6, 3, 6), rate=0.6, seed=13))
    assert [b.kind for b in net.blocks] == ["dense", "dense"]


def test_a_unit_axis_that_is_not_restored_is_still_refused():
    with pytest.raises(fxlava.UnsupportedModelError, match=r"unsqueeze"):
        fxlava.compile(_grid(UnitAxes(restore=False)), _spikes((6, 3, 6)))


def test_dropout_between_average_pool_and_conv_is_an_identity():
    model = _grid(nn.Sequential(layer.Conv2d(1, 2, 3, padding=1, bias=False), _if(), layer.AvgPool2d(2),
                                layer.Dropout(0.5), layer.Conv2d(2, 3, 3, bias=False), _if(), nn.Dropout(0.2)),
                  seed=8, step=1 / 8)
    functional.set_step_mode(model, "m")
    net = _assert_same_spikes(model, _spikes((6, 2, 1, 8, 8), seed=9))
    assert [b.kind for b in net.blocks] == ["conv", "conv"]
    assert any("identities in eval mode removed: 3, 6" in m for _, m in net.records)


# --- the output ---------------------------------------------------------------------------------


class ReturnsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = layer.Linear(6, 3, bias=False, step_mode="m")
        self.sn = neuron.IFNode(step_mode="m", store_v_seq=True)

    def forward(self, x):
        self.sn(self.fc(x))
        return self.sn.v_seq


class ReturnsCurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = layer.Linear(6, 3, bias=False, step_mode="m")
        self.sn = _if(step_mode="m")
        self.head = layer.Linear(3, 2, bias=False, step_mode="m")

    def forward(self, x):
        return self.head(self.sn(self.fc(x)))


class ReturnsNone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = layer.Linear(6, 3, bias=False, step_mode="m")
        self.sn = _if(step_mode="m")

    def forward(self, x):
        self.sn(self.fc(x))


OUTPUTS = [
    ("neuron state", ReturnsState, r"(?s)returns a module's attribute or a constant \(such as a neuron's v or v_seq\)"
                                   r".*fix: return the spikes of the last spiking neuron"),
    # a trailing synapse (ReturnsCurrent) is a classification head on the host, net.readout (tests/test_readout.py)
    ("None", ReturnsNone, r"(?s)forward\(\) returns None, not spikes"),
]


@pytest.mark.parametrize("make,pattern", [o[1:] for o in OUTPUTS], ids=[o[0] for o in OUTPUTS])
def test_output_that_is_not_spikes_is_refused_at_compile(make, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern) as info:
        fxlava.compile(make(), _spikes((4, 2, 6)))
    assert len(info.value.issues) == 1


# --- a user's neuron is refused once ------------------------------------------------------------


class HandWrittenLIF(nn.Module):
    """A neuron written by hand (as in cifar10_r11_enabling_spikebased_backpropagation.py)."""

    def __init__(self):
        super().__init__()
        self.v = 0.0

    def forward(self, x):
        self.v = self.v * 0.5 + x
        spike = (self.v >= 1.0).float()
        self.v = self.v * (1.0 - spike)
        return spike


def test_a_users_neuron_is_refused_once_naming_its_first_operation():
    model = nn.Sequential(nn.Linear(6, 4, bias=False), HandWrittenLIF(), nn.Linear(4, 3, bias=False),
                          HandWrittenLIF())
    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(model, _spikes((4, 2, 6)))
    issues = info.value.issues
    assert [(i.path, i.module_type) for i in issues] == [("1", "tests.test_tracing.HandWrittenLIF"),
                                                          ("3", "tests.test_tracing.HandWrittenLIF")]
    assert all("first unsupported operation is add()" in i.fix for i in issues)
    assert "self.v = self.v * 0.5 + x" in issues[0].source


# --- warnings -----------------------------------------------------------------------------------


def test_compile_prints_no_triton_warning():
    code = ("import torch, fxlava\nfrom fxlava.examples.mnist_csnn import MNISTNet\n"
            "fxlava.compile(MNISTNet(channels=2), (torch.rand(2, 1, 1, 28, 28) < 0.3).float())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Triton" not in run.stderr and "Triton" not in run.stdout


class MultiStepLoop(nn.Module):
    """Multi-step modules called once per time step on a sequence of length one, gathered with torch.cat."""

    def __init__(self, select):
        super().__init__()
        self.select = select
        self.net = nn.Sequential(layer.Conv2d(1, 3, 3, bias=False), _if(), layer.Flatten(),
                                 layer.Linear(3 * 4 * 4, 4, bias=False), _if())
        functional.set_step_mode(self, "m")

    def forward(self, x):
        T = x.shape[0]
        if self.select == "slice":
            return torch.cat([self.net(x[t:t + 1]) for t in range(T)])
        if self.select == "unsqueeze":
            return torch.cat([self.net(x[t].unsqueeze(0)) for t in range(T)], dim=0)
        return torch.stack([self.net(x[t].unsqueeze(0))[0] for t in range(T)])


@pytest.mark.parametrize("select", ["slice", "unsqueeze", "stack"])
def test_multi_step_modules_called_once_per_step_fold_into_the_per_step_graph(select):
    """SpikingJelly's multi-step neurons keep their state between calls: T calls on one step each == one call."""
    model = _grid(MultiStepLoop(select), seed=10, step=1 / 16)
    x = _spikes((5, 2, 1, 6, 6), rate=0.5, seed=11)
    net = _assert_same_spikes(model, x)
    assert any("loops over the 5 time steps calling modules once per step" in m for _, m in net.records)
    multi = copy.deepcopy(model.net)
    assert _module_types(frontend.trace(model, x)[0]) == _module_types(frontend.trace(multi, x)[0])


class MultiStepOnOneStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = layer.Linear(6, 3, bias=False)
        self.sn = _if()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return torch.stack([self.sn(self.fc(x[t])) for t in range(x.shape[0])])


def test_a_multi_step_neuron_given_one_step_is_refused():
    """x[t] is [N, *]: a multi-step neuron would run over the batch as if it were time."""
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)a multi-step neuron given one time step.*- sn .*"
                                                           r"at .*test_tracing.py:\d+: return torch.stack"):
        fxlava.compile(MultiStepOnOneStep(), _spikes((4, 2, 6)))


class LoopThatDiffers(nn.Module):
    """Each step weighted by its index: not one per-step graph, so the loop cannot fold."""

    def __init__(self, gather):
        super().__init__()
        self.gather = gather
        self.fc = layer.Linear(6, 3, bias=False)
        self.sn = _if()
        functional.set_step_mode(self, "m")

    def forward(self, x):
        out = [self.sn(self.fc(x[t:t + 1] * (t + 1))) for t in range(x.shape[0])]
        return self.gather(out)


@pytest.mark.parametrize("gather", [torch.cat, lambda out: torch.stack([o[0] for o in out])], ids=["cat", "stack"])
def test_a_time_loop_that_cannot_fold_is_refused_naming_the_line(gather):
    with pytest.raises(fxlava.UnsupportedModelError,
                       match=r"(?s)a loop over the time steps that fxlava cannot fold into one step: \w+\(\) gathers 4 "
                             r"steps.*\n  - <(cat|stack)> .*\n      at .*test_tracing.py:\d+: ") as info:
        fxlava.compile(LoopThatDiffers(gather), _spikes((4, 2, 6)))
    assert "a merge by" not in str(info.value)  # refused once, as the loop it is
