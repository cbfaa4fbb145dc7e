"""End-to-end: every zoo model compiles, and graph, lava-dl and Lava agree on every spike."""
import copy

import pytest
import torch
from spikingjelly.activation_based import base

import fxlava
from tests.zoo import load


def _state(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: getattr(m, "step_mode", None) for n, m in model.named_modules() if isinstance(m, base.StepModule)}
    return sd, modes


def _options(z):
    """Compile options a zoo model asks for (e.g. bias="current")."""
    return z.EXPECT.get("options", {})


def test_graph_equals_lava_dl(zoo):
    name, z, model, x = zoo
    net = fxlava.compile(model, x, **_options(z))
    assert [b.kind for b in net.blocks] == z.EXPECT["blocks"]
    y_graph = net(x)
    y_ladl = fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x)))
    assert y_graph.shape == y_ladl.shape
    assert torch.equal(y_graph, y_ladl)
    # a silent network would make the comparison meaningless
    assert y_graph.sum() > 0
    # and so would a network that does not depend on its input
    x2 = z.example_input(N=x.shape[1])
    x2 = x2.flip(0)
    assert not torch.equal(net(x2), y_graph) or torch.equal(x2, x)


def test_random_inputs_graph_equals_lava_dl(zoo):
    name, z, model, x = zoo
    net = fxlava.compile(model, x, **_options(z))
    g = torch.Generator().manual_seed(11)
    for rate in (0.1, 0.5):
        xr = (torch.rand(x.shape[0], 4, *x.shape[2:], generator=g) < rate).float()
        assert torch.equal(net(xr), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(xr))))


def test_compile_leaves_model_untouched(zoo):
    name, z, model, x = zoo
    before_sd, before_modes = _state(model)
    with torch.no_grad():
        ref = model(x) if "m" in before_modes.values() else None
    from spikingjelly.activation_based import functional
    functional.reset_net(model)
    fxlava.compile(model, x, **_options(z))
    after_sd, after_modes = _state(model)
    assert before_modes == after_modes
    assert before_sd.keys() == after_sd.keys()
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    if ref is not None:
        functional.reset_net(model)
        with torch.no_grad():
            assert torch.equal(model(x), ref)


def test_net_call_starts_from_rest(zoo):
    name, z, model, x = zoo
    net = fxlava.compile(model, x, **_options(z))
    assert torch.equal(net(x), net(x))


def _lava_check(name, tmp_path):
    z = load(name)
    model, x = z.build(), z.example_input()
    net = fxlava.compile(model, x, **_options(z))
    path = tmp_path / f"{name}.net"
    net.export_hdf5(path)
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    got = fxlava.run_lava(path, xin)
    assert got.shape == expected.shape
    assert expected.sum() > 0
    assert torch.equal(got, expected)


@pytest.mark.lava
def test_lava_equals_lava_dl_mnist(tmp_path):
    """The tutorial's CSNN, compiled by fxlava, runs in Lava exactly as in lava-dl."""
    _lava_check("mnist_csnn", tmp_path)


@pytest.mark.lava
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in __import__("tests.zoo", fromlist=["NAMES"]).NAMES if n != "mnist_csnn"])
def test_lava_equals_lava_dl_zoo(name, tmp_path):
    _lava_check(name, tmp_path)
