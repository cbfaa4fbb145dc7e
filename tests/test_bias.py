"""Biases and BatchNorm shifts as Loihi neuron bias currents (bias="current"): exact, refused where not."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, lava_exchange, neuron

import fxlava
from fxlava.blocks import SynapseBlock
from fxlava.neuron import CubaNeuron
from fxlava.passes import bias_to_current
from fxlava.target import bias_mantissa, bias_out_of_range, quantize_bias
from tests.zoo._lively import lively
from tests.zoo._trained import trained_batchnorm, trained_biases


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _spikes(shape, seed, rate=0.3):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


# --- the bias grid ------------------------------------------------------------------------------

def test_bias_grid_is_13_bits_in_steps_of_a_64th():
    b = torch.tensor([0.3, 0.5078125, 0.5234375, -0.5078125, -64.0, 63.984375, 64.0, -64.02])
    # 0.3 * 64 = 19.2 -> 19; 32.5 -> 32 and 33.5 -> 34 (half to even); the mantissa is 13-bit signed
    assert bias_mantissa(b).tolist() == [19, 32, 34, -32, -4096, 4095, 4095, -4096]
    assert quantize_bias(b)[:3].tolist() == [19 / 64, 0.5, 34 / 64]
    assert bias_out_of_range(b[:6]) == ""
    assert "2 of 2 bias values quantise outside" in bias_out_of_range(b[6:])


def _loihi_dense_reference(w_mant, b_mant, v_th_mant, v_decay, spikes):
    """Loihi's CUBA layer with current decay 1 in integers, as lava.proc.lif.models computes it: [T, F] -> [T, O]."""
    v = np.zeros(w_mant.shape[0], dtype=np.int64)
    out = []
    for s in spikes:
        u = (w_mant @ s.astype(np.int64)) << 6          # activation, MSB-aligned by 6 bits
        decayed = np.sign(v) * ((np.abs(v) * (4096 - v_decay)) >> 12)
        v = decayed + u + (b_mant << 6)                   # bias_mant with bias_exp 6, every step
        fired = v > (v_th_mant << 6)
        v[fired] = 0
        out.append(fired)
    return np.stack(out).astype(np.float32)


def test_block_bias_is_loihis_bias_on_the_voltage():
    """SynapseBlock with a bias spikes as an integer model of Loihi's neuron, written from Lava's equations."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(20, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-40, 40, (6, 20), generator=g) * 2 / 64)
        lin.bias.copy_(torch.randn(6, generator=g) * 0.4)
    block = SynapseBlock(lin, CubaNeuron(1.25, 1.0, 0.25))
    x = _spikes((30, 20), 2)
    with torch.no_grad():
        got = block(x.T[None])[0].T.numpy()
    w_mant = torch.round(lin.weight * 64).long().numpy()
    b_mant = torch.round(lin.bias.detach() * 64).long().numpy()
    ref = _loihi_dense_reference(w_mant, b_mant, 80, 1024, x.numpy())
    assert ref.sum() > 0 and (b_mant != 0).all()
    np.testing.assert_array_equal(got, ref)
    # and the bias matters here
    assert not np.array_equal(_loihi_dense_reference(w_mant, 0 * b_mant, 80, 1024, x.numpy()), ref)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(2, 5, 3, padding=1), lambda: nn.Linear(24, 7)],
                         ids=["conv", "dense"])
def test_block_equals_slayer_block_with_bias(make):
    from fxlava.backends.lava_dl import _slayer_block

    syn = make()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        syn.weight.copy_(torch.randn(syn.weight.shape, generator=g))
        syn.bias.copy_(torch.randn(syn.bias.shape, generator=g) * 0.5)
    block = SynapseBlock(syn, CubaNeuron(1.0, 1.0, 0.125))
    x = _spikes((3, 2, 6, 6, 16) if isinstance(syn, nn.Conv2d) else (3, 24, 16), 4)
    slayer_block = _slayer_block(block).eval()
    with torch.no_grad():
        ours, theirs = block(x), slayer_block(x)
    assert ours.sum() > 0
    assert torch.equal(ours, theirs)
    # what the netx file gets: the mantissas
    assert torch.equal(slayer_block.neuron.norm.bias.long(), block.bias_mantissa)


def test_block_refuses_bias_with_current_decay():
    with pytest.raises(ValueError, match="current decay 1"):
        SynapseBlock(nn.Linear(4, 2), CubaNeuron(1.0, 0.5, 0.0))


# --- compiled networks: graph == lava-dl -----------------------------------------------------------

def _x(T=8, N=3, shape=(2, 8, 8), seed=5):
    return _spikes((T, N, *shape), seed)


CASES = {
    "conv and linear": lambda: _seq(layer.Conv2d(2, 6, 3, padding=1), neuron.IFNode(), layer.Flatten(),
                                    layer.Linear(6 * 8 * 8, 5), neuron.LIFNode(tau=2.0, decay_input=False)),
    "pool merged into a conv": lambda: _seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(),
                                            layer.AvgPool2d(2), layer.Conv2d(4, 6, 3, padding=1), neuron.IFNode()),
    "pool merged into a linear": lambda: _seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(),
                                              layer.AvgPool2d(2), layer.Flatten(), layer.Linear(4 * 4 * 4, 6),
                                              neuron.IFNode()),
    "BatchNorm2d affine": lambda: _seq(layer.Conv2d(2, 6, 3, padding=1, bias=False),
                                       trained_batchnorm(layer.BatchNorm2d(6), 1), neuron.IFNode()),
    "BatchNorm2d not affine, after a biased conv": lambda: _seq(
        layer.SeqToANNContainer(nn.Conv2d(2, 6, 3, padding=1), trained_batchnorm(nn.BatchNorm2d(6, affine=False), 2)),
        neuron.LIFNode(tau=2.0, decay_input=False)),
    "BatchNorm1d": lambda: _seq(layer.Flatten(), layer.Linear(128, 8), trained_batchnorm(layer.BatchNorm1d(8), 3),
                                neuron.IFNode()),
    "LIF decay_input": lambda: _seq(layer.Conv2d(2, 6, 3, padding=1), neuron.LIFNode(tau=2.0)),
    "ParametricLIF decay_input": lambda: _seq(layer.Flatten(), layer.Linear(128, 8),
                                              neuron.ParametricLIFNode(init_tau=3.0)),
}


def _compiled(name, seed=0, **options):
    x = _x()
    model = lively(trained_biases(CASES[name]().eval(), seed + 11), x)
    return model, x, fxlava.compile(model, x, bias="current", **options)


def _equal_to_lava_dl(net, x):
    y = net(x)
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    return y


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_bias_graph_equals_lava_dl(name):
    model, x, net = _compiled(name)
    biased = [b for b in net.blocks if getattr(b, "bias", None) is not None]
    assert biased and any(bool(b.bias_mantissa.any()) for b in biased)
    y = _equal_to_lava_dl(net, x)
    xr = _spikes(x.shape, 9, 0.5)
    _equal_to_lava_dl(net, xr)
    assert y.sum() > 0
    # the bias changes spikes: without it the network computes something else
    unbiased = copy.deepcopy(net)
    with torch.no_grad():
        for b in unbiased.blocks:
            if getattr(b, "bias", None) is not None:
                b.synapse.bias.zero_()
    assert not torch.equal(unbiased(x), y)


def test_decay_input_by_threshold_keeps_the_bias():
    """decay_input (1/tau = 1/2) into the weights scales the bias with them; into the threshold, neither."""
    # coscale=False: co-scaling would then rescale both layers' thresholds to fill the weight range
    model, x, by_weights = _compiled("LIF decay_input", coscale=False)
    _, _, by_threshold = _compiled("LIF decay_input", decay_input_scale="threshold", coscale=False)
    bias = model[0].bias.detach()
    assert torch.equal(by_threshold.blocks[0].bias.detach(), bias)
    assert torch.equal(by_weights.blocks[0].bias.detach(), bias / 2)
    assert by_threshold.blocks[0].neuron.threshold == 2 * by_weights.blocks[0].neuron.threshold
    _equal_to_lava_dl(by_threshold, x)


def test_pipeline_replace_and_option_agree():
    model, x, net = _compiled("BatchNorm1d")
    pipeline = fxlava.default_pipeline().replace("reject_bias", bias_to_current)
    net2 = fxlava.compile(model, x, pipeline=pipeline)
    assert net2.pipeline.names == net.pipeline.names
    assert "bias_to_current" in net.pipeline.names and "reject_bias" not in net.pipeline.names
    assert torch.equal(net2(x), net(x))


def test_bias_option_is_validated():
    model = CASES["conv and linear"]()
    x = _x()
    with pytest.raises(ValueError, match=r"bias='yes': expected one of 'reject', 'current'"):
        fxlava.compile(model, x, bias="yes")
    with pytest.raises(ValueError, match="neither"):
        fxlava.compile(model, x, bias="current", pipeline=fxlava.default_pipeline().remove("reject_bias"))


def test_bias_without_opt_in_is_refused_where_blocks_are_made():
    """A pipeline without reject_bias does not let a bias through silently: fuse_blocks refuses it."""
    model = CASES["conv and linear"]()
    with pytest.raises(fxlava.UnsupportedModelError, match=r'(?s)synapse with a bias.*- 0 .*bias="current".*- 3 '):
        fxlava.compile(model, _x(), pipeline=fxlava.default_pipeline().remove("reject_bias"))


def test_compile_leaves_the_model_untouched():
    model = lively(trained_biases(CASES["BatchNorm2d not affine, after a biased conv"]().eval(), 4), _x())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxlava.compile(model, _x(), bias="current")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_table_shows_bias_range():
    from fxlava.cli import layer_table

    _, _, net = _compiled("conv and linear")
    table = layer_table(net).splitlines()
    assert table[0].endswith("bias quantised (bias_mant)")
    q, m = net.blocks[0].quantized_bias.detach(), net.blocks[0].bias_mantissa
    assert table[2].endswith(f"[{q.min():.3f}, {q.max():.3f}] ([{int(m.min())}, {int(m.max())}])")


# --- refused where it cannot be exact ------------------------------------------------------------

def _shifted(bn, var=1.0):
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(var)
    return bn


def _with_bias(synapse, values):
    with torch.no_grad():
        synapse.bias.copy_(torch.tensor(values))
    return synapse


FAILS = [
    ("bias into a CubaLIFNode with current decay 0.5",
     _seq(layer.Flatten(), layer.Linear(128, 3), lava_exchange.CubaLIFNode(0.5, 0.25)),
     r"(?s)a bias into a neuron with current decay < 1 \(2, CubaLIFNode, iDecay 2048 of 4096\).*\n  - 1 \(.*Linear\)"
     r".*fix: use a neuron with current decay 1"),
    ("bias into a CUBALIFNode with c_decay 0.5",
     _seq(layer.Flatten(), layer.Linear(128, 3), neuron.CUBALIFNode(c_decay=0.5, v_decay=0.5)),
     r"(?s)a bias into a neuron with current decay < 1 \(2, CUBALIFNode, iDecay 2048"),
    ("BatchNorm shift into a current decay",
     _seq(layer.Flatten(), layer.Linear(128, 3, bias=False), _shifted(layer.BatchNorm1d(3, affine=False)),
          neuron.CUBALIFNode(c_decay=0.25, v_decay=0.5)),
     r"(?s)a BatchNorm shift into a neuron with current decay < 1 .*\n  - 2 \(.*BatchNorm1d\)"),
    ("bias outside 13 bits",
     _seq(layer.Flatten(), _with_bias(layer.Linear(128, 3), [0.5, 64.5, -3.0]), neuron.IFNode()),
     r"(?s)a bias that Loihi's 13-bit neuron bias cannot hold.*\n  - 1 \(.*Linear\).*fix: 1 of 3 bias values "
     r"quantise outside .*\[-64, 63.9844\]"),
    ("BatchNorm shift outside 13 bits",
     _seq(layer.Flatten(), layer.Linear(128, 3, bias=False), _shifted(layer.BatchNorm1d(3, affine=False), 1e-5),
          neuron.IFNode()),
     r"(?s)BatchNorm whose shift .* cannot hold.*\n  - 2 \(.*BatchNorm1d\).*fix: 3 of 3 bias values"),
    ("biased conv into a padded average pool",  # the border windows average zeros: the bias would be diluted
     _seq(layer.Conv2d(2, 4, 3, padding=1), layer.AvgPool2d(3, stride=2, padding=1), neuron.IFNode()),
     r"(?s)a bias on a synapse that feeds no spiking neuron directly.*\n  - 0 \(.*Conv2d\).*fix: it feeds 1 "
     r"\(AvgPool2d\)"),
    ("BatchNorm shift in front of a max pool",
     _seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), _shifted(layer.BatchNorm2d(4, affine=False)),
          layer.MaxPool2d(2), neuron.IFNode()),
     r"(?s)a BatchNorm shift in front of a max pool.*\n  - 1 \(.*BatchNorm2d\).*fix: move the max pool \(2\) after"),
    ("bias in front of a max pool",
     _seq(layer.Conv2d(2, 4, 3, padding=1), layer.MaxPool2d(2), neuron.IFNode()),
     r"(?s)a bias in front of a max pool.*\n  - 0 \(.*Conv2d\)"),
]


@pytest.mark.parametrize("name,model,pattern", FAILS, ids=[f[0] for f in FAILS])
def test_bias_refused_where_not_exact(name, model, pattern):
    with pytest.raises(fxlava.UnsupportedModelError, match=pattern):
        fxlava.compile(model, _x(), bias="current")


# --- Lava ----------------------------------------------------------------------------------------

def _run_netx(path, x_nxt, reset_interval, T):
    """One sample through the netx file in Lava, built with the given reset interval (offset 1)."""
    from lava.lib.dl.netx import hdf5 as netx_hdf5
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    from lava.proc.io.sink import RingBuffer as Sink
    from lava.proc.io.source import RingBuffer as Source

    net = netx_hdf5.Network(net_config=str(path), reset_interval=reset_interval, reset_offset=1)
    layers = len(net.layers)
    data = np.zeros(tuple(net.inp.shape) + (T + layers,))
    data[..., :T] = np.transpose(x_nxt[0].numpy(), tuple(reversed(range(x_nxt.dim() - 2))) + (x_nxt.dim() - 2,))
    source, sink = Source(data=data), Sink(shape=net.out.shape, buffer=T + layers)
    source.s_out.connect(net.inp)
    net.out.connect(sink.a_in)
    try:
        net.run(condition=RunSteps(num_steps=T + layers), run_cfg=Loihi2SimCfg(select_tag="fixed_pt"))
        out = sink.data.get()
    finally:
        net.stop()
    return torch.from_numpy(out[..., layers:layers + T].astype(np.float32))


@pytest.mark.lava
@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("conv and linear", {}), ("pool merged into a conv", {}),
                                          ("BatchNorm2d affine", {}), ("ParametricLIF decay_input", {}),
                                          ("LIF decay_input", {"decay_input_scale": "threshold"})])
def test_lava_equals_lava_dl_with_bias(name, options, tmp_path):
    _, x, net = _compiled(name, **options)
    path = net.export_hdf5(tmp_path / "bias.net")
    xin = fxlava.TNX_to_NXT(x)
    expected = net.lava_dl(xin)
    assert expected.sum() > 0
    assert torch.equal(fxlava.run_lava(path, xin), expected)


@pytest.mark.lava
@pytest.mark.slow
def test_lava_needs_the_reset_for_biases(tmp_path):
    """Loaded without a reset, each layer integrates its bias before its first input arrives: Lava differs."""
    _, x, net = _compiled("conv and linear", coscale=False)  # the network measured (co-scaling changes it)
    path = net.export_hdf5(tmp_path / "bias.net")
    xin = fxlava.TNX_to_NXT(x[:, :1])
    T = x.shape[0]
    expected = net.lava_dl(xin).detach()[0]
    assert torch.equal(_run_netx(path, xin, T, T), expected)
    assert torch.equal(_run_netx(path, xin, T + 3, T), expected)
    assert not torch.equal(_run_netx(path, xin, None, T), expected)


@pytest.mark.lava
@pytest.mark.slow
def test_voltage_floor_bound(tmp_path):
    """Lava clips voltages at -(2^23 - 1)/4096: never a mismatch within voltage_floor_steps, some beyond it."""
    biases = torch.tensor([-63.984375, -16.0])
    lin = layer.Linear(100, 2)
    with torch.no_grad():
        lin.weight.fill_(254 / 64)
        lin.bias.copy_(biases)
    model = _seq(lin, neuron.IFNode())
    idles = [16, 24, 32, 36, 40, 48, 64, 128, 136, 144, 150]
    T = 160
    x = torch.zeros(T, len(idles), 100)
    for i, idle in enumerate(idles):
        x[idle:, i] = 1  # idle, then every input spikes every step
    net = fxlava.compile(model, x, bias="current")
    path = net.export_hdf5(tmp_path / "floor.net")
    xin = fxlava.TNX_to_NXT(x)
    expected, got = net.lava_dl(xin), fxlava.run_lava(path, xin)
    bound = {0: 32, 1: 128}  # (2^23 - 1) // (|bias| * 4096) steps of the bias alone
    assert net.blocks[0].voltage_floor_steps == bound[0]
    for j in range(2):
        differ = [idle for i, idle in enumerate(idles) if not torch.equal(expected[i, j], got[i, j])]
        assert differ, f"output {j}: the floor never mattered"
        assert min(differ) > bound[j]


def test_a_biased_conv_that_pools_before_its_neuron_keeps_its_bias(tmp_path):
    """conv (bias) -> BatchNorm -> average pool -> IF: the mean of current + bias is the mean current + bias, so
    the pool merges into the conv with the bias kept; against SpikingJelly on grid weights, spike for spike."""
    th = 1 + 1 / 128
    model = _seq(layer.Conv2d(2, 6, 3, padding=1), layer.BatchNorm2d(6), layer.AvgPool2d(2),
                 neuron.IFNode(v_threshold=th), layer.Flatten(), layer.Linear(6 * 4 * 4, 5),
                 neuron.IFNode(v_threshold=th))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # multiples of 1/8: averaged over 2x2 windows they stay on lava-dl's 1/32 grid
                low, high = (-6, 9) if isinstance(m, nn.Conv2d) else (-4, 5)  # the Linear reads 96 inputs: balanced
                m.weight.copy_(torch.randint(low, high, m.weight.shape, generator=g) / 8)
                m.bias.copy_(torch.randint(-24, 25, m.bias.shape, generator=g) / 64)
        bn = model[1]  # a shift on the 1/64 grid, no scale
        bn.running_mean.copy_(torch.randint(-8, 9, (6,), generator=g) / 64)
    model.eval()
    x = _spikes((10, 3, 2, 8, 8), 10, 0.4)
    net = fxlava.compile(model, x, bias="current", coscale=False)
    assert any("merged 2 into 0 before it" in m for _, m in net.records)
    functional.reset_net(model)
    with torch.no_grad():
        reference = model(x)
    y = _equal_to_lava_dl(net, x)
    assert 0 < reference.mean() < 0.9
    assert torch.equal(y, reference)
    x_nct = fxlava.TNX_to_NXT(x)
    assert torch.equal(fxlava.load_netx(net.export_hdf5(tmp_path / "pooled.net"))(x_nct), net.lava_dl(x_nct))


def test_compiled_bias_equals_spikingjelly_on_the_grid():
    """Against SpikingJelly itself: with weights, pooled weights and biases on Loihi's grids and a threshold
    between two grid points (no ties), the float SpikingJelly model and the compiled network spike alike."""
    th = 1 + 1 / 128
    model = _seq(layer.Conv2d(2, 6, 3, padding=1), neuron.IFNode(v_threshold=th), layer.AvgPool2d(2),
                 layer.Conv2d(6, 6, 3, padding=1), neuron.IFNode(v_threshold=th), layer.Flatten(),
                 layer.Linear(6 * 4 * 4, 5), neuron.IFNode(v_threshold=th))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # multiples of 1/8 stay on the 2/64 grid after the pool's 1/4; biases on the 1/64 grid
                m.weight.copy_(torch.randint(-12, 13, m.weight.shape, generator=g) / 8)
                m.bias.copy_(torch.randint(-24, 25, m.bias.shape, generator=g) / 64)
    x = _spikes((12, 4, 2, 8, 8), 6, 0.4)
    net = fxlava.compile(model, x, bias="current")
    functional.reset_net(model)
    with torch.no_grad():
        reference = model(x)
    y = _equal_to_lava_dl(net, x)
    assert reference.sum() > 0 and reference.mean() < 0.9
    assert torch.equal(y, reference)
