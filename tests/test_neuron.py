"""CubaNeuron: bit-exact with slayer's CUBA neuron, trainable with SpikingJelly surrogates."""
import fxlava  # noqa: F401  (must precede any lava import: it installs the import hook)

import pytest
import torch
from lava.lib.dl import slayer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate

from fxlava.neuron import CubaNeuron

T = 32

# (threshold, current_decay, voltage_decay)
IF_LIKE = [(th, 1.0, 0.0) for th in (0.5, 1.0, 1.3, 2.7)]
LIF_LIKE = [(th, 1.0, 1.0 / tau) for th in (0.5, 1.0, 2.7) for tau in (2, 50, 100.0)]
CUBA = [(1.0, 0.25, 0.03), (1.3, 0.3, 0.07), (2.7, 0.1, 0.2), (0.5, 0.5, 0.5)]
TRIPLES = IF_LIKE + LIF_LIKE + CUBA


def quantised_weight(out_features, in_features, generator):
    """Random weights on slayer's 8-bit grid: multiples of 2/64 in [-4, 3.96875]."""
    return torch.randint(-128, 128, (out_features, in_features), generator=generator) * (2 / 64)


def synaptic_current(weight, spikes):
    """Dense synapse in lava-dl layout: spikes [N, in, T] -> current [N, out, T]."""
    return torch.einsum("oi,nit->not", weight, spikes)


def random_current(seed, batch=4, in_features=64, out_features=128, rate=0.15):
    """Seeded random input spikes through a random quantised dense layer: [N, out, T]."""
    g = torch.Generator().manual_seed(seed)
    spikes = (torch.rand(batch, in_features, T, generator=g) < rate).float()
    return synaptic_current(quantised_weight(out_features, in_features, g), spikes)


def slayer_spikes(threshold, current_decay, voltage_decay, x):
    with torch.no_grad():
        return slayer.neuron.cuba.Neuron(threshold, current_decay, voltage_decay)(x)


# ---------------------------------------------------------------------------------------
# forward: bit-exact with slayer


@pytest.mark.parametrize("threshold,current_decay,voltage_decay", TRIPLES)
def test_spikes_equal_slayer(threshold, current_decay, voltage_decay):
    # small current decays integrate the input for long: fewer input spikes keep them from saturating
    seed = TRIPLES.index((threshold, current_decay, voltage_decay))
    x = random_current(seed, rate=0.15 * current_decay)
    expected = slayer_spikes(threshold, current_decay, voltage_decay, x)
    got = CubaNeuron(threshold, current_decay, voltage_decay)(x)
    rate = expected.mean().item()
    assert 0.02 < rate < 0.8, f"uninformative test input: firing rate {rate:.3f}"
    assert got.dtype == x.dtype and got.shape == x.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("voltage_decay", [0.0, 0.5])
def test_voltage_equal_to_threshold_does_not_fire(voltage_decay):
    # weights of exactly 0.5 and threshold 1.0: two input spikes at once (or two in a row
    # without leak) put the voltage exactly on the threshold, where Loihi does not fire.
    g = torch.Generator().manual_seed(7)
    spikes = (torch.rand(64, 3, T, generator=g) < 0.35).float()
    x = synaptic_current(torch.full((1, 3), 0.5), spikes)
    ref = slayer.neuron.cuba.Neuron(1.0, 1.0, voltage_decay)
    with torch.no_grad():
        _, voltage = ref.dynamics(x)  # voltage before reset, float32 of int / 4096
        expected = ref.spike(voltage)
    got = CubaNeuron(1.0, 1.0, voltage_decay)(x)
    ties = voltage == 1.0
    assert ties.sum() > 20 and (voltage > 1.0).sum() > 20
    assert not expected[ties].any() and not got[ties].any()
    assert torch.equal(got, expected)


def test_slayer_fires_at_ties_from_threshold_64():
    # slayer compares in float32, which loses its 0.01 / 4096 epsilon for thresholds >= 64:
    # there it fires at v == threshold. CubaNeuron follows slayer, not Loihi, in that case.
    x = torch.zeros(1, 1, 4)
    for threshold, fires in ((63.984375, 0.0), (64.0, 1.0), (100.0, 1.0)):
        x[..., :2] = threshold / 2
        expected = slayer_spikes(threshold, 1.0, 0.0, x)
        assert expected[0, 0, 1].item() == fires
        assert torch.equal(CubaNeuron(threshold, 1.0, 0.0)(x), expected)


def test_current_rounded_to_float32_as_slayer_stores_it():
    # slayer stores the current stage's output as int64 / 4096 in float32 (even for float64
    # input) and the voltage stage reads that copy: above 2**24 / 4096 = 4096 it is rounded.
    x = torch.zeros(1, 2, 4, dtype=torch.float64)
    x[:, :, 0] = -8192.0  # u = v = -2**25
    x[0, 0, 1] = 16384 + 4097 / 4096  # u = 2**25 + 4097, stored as 2**25 + 4096: v = 4096, a tie
    x[0, 1, 1] = 16384 + 4099 / 4096  # u = 2**25 + 4099, stored as 2**25 + 4100: v = 4100
    expected = slayer_spikes(1.0, 0.0, 0.0, x)
    assert expected[0, :, 1].tolist() == [0.0, 1.0]  # the exact sums would fire twice
    assert torch.equal(CubaNeuron(1.0, 0.0, 0.0)(x), expected)
    # and a long float32 run whose current passes 2**24 (current_decay 0 integrates for ever)
    x = torch.full((2, 3, 48), 3000 + 3 / 4096)
    x[1] *= -1.0
    ref = slayer.neuron.cuba.Neuron(2000.0, 0.0, 0.0)
    with torch.no_grad():
        current, _ = ref.dynamics(x)
        expected = ref(x)
    assert (current.abs() > 2**24 / 4096).any() and expected.sum() > 10
    assert torch.equal(CubaNeuron(2000.0, 0.0, 0.0)(x), expected)


def test_input_truncated_toward_zero():
    # 1/4096-grid remainders of either sign: slayer's .to(int64) truncates them toward zero
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-300, 300, (16, 32, T), generator=g) / 257.0
    for triple in ((0.5, 1.0, 0.0), (1.0, 0.3, 0.1)):
        expected = slayer_spikes(*triple, x)
        assert expected.sum() > 100
        assert torch.equal(CubaNeuron(*triple)(x), expected)


def test_stateless_and_any_layout():
    n = CubaNeuron(1.0, 0.25, 0.03)
    x = random_current(seed=11, batch=2).reshape(2, 8, 16, T)
    first = n(x)
    assert torch.equal(n(x), first)
    assert torch.equal(first, slayer_spikes(1.0, 0.25, 0.03, x))
    assert torch.equal(n(x[:, 0]), first[:, 0])  # [N, C, T] too


# ---------------------------------------------------------------------------------------
# parameters


@pytest.mark.parametrize(
    "triple,expected",
    [
        ((1.0, 1.0, 0.0), (64, 4096, 0)),
        ((1.3, 1.0, 1 / 50), (83, 4096, 82)),  # int(83.2); round(81.92)
        ((2.7, 0.3, 1 / 100.0), (172, 1229, 41)),  # int(172.8); round(1228.8); round(40.96)
        ((0.5, 2.5 / 4096, 3.5 / 4096), (32, 2, 4)),  # torch.round: half to even
        ((0.5, 1.0, (3.5 - 1e-9) / 4096), (32, 4096, 4)),  # float32(3.4999999990) == 3.5
        ((0.999, 1.0, 1 / 3), (63, 4096, 1365)),
    ],
)
def test_device_params_equal_slayer(triple, expected):
    n = CubaNeuron(*triple)
    ref = slayer.neuron.cuba.Neuron(*triple)
    assert n.device_params == ref.device_params
    assert (n.v_th_mant, n.i_decay, n.v_decay) == expected
    assert n.threshold == ref.threshold
    assert n.current_decay == slayer.utils.quantize(ref.current_decay).item() / 4096
    assert n.voltage_decay == slayer.utils.quantize(ref.voltage_decay).item() / 4096
    # what a backend builds from the neuron is the same neuron again
    assert n.to_slayer().device_params == ref.device_params
    assert slayer.neuron.cuba.neuron_params(ref.device_params) == n.neuron_params()


def test_extra_repr_names_device_params():
    text = repr(CubaNeuron(1.3, 1.0, 1 / 50, surrogate.ATan(), detach_reset=True))
    for part in ("threshold=1.296875", "vThMant=83", "iDecay=4096", "vDecay=82", "detach_reset=True", "ATan"):
        assert part in text


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(threshold=1.0, current_decay=1.5, voltage_decay=0.0), "current_decay=1.5 is outside"),
        (dict(threshold=1.0, current_decay=1.0, voltage_decay=-0.1), "voltage_decay=-0.1 is outside"),
        (dict(threshold=-1.0, current_decay=1.0, voltage_decay=0.0), "vThMant=-64"),
        (dict(threshold=2048.0, current_decay=1.0, voltage_decay=0.0), "17-bit"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CubaNeuron(**kwargs)


def test_non_spiking_surrogate_rejected():
    n = CubaNeuron(1.0, 1.0, 0.0, surrogate.Sigmoid(spiking=False))
    with pytest.raises(ValueError, match="non-spiking mode"):
        n(torch.zeros(1, 1, 4))


# ---------------------------------------------------------------------------------------
# gradients


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op):
        return op(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reference_cuba(x, n):
    """Autograd reference: float64 integer dynamics, STE truncations, Loihi's strict '>'."""
    keep_u = 1 - n.i_decay / 4096
    keep_v = 1 - n.v_decay / 4096
    level = n.v_th_mant * 64 + 0.5  # thresholds < 64 in these tests
    x_int = _STE.apply(x.double() * 4096, torch.trunc)
    u = v = torch.zeros_like(x_int[..., 0])
    spikes = []
    for t in range(x.shape[-1]):
        u = _STE.apply(u * keep_u, torch.trunc) + x_int[..., t]
        v = _STE.apply(v * keep_v, torch.trunc) + u
        s = n.surrogate_function((v - level) / 4096)
        spikes.append(s)
        v = v * (1 - (s.detach() if n.detach_reset else s))
    return torch.stack(spikes, dim=-1).to(x.dtype)


def spikes_and_grad(n, x, seed=0, ones=False):
    """Spikes and d(loss)/dx for a loss that weighs every spike (randomly, or all by one)."""
    x = x.clone().requires_grad_(True)
    s = n(x)
    g = torch.Generator().manual_seed(seed)
    (s if ones else s * torch.rand(s.shape, generator=g)).sum().backward()
    return s.detach(), x.grad


@pytest.mark.parametrize("triple", [(1.0, 1.0, 0.0), (1.3, 1.0, 1 / 50), (1.0, 0.25, 0.03), (2.7, 0.1, 0.2)])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate_cls", [surrogate.Sigmoid, surrogate.ATan])
def test_grad_equals_autograd_reference(triple, detach_reset, surrogate_cls):
    x = random_current(seed=5, batch=2, out_features=32, rate=0.15 * triple[1])
    n = CubaNeuron(*triple, surrogate_cls(), detach_reset=detach_reset)
    s, grad = spikes_and_grad(n, x)
    s_ref, grad_ref = spikes_and_grad(lambda y: reference_cuba(y, n), x)
    assert s.sum() > 50
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)


class _UnitSurrogate(torch.autograd.Function):
    """Heaviside forward, derivative 1: makes the state derivatives visible."""

    @staticmethod
    def forward(ctx, x):
        return (x >= 0).to(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_state_derivatives_are_one_minus_decay():
    # no spikes; d(s1 + s2)/dx1 = dv1/dx1 + dv2/dx1 = 1 + (1 - alpha_v) + (1 - alpha_u),
    # and without detach_reset the reset's -v ds/dv adds -(1 - alpha_v) v1 (v1 = 409/4096).
    x = torch.tensor([[[0.1, 0.2]]])
    for detach_reset, expected in ((True, 1 + 0.875 + 0.75), (False, 1 + 0.875 * (1 - 409 / 4096) + 0.75)):
        n = CubaNeuron(1.0, 0.25, 0.125, _UnitSurrogate.apply, detach_reset=detach_reset)
        s, grad = spikes_and_grad(n, x, ones=True)
        assert s.sum() == 0
        assert grad[0, 0, 1].item() == 1.0
        assert grad[0, 0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_grad_reaches_upstream_weight():
    g = torch.Generator().manual_seed(1)
    spikes = (torch.rand(8, 64, T, generator=g) < 0.2).float()
    weight = quantised_weight(32, 64, g).requires_grad_(True)
    out = CubaNeuron(1.0, 0.25, 0.03)(synaptic_current(weight, spikes))
    assert out.sum() > 0
    ((out.mean(dim=-1) - 0.1) ** 2).sum().backward()
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_the_given_surrogate_is_called():
    calls = []

    def spy(v_minus_threshold):
        calls.append(v_minus_threshold.detach().clone())
        return surrogate.Sigmoid()(v_minus_threshold)

    x = random_current(seed=2, batch=2, out_features=16)
    s, _ = spikes_and_grad(CubaNeuron(1.0, 1.0, 0.0, spy), x)
    assert len(calls) == T + 1  # each step forward, then all steps at once for the derivative
    forward_levels = torch.stack(calls[:T], dim=-1)
    assert torch.equal(s, (forward_levels >= 0).to(s))
    assert torch.equal(calls[T], forward_levels.movedim(-1, 0))
    # strict '>': the level is never 0, it sits half an integer step off the threshold
    assert (forward_levels.abs() >= 0.5 / 4096).all()


def test_surrogate_choice_changes_grad_not_spikes():
    x = random_current(seed=4, batch=2, out_features=32)
    s_sig, g_sig = spikes_and_grad(CubaNeuron(1.0, 1.0, 0.5, surrogate.Sigmoid()), x)
    s_atan, g_atan = spikes_and_grad(CubaNeuron(1.0, 1.0, 0.5, surrogate.ATan()), x)
    assert torch.equal(s_sig, s_atan) and s_sig.sum() > 50
    assert not torch.allclose(g_sig, g_atan)


def test_detach_reset_changes_grad_not_spikes():
    x = random_current(seed=6, batch=2, out_features=32)
    s_keep, g_keep = spikes_and_grad(CubaNeuron(1.0, 0.5, 0.1, detach_reset=False), x)
    s_detach, g_detach = spikes_and_grad(CubaNeuron(1.0, 0.5, 0.1, detach_reset=True), x)
    assert torch.equal(s_keep, s_detach) and s_keep.sum() > 50
    assert not torch.allclose(g_keep, g_detach)


# ---------------------------------------------------------------------------------------
# SpikingJelly


def test_equals_sj_if_node_without_ties():
    # multiples of 3/64: every voltage is a multiple of 3/64, never the threshold 64/64,
    # and the 1/64 grid makes SJ's float32 sums exact. CUBA(1, 0) is IF.
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-6, 14, (16, 64, T), generator=g) * (3 / 64)
    got = CubaNeuron(1.0, 1.0, 0.0)(x)
    if_node = sj_neuron.IFNode(v_threshold=1.0, v_reset=0.0, step_mode="m")
    with torch.no_grad():
        expected = if_node(x.permute(2, 0, 1)).permute(1, 2, 0)  # SJ is [T, N, *]
    assert 0.05 < got.mean() < 0.8
    assert torch.equal(got, expected)


def test_non_differentiable_surrogate_named_in_error():
    n = CubaNeuron(1.0, 1.0, 0.0, lambda v: (v >= 0).float())
    x = random_current(seed=8, batch=1, out_features=4).requires_grad_(True)
    with pytest.raises(RuntimeError, match="could not differentiate its surrogate_function"):
        n(x).sum().backward()
