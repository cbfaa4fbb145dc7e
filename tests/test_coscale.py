"""coscale_layers: one factor per layer on weights, bias and threshold; ties; what it reports and refuses.

The references are SpikingJelly's own modules. Ties are proved on IF networks whose weights sit on
lava-dl's grid and whose thresholds are whole multiples of 1/64, where SpikingJelly's
``v >= threshold`` and Loihi's ``v > threshold`` differ on many steps.
"""
import copy
import inspect
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import fxlava
from fxlava.blocks import SynapseBlock
from fxlava.passes.coscale_layers import ZERO_SHARE_WARNING
from fxlava.target import EVEN_GRID, FINE_GRID
from tests.sj_models import run_sj as _sj


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _spikes(T, N, *shape, seed=0, rate=0.3):
    return (torch.rand(T, N, *shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _if_net(threshold=1.0):
    return _seq(layer.Flatten(), layer.Linear(48, 32, bias=False), neuron.IFNode(v_threshold=threshold),
                layer.Linear(32, 16, bias=False), neuron.IFNode(v_threshold=threshold))


def _grid(model, seed, span=20, step=2 / 64):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(torch.randint(-span, span + 1, m.weight.shape, generator=g) * step)
    return model


def _float(model, seed, std=0.3):
    """Seeded Gaussian weights, off Loihi's grid, as a float-trained model has them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return model


def _graph_equals_lava_dl(net, x):
    assert torch.equal(net(x), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))


# --- ties -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.0, 0.75, 1 / 3])
def test_if_ties_fire_as_spikingjelly(threshold):
    # grid weights, IF, 0/1 input: every voltage is a multiple of 2/64, so v == threshold happens
    model = _grid(_if_net(threshold), seed=1)
    x = _spikes(16, 32, 3, 4, 4, seed=2)
    ref = _sj(model, x)
    assert 0.05 < ref.mean() < 0.8
    net = fxlava.compile(model, x)
    assert torch.equal(net(x), ref)
    _graph_equals_lava_dl(net, x)
    assert all(b.quantization.ties_exact for b in net.blocks if isinstance(b, SynapseBlock))
    if threshold != 1 / 3:  # a whole multiple of 1/64: Loihi's '>' alone misses the ties
        assert not torch.equal(fxlava.compile(model, x, coscale=False)(x), ref)


def test_ties_need_a_grid_of_voltages():
    # LIF truncates its voltage every step; CubaLIFNode already fires at v > threshold; a graded input
    lif = _grid(_seq(layer.Flatten(), layer.Linear(48, 16, bias=False), neuron.LIFNode(tau=2.0)), seed=3)
    net = fxlava.compile(lif, _spikes(8, 4, 3, 4, 4))
    assert not net.blocks[1].quantization.ties_exact
    graded = torch.rand(8, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    net = fxlava.compile(_grid(_if_net(), seed=4), graded)
    assert [b.quantization.ties_exact for b in net.blocks if isinstance(b, SynapseBlock)] == [False, True]


# --- the factor -----------------------------------------------------------------------------------


def test_float_weights_fill_the_weight_range_and_keep_the_threshold_exact():
    model = _float(_if_net(), seed=5, std=0.1)
    x = _spikes(8, 8, 3, 4, 4, seed=6)
    net = fxlava.compile(model, x)
    for b in (b for b in net.blocks if isinstance(b, SynapseBlock)):
        r = b.quantization
        assert r.limit == "weights" and r.clipped == 0
        # float weights go on the int8 grid, and the largest one within one threshold step of its top
        assert b.weight_grid is FINE_GRID and r.grid is FINE_GRID
        assert b.scaled_weight.abs().max() > FINE_GRID.max * (1 - 1 / (64 * b.scale)) - 1e-6
        assert b.neuron.v_th_mant + 1 == round(64 * b.scale)  # threshold 1 x scale, exact, one step lower for ties
        assert b.neuron.coscale == b.scale
    # the model's weights are untouched; the graph's parameters stay in the model's units
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(list(net.graph_module.parameters())) == len(linears)
    assert all(torch.equal(p, m.weight) for p, m in zip(net.graph_module.parameters(), linears))
    _graph_equals_lava_dl(net, x)


def test_compiled_net_is_the_coscaled_quantised_model_in_spikingjelly():
    # float weights: the compiled net equals SpikingJelly's IF model with Loihi's weights and the scaled threshold
    model = _float(_if_net(), seed=7)
    x = _spikes(16, 32, 3, 4, 4, seed=8)
    net = fxlava.compile(model, x)
    ref = copy.deepcopy(model)
    blocks = [b for b in net.blocks if isinstance(b, SynapseBlock)]
    for m, b in zip([m for m in ref.modules() if isinstance(m, nn.Linear)], blocks):
        with torch.no_grad():
            m.weight.copy_(b.quantized_weight)
    for m, b in zip([m for m in ref.modules() if isinstance(m, neuron.IFNode)], blocks):
        m.v_threshold = (b.neuron.v_th_mant + 1) / 64  # the scaled threshold, fired at with >=
    out = _sj(ref, x)
    assert 0.05 < out.mean() < 0.8
    assert torch.equal(net(x), out)


def test_threshold_and_voltage_bound_the_factor():
    # tiny weights: the threshold would pass 64 (where slayer fires at ties and Loihi does not)
    tiny = _seq(layer.Flatten(), layer.Linear(48, 16, bias=False), neuron.IFNode())
    with torch.no_grad():
        tiny[1].weight.fill_(1e-3)
    x = _spikes(8, 4, 3, 4, 4)
    b = fxlava.compile(tiny, x).blocks[1]
    assert b.quantization.limit == "threshold" and b.neuron.v_th_mant <= 4095
    # wide inhibitory fan-in over many steps: the IF voltage could fall below Loihi's 24 bits
    wide = _seq(layer.Linear(4096, 4, bias=False), neuron.IFNode())
    with torch.no_grad():
        wide[0].weight.fill_(-0.02)
        wide[0].weight[:, 0] = 1.0
    b = fxlava.compile(wide, _spikes(16, 2, 4096)).blocks[0]
    assert b.quantization.limit == "voltage" and 1.5 < b.scale < 1.6
    assert 4095 * 0.02 * 16 * b.scale <= 2 ** 23 / 4096  # 16 steps of every inhibitory input, 24 bits


def test_option_off_compiles_as_before():
    model = _grid(_if_net(1 + 1 / 128), seed=9)
    x = _spikes(8, 8, 3, 4, 4)
    net = fxlava.compile(model, x, coscale=False)
    assert [b.neuron.v_th_mant for b in net.blocks if isinstance(b, SynapseBlock)] == [64, 64]
    assert all(b.scale == 1.0 for b in net.blocks if isinstance(b, SynapseBlock))
    assert any("off (coscale=False)" in m for p, m in net.records if p == "coscale_layers")
    with pytest.raises(ValueError, match=r"coscale='no': expected True, False, \{layer: scale\}"):
        fxlava.compile(model, x, coscale="no")


def test_given_scales_reproduce_a_compile():
    model = _float(_if_net(), seed=15)
    x = _spikes(8, 8, 3, 4, 4, seed=16)
    net = fxlava.compile(model, x)
    assert list(net.scales) == ["1 -> 2", "3 -> 4"] and all(s > 1 for s in net.scales.values())
    with torch.no_grad():  # trained further: a fresh compile would choose other factors
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(1.5)
    again = fxlava.compile(model, x, coscale=net.scales)
    assert again.scales == net.scales
    mants = lambda n: [b.neuron.v_th_mant for b in n.blocks if isinstance(b, SynapseBlock)]  # noqa: E731
    assert mants(again) == mants(net)
    assert fxlava.compile(model, x).scales != net.scales
    with pytest.raises(fxlava.PassError, match=r"no scale given for layer '3 -> 4'"):
        fxlava.compile(model, x, coscale={"1 -> 2": 2.0})


def test_pooling_and_fixed_point_layers_keep_scale_one():
    from spikingjelly.activation_based import lava_exchange

    model = _seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(), layer.MaxPool2d(2),
                 layer.Flatten(), layer.Linear(16, 4, bias=False),
                 lava_exchange.CubaLIFNode(current_decay=0, voltage_decay=0, v_threshold=1.0))
    _grid(model, seed=10)
    net = fxlava.compile(model, _spikes(8, 4, 2, 4, 4))
    scales = {b.kind: b.scale for b in net.blocks if isinstance(b, SynapseBlock)}
    assert scales["maxpool"] == 1.0 and scales["dense"] == 1.0 and scales["conv"] > 1.0


# --- reports, warnings, refusals -------------------------------------------------------------------


def test_records_name_every_layer():
    model = _grid(_if_net(), seed=11)
    net = fxlava.compile(model, _spikes(8, 4, 3, 4, 4))
    lines = [m for p, m in net.records if p == "coscale_layers" and "scale x" in m]
    assert [ln.split(":")[0] for ln in lines] == ["1 -> 2", "3 -> 4"]
    assert all("clipped 0" in ln and "rounded to zero" in ln for ln in lines)


def test_many_zero_weights_warn_naming_the_layer():
    model = _if_net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.fill_(0.004)
                m.weight[:, :2] = 3.0  # the largest weight fills the range; the rest are below half a step
    with pytest.warns(fxlava.QuantizationWarning, match=r"^1 -> 2: \d+ of 1536 weights"):
        fxlava.compile(model, _spikes(8, 4, 3, 4, 4))
    assert ZERO_SHARE_WARNING == 0.25


def test_the_zero_weight_warning_names_the_users_compile_line():
    model = _if_net()
    with torch.no_grad():
        model[1].weight.fill_(0.004)
        model[1].weight[:, :2] = 3.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        fxlava.compile(model, _spikes(8, 4, 3, 4, 4))
    (w,) = [w for w in caught if issubclass(w.category, fxlava.QuantizationWarning)]
    assert (w.filename, w.lineno) == (__file__, line)


def test_all_zero_layer_is_refused():
    model = _if_net()
    with torch.no_grad():
        model[1].weight.fill_(1e-3)
        model[3].weight.fill_(0.5)
    with pytest.raises(fxlava.UnsupportedModelError, match=r"quantised weights are all zero[\s\S]*- 1 -> 2 "):
        fxlava.compile(model, _spikes(8, 4, 3, 4, 4), coscale=False)


def test_layer_that_can_no_longer_fire_is_refused():
    model = _if_net()
    with torch.no_grad():
        model[1].weight.fill_(0.5)
        model[3].weight.fill_(0.004)  # excitatory, but below half a step once the -3.9 fixes the scale
        model[3].weight[:, 0] = -3.9
    with pytest.raises(fxlava.UnsupportedModelError, match=r"can no longer fire[\s\S]*- 3 -> 4 "):
        fxlava.compile(model, _spikes(8, 4, 3, 4, 4))


# --- training ---------------------------------------------------------------------------------------


def _grads(net, x, y):
    net.graph_module.zero_grad()
    loss = ((net(x).mean(0) - y) ** 2).sum()
    loss.backward()
    return [p.grad.clone() for p in net.graph_module.parameters()]


def test_coscaled_graph_trains_like_the_unscaled_one():
    # the surrogate sees (v - threshold) / scale: the gradients in the model's units are the unscaled graph's
    model = _grid(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False),
                       neuron.IFNode(v_threshold=1 + 1 / 128, surrogate_function=surrogate.ATan()),
                       layer.Linear(32, 8, bias=False),
                       neuron.IFNode(v_threshold=1 + 1 / 128, surrogate_function=surrogate.ATan())), seed=12)
    x = _spikes(8, 16, 3, 4, 4, seed=13)
    on, off = fxlava.compile(model, x), fxlava.compile(model, x, coscale=False)
    assert all(b.scale > 1 for b in on.blocks if isinstance(b, SynapseBlock))
    assert torch.equal(on(x), off(x))  # integer factors on grid weights: the same spikes
    y = torch.rand(16, 8, generator=torch.Generator().manual_seed(14))
    for g_on, g_off in zip(_grads(on, x, y), _grads(off, x, y)):
        assert g_off.abs().sum() > 0
        # not equal: the scaled threshold's mantissa puts the surrogate's centre up to 1/(64 scale) apart
        assert ((g_on - g_off).norm() / g_off.norm()).item() < 0.05


# --- the weight grid ---------------------------------------------------------------------------------


def _float_conv_net(seed=20):
    return _float(_seq(layer.Conv2d(3, 8, 3, padding=1, bias=False), neuron.IFNode(), layer.Flatten(),
                       layer.Linear(8 * 4 * 4, 16, bias=False), neuron.IFNode()), seed)


def test_float_layers_take_the_int8_grid_and_grid_layers_keep_lava_dls():
    x = _spikes(8, 4, 3, 4, 4, seed=21)
    synapses = lambda net: [b for b in net.blocks if isinstance(b, SynapseBlock)]  # noqa: E731
    floats = fxlava.compile(_float_conv_net(), x)
    assert [b.weight_grid for b in synapses(floats)] == [FINE_GRID, FINE_GRID]
    for b in synapses(floats):
        mant = b.quantized_weight * 64
        assert torch.equal(mant, mant.round()) and -128 <= mant.min() and mant.max() <= 127
        assert bool((mant % 2 != 0).any())  # odd mantissas: lava-dl's grid could not hold these weights
    assert all("weights on steps of 1/64 in [-2, 1.98438]" in m for p, m in floats.records
               if p == "coscale_layers" and "scale x" in m)
    # weights on lava-dl's grid keep it (and an integer factor); co-scaling off keeps it everywhere
    on_grid = fxlava.compile(_grid(_if_net(), seed=22), x)
    assert [(b.weight_grid, b.scale.is_integer()) for b in synapses(on_grid)] == [(EVEN_GRID, True)] * 2
    assert all(b.weight_grid is EVEN_GRID for b in synapses(fxlava.compile(_float_conv_net(), x, coscale=False)))
    # the layer table says which grid each layer uses
    from fxlava.cli import layer_table
    table = layer_table(floats)
    assert table.count("(1/64)") == 2 and "(2/64)" not in table


def test_given_factors_and_grids_rebuild_the_network():
    x = _spikes(8, 4, 3, 4, 4, seed=23)
    for model in (_grid(_if_net(), seed=24), _float_conv_net(seed=25)):
        net = fxlava.compile(model, x)
        with torch.no_grad():  # trained further: off every grid
            for p in model.parameters():
                p.mul_(1.01)
        again = fxlava.compile(model, x, coscale=net.coscale)
        assert again.coscale == net.coscale
    # a pooling layer stays on lava-dl's grid whatever it is given
    pooled = _seq(layer.Conv2d(3, 4, 3, padding=1, bias=False), neuron.IFNode(), layer.MaxPool2d(2),
                  layer.Flatten(), layer.Linear(16, 4, bias=False), neuron.IFNode())
    given = fxlava.compile(pooled, x).coscale
    pool = next(k for k, (s, g) in given.items() if g == "2/64")
    with pytest.raises(fxlava.PassError, match=rf"layer '{pool}' keeps weights on steps of 2/64 .*\(1.0, '2/64'\)"):
        fxlava.compile(pooled, x, coscale={**given, pool: (1.0, "1/64")})
    with pytest.raises(ValueError, match=r"grids '2/64', '1/64'"):
        fxlava.compile(pooled, x, coscale={**given, pool: (1.0, "1/32")})


@pytest.mark.lava
def test_int8_grid_runs_in_lava_spike_for_spike(tmp_path):
    # odd mantissas of both signs in a conv (netx reads them as they are) and a dense layer (netx's
    # optimize_weight_bits shifts them by one bit, weight exponent -1)
    import h5py

    model = _float_conv_net(seed=26)
    x = _spikes(8, 3, 3, 4, 4, seed=27, rate=0.4)
    net = fxlava.compile(model, x)
    path = net.export_hdf5(tmp_path / "int8.net")
    with h5py.File(path, "r") as f:
        for layer_ in ("1", "3"):
            w = f[f"layer/{layer_}/weight"][()]
            assert w.dtype == np.int8 and (w % 2 != 0).any() and w.min() < -64 and w.max() > 64
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    assert torch.equal(fxlava.TNX_to_NXT(net(x)), expected)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(fxlava.run_lava(path, xin), expected)
    assert torch.equal(fxlava.load_netx(path)(xin), expected)


@pytest.mark.parametrize("coscale", [True, False])
def test_compile_checks_the_voltage_floor_with_coscalings_count(coscale):
    """The voltage floor compile checks comes from co-scaling's pass over the weights; it equals a fresh
    count on every block, on float and grid weights, IF and LIF, with and without bias, and is not
    reused once the weights change."""
    models = [
        _float(_if_net(), seed=1, std=0.6),
        _grid(_if_net(), seed=2, span=120),
        _float(_seq(layer.Conv2d(3, 8, 3, padding=1, bias=False), neuron.LIFNode(tau=4.0), layer.Flatten(),
                    layer.Linear(8 * 4 * 4, 10, bias=False), neuron.LIFNode(tau=2.0)), seed=3, std=1.5),
    ]
    inputs = [_spikes(4, 2, 3, 4, 4), _spikes(4, 2, 3, 4, 4), _spikes(4, 2, 3, 4, 4)]
    biased = _seq(layer.Linear(100, 4), neuron.IFNode())
    with torch.no_grad():
        biased[0].weight.fill_(-1.5)
        biased[0].bias.copy_(torch.tensor([-40.0, -3.0, 0.0, 2.0]))
    models.append(biased)
    inputs.append(_spikes(4, 2, 100))
    floors = []
    for model, x in zip(models, inputs):
        net = fxlava.compile(model, x, coscale=coscale, bias="current")
        blocks = [b for b in net.blocks if isinstance(b, SynapseBlock)]
        for block in blocks:
            key, steps = block.quantization.voltage_floor
            assert key == block.weights_key()
            assert steps == block.floor_steps(block.inhibition_steps()) == block.voltage_floor_steps
            floors.append(steps)
        with torch.no_grad():
            blocks[0].synapse.weight.mul_(2)
        assert blocks[0].quantization.voltage_floor[0] != blocks[0].weights_key()
    assert any(f is not None for f in floors) and None in floors  # both kinds of answer were checked
