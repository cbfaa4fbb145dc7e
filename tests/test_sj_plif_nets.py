"""SpikingJelly 2.0's parametric_lif_net networks, unmodified, compile with bias="current" and are exact.

Their convs feed BatchNorm2d (a shift once trained) and their linears have a bias: the refused
blockers before bias currents. Each is built from SpikingJelly's own class with its paper's PLIF
neurons; only weights and BatchNorm statistics are set (as after training), never the layers.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron, surrogate
from spikingjelly.activation_based.model import parametric_lif_net as plif

import fxlava

SHAPES = {"MNISTNet": (1, 28, 28), "FashionMNISTNet": (1, 28, 28), "NMNISTNet": (2, 34, 34),
          "CIFAR10Net": (3, 32, 32), "CIFAR10DVSNet": (2, 128, 128), "DVSGestureNet": (2, 128, 128)}


def _spiking(model):
    """(synapse, neuron) pairs in order: each conv/linear and the PLIF neuron after it."""
    pairs, pending = [], None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            pending = m
        elif isinstance(m, neuron.BaseNode) and pending is not None:
            pairs.append((pending, m))
            pending = None
    return pairs


def _active(model, x, rate=0.15):
    """Scale each synapse, front to back, so that about ``rate`` of its neuron's inputs exceed the threshold
    (one forward pass per layer; the trained weights these networks would have, not their random init)."""
    for syn, nrn in _spiking(model):
        seen = []
        hook = nrn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
        with torch.no_grad():
            functional.reset_net(model)
            model(x)
            functional.reset_net(model)
        hook.remove()
        level = torch.quantile(seen[0].flatten()[:1_000_000].abs(), 1 - rate).item()
        with torch.no_grad():
            # PLIF with decay_input settles at its input: an input above 1 fires
            syn.weight.mul_(1.0 / max(level, 1e-6))
    return model


def build(name, channels=None, trained=False, T=8, N=2, seed=0):
    """SpikingJelly's network with PLIF neurons (its paper's setting), lively weights, and optionally
    BatchNorm statistics as training leaves them: running mean and var measured on the input, gamma and beta set."""
    torch.manual_seed(seed)
    kwargs = {} if channels is None else {"channels": channels}
    model = getattr(plif, name)(spiking_neuron=neuron.ParametricLIFNode, surrogate_function=surrogate.ATan(),
                                detach_reset=True, **kwargs)
    functional.set_step_mode(model, "m")
    x = (torch.rand(T, N, *SHAPES[name], generator=torch.Generator().manual_seed(seed + 1)) < 0.3).float()
    model.eval()
    if trained:
        g = torch.Generator().manual_seed(seed + 2)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            for bn in norms:
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.75)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.2)
                bn.reset_running_stats()
                bn.momentum = None  # the running statistics become the statistics of the input
                bn.train()
            model(x)
            functional.reset_net(model)
        model.eval()
    return _active(model, x), x


def _check(name, channels, trained):
    model, x = build(name, channels, trained)
    with pytest.raises(fxlava.UnsupportedModelError, match="synapse with a bias"):
        fxlava.compile(model, x)  # the default still refuses, and says how to opt in
    net = fxlava.compile(model, x, bias="current")
    y = net(x)
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    assert y.sum() > 0
    biases = [b for b in net.blocks if getattr(b, "bias", None) is not None]
    assert len(biases) == 2 + (len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) if trained else 0)
    # some of the linears' own (untrained, small) biases survive quantisation to steps of 1/64
    assert any(bool(b.bias_mantissa.any()) for b in biases[-2:])
    if trained:  # and every shifted BatchNorm gives its conv a bias
        assert all(bool(b.bias_mantissa.any()) for b in biases[:-2])
    return net, x


QUICK = ["MNISTNet"]  # the others take 10-40 s each here: in the slow selection


@pytest.mark.parametrize("trained", [False, True], ids=["unmodified", "trained-statistics"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in SHAPES])
def test_small_plif_net_graph_equals_lava_dl(name, trained):
    """With 8 channels."""
    _check(name, 8, trained)


@pytest.mark.slow
@pytest.mark.parametrize("trained", [False, True], ids=["unmodified", "trained-statistics"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_plif_net_graph_equals_lava_dl(name, trained):
    """At SpikingJelly's own channel counts (128 or 256)."""
    _check(name, None, trained)


@pytest.mark.lava
@pytest.mark.slow
@pytest.mark.parametrize("name", ["MNISTNet", "FashionMNISTNet"])
def test_smallest_plif_nets_in_lava(name, tmp_path):
    """In Lava too, with trained statistics. 16 channels: a max pool over 128 or more channels is a netx conv
    with as many groups, which Lava's simulator gets wrong (its conv keeps groups in an int8)."""
    net, x = _check(name, 16, True)
    path = net.export_hdf5(tmp_path / f"{name}.net")
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    assert torch.equal(fxlava.run_lava(path, xin), expected)
