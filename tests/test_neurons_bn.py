"""More SpikingJelly neurons and BatchNorm: the compiled graph against SpikingJelly's own models.

The references are SpikingJelly's modules themselves. Float neurons (LIF, PLIF, CUBALIFNode)
are compared with weights on lava-dl's grid after every rescaling (so quantisation changes
nothing), with few enough steps that Loihi's truncations are exact, and with the float
threshold raised by 2**-16, less than the voltage grid: SpikingJelly fires at v >= threshold,
Loihi at v > threshold (IF neurons excepted: there the compiled threshold fires at ties as
SpikingJelly does). SpikingJelly's fixed-point ``lava_exchange.CubaLIFNode`` is compared
as it is.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional, lava_exchange, layer, neuron

import fxlava
from fxlava import frontend
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext
from fxlava.passes import fold_batchnorm

STRICT = 2.0 ** -16  # below the 2**-12 voltage grid: turns SpikingJelly's >= into Loihi's >


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _grid_weights(net, step, seed, span=20):
    """Seeded weights, multiples of ``step`` in [-span, span] steps."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                m.weight.copy_(torch.randint(-span, span + 1, m.weight.shape, generator=g) * step)
    return net


def _spikes(T, N, *shape, seed=0, rate=0.3):
    return (torch.rand(T, N, *shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _strict_reference(model, x):
    """The user's float SpikingJelly model, its leaky neurons firing at v > threshold as Loihi does.

    IF neurons fed spikes keep SpikingJelly's v >= threshold: on their grid of voltages
    ``coscale_layers`` gives Loihi the threshold mantissa that fires the same (tests/test_coscale.py).
    """
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "v_threshold") and not isinstance(m, (neuron.IFNode, neuron.SimpleIFNode)):
            m.v_threshold = m.v_threshold + STRICT
    functional.reset_net(ref)
    with torch.no_grad():
        return ref(x)


def _assert_equal_and_informative(got, expected):
    assert got.shape == expected.shape
    rate = expected.mean().item()
    assert 0.05 < rate < 0.8, f"uninformative test: output firing rate {rate:.3f}"
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------
# LIFNode(decay_input=True), ParametricLIFNode, Simple*Node, CUBALIFNode


def test_decay_input_lif_equals_sj_float_model():
    # tau = 2: weights on the grid 2/64 * tau, so w / tau (what Loihi gets) is on lava-dl's grid;
    # 8 steps keep every voltage a whole number of 1/4096 (each step halves the grid of 1/32)
    tau = 2.0
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False),
                               neuron.LIFNode(tau=tau, v_threshold=0.5),
                               layer.Linear(32, 16, bias=False), neuron.LIFNode(tau=tau, v_threshold=0.75)),
                          step=2 / 64 * tau, seed=1)
    x = _spikes(8, 16, 3, 4, 4, seed=2)
    weights = [m.weight.clone() for m in model.modules() if isinstance(m, nn.Linear)]
    net = fxlava.compile(model, x)
    _assert_equal_and_informative(net(x), _strict_reference(model, x))
    for b, w in zip([b for b in net.blocks if b.kind == "dense"], weights):
        assert torch.equal(b.quantized_weight, w / tau * b.scale)  # on the grid: quantisation changed nothing
    # the user's weights are untouched
    assert all(torch.equal(m.weight, w) for m, w in zip([m for m in model.modules() if isinstance(m, nn.Linear)],
                                                           weights))


def test_decay_input_into_threshold_equals_sj_float_model():
    tau = 2.0
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False),
                               neuron.LIFNode(tau=tau, v_threshold=0.5),
                               layer.Linear(32, 16, bias=False), neuron.LIFNode(tau=tau, v_threshold=0.75)),
                          step=2 / 64, seed=3)
    x = _spikes(8, 16, 3, 4, 4, seed=4)
    net = fxlava.compile(model, x, decay_input_scale="threshold")
    # threshold x tau, times the layer's (integer: grid weights) co-scaling factor
    assert [b.neuron.v_th_mant / b.scale for b in net.blocks if b.kind == "dense"] == [64, 96]
    _assert_equal_and_informative(net(x), _strict_reference(model, x))


def test_shared_synapse_gets_the_threshold_scale():
    # one Linear called twice: scaling its weights for one neuron would scale them for both
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer.Linear(24, 24, bias=False, step_mode="m")
            self.sn1 = neuron.LIFNode(tau=2.0, v_threshold=0.5, step_mode="m")
            self.sn2 = neuron.IFNode(v_threshold=0.75, step_mode="m")

        def forward(self, x):
            return self.sn2(self.fc(self.sn1(self.fc(x))))

    model = _grid_weights(Twice(), step=2 / 64, seed=5)
    x = _spikes(8, 16, 24, seed=6)
    net = fxlava.compile(model, x)
    assert any("threshold x 2" in msg for _, msg in net.records)
    _assert_equal_and_informative(net(x), _strict_reference(model, x))


# w = 0: sigmoid(w) = 1/2 (tau = 2); this float32 w: sigmoid(w) = 1/4 exactly (tau = 4), whose
# 3/4 leak quarters the voltage grid per step: 4 steps stay whole
W_QUARTER = -1.0986123085021973


@pytest.mark.parametrize("w,decay_input", [(0.0, True), (0.0, False), (W_QUARTER, True), (W_QUARTER, False)])
def test_parametric_lif_equals_sj_float_model(w, decay_input):
    q = torch.tensor(w, dtype=torch.float32).sigmoid().item()
    assert q in (0.5, 0.25)
    plifs = [neuron.ParametricLIFNode(decay_input=decay_input, v_threshold=th) for th in (0.5, 1.25)]
    for plif in plifs:
        with torch.no_grad():
            plif.w.fill_(w)  # as trained
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False), plifs[0],
                               layer.Linear(32, 16, bias=False), plifs[1]),
                          step=2 / 64 / (q if decay_input else 1), seed=7, span=20 if q == 0.5 else 10)
    x = _spikes(8 if q == 0.5 else 4, 64, 3, 4, 4, seed=8)
    net = fxlava.compile(model, x)
    assert [b.neuron.v_decay for b in net.blocks if b.kind == "dense"] == [int(4096 * q)] * 2
    _assert_equal_and_informative(net(x), _strict_reference(model, x))
    frozen = [msg for name, msg in net.records if name == "substitute_neurons" and f"frozen at {1 / q:g}" in msg]
    assert len(frozen) == 2
    assert not any(name.endswith(".w") for name, _ in net.named_parameters())  # tau no longer trains


def test_simple_nodes_equal_sj_float_model():
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False),
                               neuron.SimpleLIFNode(tau=2.0, decay_input=True, v_threshold=0.5),
                               layer.Linear(32, 16, bias=False), neuron.SimpleIFNode(v_threshold=1.5)),
                          step=2 / 64 * 2, seed=9)
    x = _spikes(8, 16, 3, 4, 4, seed=10)
    net = fxlava.compile(model, x)
    _assert_equal_and_informative(net(x), _strict_reference(model, x))


@pytest.mark.parametrize("c_decay,v_decay", [(0.5, 0.75), (0.75, 0.5)])
def test_cubalif_node_equals_sj_float_model(c_decay, v_decay):
    # c = c_decay c + x, v = v_decay v + c: a 3/4 leak quarters the grid of 1/32 per step; 4 steps stay whole
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(48, 32, bias=False),
                               neuron.CUBALIFNode(c_decay=c_decay, v_decay=v_decay, v_threshold=0.75),
                               layer.Linear(32, 16, bias=False),
                               neuron.CUBALIFNode(c_decay=c_decay, v_decay=v_decay, v_threshold=0.5)),
                          step=2 / 64, seed=11, span=10)
    x = _spikes(4, 64, 3, 4, 4, seed=12)
    net = fxlava.compile(model, x)
    decays = (int(4096 * (1 - c_decay)), int(4096 * (1 - v_decay)))
    assert [(b.neuron.i_decay, b.neuron.v_decay) for b in net.blocks if b.kind == "dense"] == [decays] * 2
    _assert_equal_and_informative(net(x), _strict_reference(model, x))


# ---------------------------------------------------------------------------------------
# lava_exchange.CubaLIFNode: bit for bit


def test_sj_cuba_lif_node_equals_compiled_bit_for_bit():
    model = _grid_weights(_seq(
        layer.Flatten(),
        layer.Linear(48, 32, bias=False), lava_exchange.CubaLIFNode(0.25, 0.03),
        layer.Linear(32, 32, bias=False), lava_exchange.CubaLIFNode(1.0, 0.1, v_threshold=0.75, requires_grad=True),
        layer.Linear(32, 16, bias=False), lava_exchange.CubaLIFNode(0.5, 0.0, v_threshold=1.5)), step=2 / 64, seed=13)
    x = _spikes(32, 8, 3, 4, 4, seed=14)
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(x)  # SpikingJelly's own fixed-point arithmetic, no adjustment
    net = fxlava.compile(model, x)
    assert any("learnable decays frozen" in msg for _, msg in net.records)
    _assert_equal_and_informative(net(x), expected)


@pytest.mark.parametrize("threshold", [1.0, 0.296875, 0.3, 0.5 + 1 / 256, 1 + 1 / 8192, 1 + 1 / 64 + 1 / 4096])
def test_sj_cuba_lif_threshold_compiled_iff_it_fires_where_loihi_does(threshold):
    # one step of input k / 4096 for every k: the neuron fires iff its voltage k reaches its level
    k = torch.arange(0, 3 * 4096, dtype=torch.float32)
    current = (k / 4096).reshape(1, -1)
    sj = lava_exchange.CubaLIFNode(1.0, 0.0, v_threshold=threshold, step_mode="m")
    with torch.no_grad():
        sj_spikes = sj(current.unsqueeze(-1))[0, :, 0]
    loihi = CubaNeuron(threshold, 1.0, 0.0)(current.reshape(-1, 1))[:, 0]
    same = torch.equal(sj_spikes, loihi)
    model = _seq(layer.Flatten(), layer.Linear(16, 4, bias=False),
                 lava_exchange.CubaLIFNode(1.0, 0.0, v_threshold=threshold))
    x = torch.zeros(2, 1, 16)
    if same:
        fxlava.compile(model, x)
    else:
        with pytest.raises(fxlava.UnsupportedModelError, match=r"v_threshold=.*not a multiple of 1/64"):
            fxlava.compile(model, x)
    assert same == (threshold * 64 == int(threshold * 64) or threshold == 1 + 1 / 8192)


# ---------------------------------------------------------------------------------------
# BatchNorm


def _bn_stats(bn, seed, affine_gamma=True):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.1)
        if bn.weight is not None and affine_gamma:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
    return bn


def _torch_batch_norm(bn, y):
    """torch's own eval-mode batch norm of ``y`` (float64) with ``bn``'s statistics and parameters."""
    def f64(t):
        return None if t is None else t.detach().double()

    return F.batch_norm(y, f64(bn.running_mean), f64(bn.running_var), f64(bn.weight), f64(bn.bias),
                        training=False, eps=bn.eps)


def _fold(model, x):
    gm, mode = frontend.trace(model, x)
    ctx = CompileContext(example_input=x, step_mode=mode, input_shape=tuple(x.shape[2:]))
    fold_batchnorm(gm, ctx)
    return gm


@pytest.mark.parametrize("bn", [
    nn.BatchNorm2d(6), layer.BatchNorm2d(6, affine=False, eps=1e-3),
    layer.ThresholdDependentBatchNorm2d(alpha=1.0, v_th=0.5, num_features=6)], ids=type)
def test_batchnorm_folds_into_conv_as_float_bn_in_eval_mode(bn):
    conv = layer.Conv2d(3, 6, 3, padding=1, bias=False)
    _bn_stats(bn, seed=1)
    if isinstance(bn, layer.ThresholdDependentBatchNorm2d):  # multi-step only
        model = _seq(conv, bn, neuron.IFNode())
    else:
        model = _seq(layer.SeqToANNContainer(conv, bn), neuron.IFNode())
    x = _spikes(2, 4, 3, 5, 5, seed=2)
    gm = _fold(model, x)
    types = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert types == ["Conv2d", "IFNode"]
    folded = gm.get_submodule(next(n.target for n in gm.graph.nodes if n.op == "call_module"))
    xr = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = _torch_batch_norm(bn, F.conv2d(xr, conv.weight.double(), padding=1))
        got = F.conv2d(xr, folded.weight.double(), padding=1)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(folded.weight, conv.weight)  # a real fold


def test_batchnorm1d_folds_into_linear():
    lin = layer.Linear(12, 5, bias=False)
    bn = _bn_stats(layer.BatchNorm1d(5), seed=3)
    model = _seq(layer.Flatten(), lin, bn, neuron.IFNode())
    gm = _fold(model, _spikes(2, 3, 12, seed=4))
    folded = gm.get_submodule("1")
    xr = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = _torch_batch_norm(bn, xr @ lin.weight.double().T)
    assert torch.allclose(xr @ folded.weight.double().T, expected, rtol=1e-6, atol=1e-6)


def test_batchnorm_fold_then_quantised_equals_float_model():
    # BN with gamma / sqrt(var + eps) a power of two, so folded weights stay on the grid
    model = _seq(layer.Flatten(), layer.Linear(48, 32, bias=False), layer.BatchNorm1d(32, affine=False, eps=0.0),
                 neuron.IFNode(v_threshold=0.5), layer.Linear(32, 16, bias=False), neuron.IFNode())
    _grid_weights(model, step=4 / 64, seed=5, span=12)  # x 1/2 stays on the 2/64 grid
    with torch.no_grad():
        model[2].running_var.copy_(4.0 ** torch.randint(-1, 2, (32,), generator=torch.Generator().manual_seed(6)))
    model.eval()
    x = _spikes(8, 16, 3, 4, 4, seed=7)
    net = fxlava.compile(model, x)
    _assert_equal_and_informative(net(x), _strict_reference(model, x))


def test_training_mode_compiles_with_running_statistics():
    bn = _bn_stats(layer.BatchNorm1d(8), seed=8)
    model = _grid_weights(_seq(layer.Flatten(), layer.Linear(12, 8, bias=False), bn, neuron.IFNode()),
                          step=2 / 64, seed=9)
    model.train()
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    x = _spikes(4, 3, 12, seed=10)
    net = fxlava.compile(model, x)
    assert model.training and bn.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    expected = (model[1].weight.double() * scale[:, None]).float()
    (block,) = [b for b in net.blocks if b.kind == "dense"]
    assert torch.equal(block.synapse.weight, expected)
    assert torch.equal(net(x), fxlava.compile(copy.deepcopy(model).eval(), x)(x))


def test_batchnorm_with_the_smallest_shift_is_refused():
    bn = _bn_stats(layer.BatchNorm1d(8), seed=11)
    with torch.no_grad():
        bn.running_mean[3] = 1e-30
    model = _seq(layer.Flatten(), layer.Linear(12, 8, bias=False), bn, neuron.IFNode())
    with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)non-zero shift.*- 2 .*BatchNorm1d.*1 of 8 channels"):
        fxlava.compile(model, _spikes(2, 1, 12))
