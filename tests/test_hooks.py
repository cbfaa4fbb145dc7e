"""Forward hooks: weight reparametrisations compiled exactly, every other hook refused by module and hook.

torch.fx does not run hooks; without this a pruned model would compile its unpruned weights.
"""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron
from torch.nn.utils import parametrizations, prune

import fxlava
from tests.zoo._lively import grid_weights
from tests.sj_models import run_sj as _sj

THRESHOLD = 1 + 1 / 128


def _net():
    net = nn.Sequential(layer.Conv2d(2, 4, 3, padding=1, bias=False), neuron.IFNode(v_threshold=THRESHOLD),
                        layer.Flatten(), layer.Linear(4 * 6 * 6, 3, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
    functional.set_step_mode(net, "m")
    return grid_weights(net, 0, -14, 21, 1 / 32).eval()


def _spikes(shape=(4, 2, 2, 6, 6), seed=1):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _prune(net):
    prune.random_unstructured(net[0], "weight", amount=0.5)  # seeded by the test
    return "pruning of weight"


def _weight_norm_legacy(net):
    torch.nn.utils.weight_norm(net[3])
    with torch.no_grad():  # g changed after the hook last ran: the stored weight is stale until the next forward
        net[3].weight_g.mul_(0.5)
    return "weight_norm of weight"


def _weight_norm(net):
    parametrizations.weight_norm(net[3])
    with torch.no_grad():
        net[3].parametrizations.weight.original0.mul_(0.5)
    return "parametrization of weight (_WeightNorm)"


def _spectral_norm(net):
    torch.nn.utils.spectral_norm(net[0])
    net[0].eval()
    return "spectral_norm of weight"


@pytest.mark.parametrize("reparametrise", [_prune, _weight_norm_legacy, _weight_norm, _spectral_norm])
def test_weight_reparametrisations_compile_to_the_weights_the_model_uses(reparametrise):
    torch.manual_seed(0)
    model = _net()
    record = reparametrise(model)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _spikes()
    net = fxlava.compile(model, x, coscale=False)  # before any forward: a weight the hook stores may be stale
    ref = _sj(model, x)
    # the compiled synapse holds the effective weight: SpikingJelly's forward == the graph == lava-dl, where the
    # quantised weight equals it (the reparametrised weight is off lava-dl's grid), compare through the graph
    y = net(x)
    assert torch.equal(y, fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))
    conv, fc = [m for m in net.graph_module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:2]
    target = model[0] if reparametrise in (_prune, _spectral_norm) else model[3]
    compiled = conv if target is model[0] else fc
    assert torch.allclose(compiled.weight.detach(), target.weight.detach(), atol=1e-6)
    assert any(record in m for _, m in net.records)
    # the user's model is untouched: same state, its reparametrisation still in place, same output
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before if k in after)
    assert target._forward_pre_hooks or hasattr(target, "parametrizations")
    assert torch.equal(_sj(model, x), ref)


def test_pruned_weights_are_zero_in_the_compiled_network():
    model = _net()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    x = _spikes()
    net = fxlava.compile(model, x, coscale=False)
    conv = [m for m in net.graph_module.modules() if isinstance(m, nn.Conv2d)][0]
    assert torch.equal(conv.weight.detach() == 0, model[0].weight_mask == 0)
    ref = _sj(model, x)
    assert 0 < ref.sum() < ref.numel()
    assert torch.equal(net(x), ref)  # grid weights times a 0/1 mask stay on the grid: exact against SpikingJelly


def _scale_output(module, inputs, output):
    return output * 2


def _shift_input(module, inputs):
    return (inputs[0] + 1,)


@pytest.mark.parametrize("register,kind,fn", [
    (lambda m: m.register_forward_hook(_scale_output), "forward hook", "_scale_output"),
    (lambda m: m.register_forward_pre_hook(_shift_input), "forward pre-hook", "_shift_input"),
])
def test_other_hooks_are_refused_naming_module_and_hook(register, kind, fn):
    model = _net()
    register(model[3])
    with pytest.raises(fxlava.UnsupportedModelError,
                       match=rf"(?s)a module with a forward hook or pre-hook, which tracing does not run.*"
                             rf"- 3 \(.*Linear, {kind} {fn}\).*at .*test_hooks.py:\d+: def {fn}.*prune.remove"):
        fxlava.compile(model, _spikes())


def test_a_global_forward_hook_is_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(_scale_output)
    try:
        with pytest.raises(fxlava.UnsupportedModelError, match=r"(?s)a global forward hook.*_scale_output"):
            fxlava.compile(_net(), _spikes())
    finally:
        handle.remove()
