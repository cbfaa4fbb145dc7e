"""Per-pass unit tests: a tiny model, the canonical graph, one pass, the nodes that result."""
import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron, surrogate

import fxlava
from fxlava import frontend
from fxlava.blocks import FlattenBlock, SynapseBlock
from fxlava.neuron import CubaNeuron
from fxlava.pass_manager import CompileContext
from fxlava.passes import avgpool_to_sumpool, fuse_blocks, insert_layout, reject_bias, remove_identities, \
    substitute_neurons


def _canonical(model, x):
    gm, mode = frontend.trace(model, x)
    return gm, CompileContext(example_input=x, step_mode=mode, input_shape=tuple(x.shape[2:]))


def _types(gm):
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _grid(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        with torch.no_grad():
            p.copy_(torch.randint(-20, 21, p.shape, generator=g) / 32)  # exact binary fractions
    return m


def test_frontend_expands_containers_and_flattens():
    model = _seq(layer.SeqToANNContainer(nn.Conv2d(1, 2, 3, bias=False), nn.Dropout(0.5)), neuron.IFNode(),
                 layer.Flatten(), layer.Linear(72, 3, bias=False), neuron.IFNode())
    gm, _ = _canonical(model, torch.zeros(2, 1, 1, 8, 8))
    # Dropout is an identity in eval mode: the frontend drops it wherever it stands
    assert _types(gm) == ["Conv2d", "IFNode", "Flatten", "Linear", "IFNode"]
    paths = [n.meta["fxlava_path"] for n in gm.graph.nodes if n.op == "call_module"]
    assert paths == ["0.0", "1", "2", "3", "4"]
    assert gm.meta["fxlava_dropped"] == ["0.1"]


def test_canonical_graph_runs_like_the_model():
    model = _grid(_seq(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(), layer.Flatten(),
                       layer.Linear(72, 3, bias=False), neuron.IFNode()))
    x = (torch.rand(6, 2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    gm, _ = _canonical(model, x)
    with torch.no_grad():
        assert torch.equal(frontend.run_per_step(gm, x), model(x))


def test_remove_identities():
    gm, ctx = _canonical(_seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.IFNode()),
                         torch.zeros(2, 1, 1, 8, 8))
    # tracing already drops them; a user's pass may put some back
    flatten = next(n for n in gm.graph.nodes if n.op == "call_module")
    for name, m in (("ident", nn.Identity()), ("drop", layer.Dropout(0.3))):
        gm.add_submodule(name, m)
        with gm.graph.inserting_after(flatten):
            new = gm.graph.call_module(name, (flatten,))
        flatten.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        flatten = new
    gm.recompile()
    assert _types(gm) == ["Flatten", "Identity", "Dropout", "Linear", "IFNode"]
    res = remove_identities(gm, ctx)
    assert res.modified and _types(gm) == ["Flatten", "Linear", "IFNode"]


def test_reject_bias_names_all():
    gm, ctx = _canonical(_seq(layer.Flatten(), layer.Linear(64, 8), neuron.IFNode(), layer.Linear(8, 3),
                              neuron.IFNode()), torch.zeros(2, 1, 1, 8, 8))
    reject_bias(gm, ctx)  # refuses through the context and leaves the nodes in place
    assert [i.path for i in ctx.issues] == ["1", "3"]
    assert [ctx.is_refused(n) for n in gm.graph.nodes if n.op == "call_module"] == [False, True, False, True, False]


@pytest.mark.parametrize("k", [2, 3])
def test_avgpool_into_conv_is_exact(k):
    """pool -> conv becomes one conv; the canonical graph computes the same spikes before and after."""
    model = _grid(_seq(layer.Conv2d(1, 3, 3, padding=1, bias=False), neuron.IFNode(),
                       layer.AvgPool2d(k), layer.Conv2d(3, 2, 3, padding=1, bias=False), neuron.IFNode()))
    x = (torch.rand(6, 2, 1, 12, 12, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    gm, ctx = _canonical(model, x)
    before = frontend.run_per_step(gm, x)
    avgpool_to_sumpool(gm, ctx)
    assert _types(gm) == ["Conv2d", "IFNode", "Conv2d", "IFNode"]
    merged = gm.get_submodule("3")
    assert merged.stride == (k, k) and merged.padding == (k, k) and merged.kernel_size == (3 * k, 3 * k)
    after = frontend.run_per_step(gm, x)
    assert before.sum() > 0 and torch.equal(before, after)


def test_avgpool_into_dense_uses_the_pools_own_kernel():
    """SpikingJelly's to_lava_blocks takes k from the wrong layer; here a 3x3 pool scales by 1/9, not 1/4."""
    model = _grid(_seq(layer.Conv2d(1, 2, 3, padding=1, bias=False), neuron.IFNode(),
                       layer.AvgPool2d(3), layer.Flatten(), layer.Linear(2 * 3 * 3, 4, bias=False), neuron.IFNode()))
    x = (torch.rand(6, 2, 1, 10, 10, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    gm, ctx = _canonical(model, x)
    lin = gm.get_submodule("4")
    before = frontend.run_per_step(gm, x)
    avgpool_to_sumpool(gm, ctx)
    assert _types(gm) == ["Conv2d", "IFNode", "Flatten", "Linear"][:3] + ["Linear", "IFNode"]
    new = gm.get_submodule("4")
    assert new.in_features == 2 * 10 * 10
    # each pooled weight is spread over its 3x3 window at 1/9; the border the pool drops gets 0
    w = new.weight.reshape(4, 2, 10, 10)
    assert torch.allclose(w[:, :, :3, :3], lin.weight.reshape(4, 2, 3, 3)[:, :, :1, :1] / 9)
    assert torch.all(w[:, :, 9, :] == 0) and torch.all(w[:, :, :, 9] == 0)
    after = frontend.run_per_step(gm, x)
    assert before.sum() > 0
    assert torch.allclose(before, after)


def test_avgpool_into_neuron_scales_threshold():
    model = _grid(_seq(layer.Conv2d(1, 3, 3, padding=1, bias=False), neuron.IFNode(),
                       layer.AvgPool2d(2), neuron.IFNode(v_threshold=0.5)))
    x = (torch.rand(6, 2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    gm, ctx = _canonical(model, x)
    before = frontend.run_per_step(gm, x)
    avgpool_to_sumpool(gm, ctx)
    pool = gm.get_submodule("2")
    assert isinstance(pool, nn.Conv2d) and pool.groups == 3 and torch.all(pool.weight == 1)
    assert gm.get_submodule("3").v_threshold == 2.0
    assert torch.equal(before, frontend.run_per_step(gm, x))


@pytest.mark.parametrize("k,stride,dilation", [(2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 1, 2)])
def test_a_pool_between_a_conv_and_its_neuron_merges_into_the_conv(k, stride, dilation, tmp_path):
    """conv -> pool -> neuron (a block that pools before firing) becomes one conv with the pool's stride."""
    model = _grid(_seq(layer.Conv2d(1, 3, 3, padding=dilation, stride=stride, dilation=dilation, bias=False),
                       layer.AvgPool2d(k), neuron.IFNode(v_threshold=0.5), layer.Flatten(),
                       layer.Linear(3 * (12 // stride // k) ** 2, 4, bias=False), neuron.IFNode()))
    x = (torch.rand(6, 2, 1, 12, 12, generator=torch.Generator().manual_seed(5)) < 0.5).float()
    gm, ctx = _canonical(model, x)
    before = frontend.run_per_step(gm, x)
    avgpool_to_sumpool(gm, ctx)
    assert _types(gm) == ["Conv2d", "IFNode", "Flatten", "Linear", "IFNode"]
    merged = gm.get_submodule("0")
    size = dilation * 2 + stride * (k - 1) + 1
    assert merged.kernel_size == (size, size) and merged.stride == (stride * k, stride * k)
    after = frontend.run_per_step(gm, x)
    assert before[:, :, :4].sum() > 0 and torch.allclose(before, after)
    net = fxlava.compile(model, x)
    x_nct = fxlava.TNX_to_NXT(x)
    assert torch.equal(net(x), fxlava.NXT_to_TNX(net.lava_dl(x_nct)))
    assert torch.equal(fxlava.load_netx(net.export_hdf5(tmp_path / "pooled.net"))(x_nct), net.lava_dl(x_nct))


def test_a_pool_between_a_conv_and_its_neuron_is_exact_against_spikingjelly():
    """On weights whose merged values stay on lava-dl's grid (multiples of 1/8, averaged over 2x2), with a
    threshold between grid points: the compiled network spikes as SpikingJelly does, step for step."""
    model = _seq(layer.Conv2d(2, 4, 3, padding=1, bias=False), layer.AvgPool2d(2),
                 neuron.IFNode(v_threshold=1 + 1 / 128), layer.Flatten(), layer.Linear(4 * 4 * 4, 5, bias=False),
                 neuron.IFNode(v_threshold=1 + 1 / 128))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randint(-6, 9, m.weight.shape, generator=g) / 8)
    x = (torch.rand(8, 3, 2, 8, 8, generator=torch.Generator().manual_seed(7)) < 0.4).float()
    net = fxlava.compile(model, x, coscale=False)
    functional.reset_net(model)
    with torch.no_grad():
        expected = model(x)
    assert 0 < expected.mean() < 0.9
    assert torch.equal(net(x), expected)


def test_substitute_neurons_keeps_surrogate_and_detach_reset():
    sg = surrogate.ATan(alpha=3.0)
    gm, ctx = _canonical(_seq(layer.Flatten(), layer.Linear(64, 3, bias=False),
                              neuron.LIFNode(tau=4.0, decay_input=False, v_threshold=1.5, surrogate_function=sg,
                                             detach_reset=True)), torch.zeros(2, 1, 1, 8, 8))
    substitute_neurons(gm, ctx)
    cuba = gm.get_submodule("2")
    assert isinstance(cuba, CubaNeuron)
    assert isinstance(cuba.surrogate_function, surrogate.ATan) and cuba.surrogate_function.alpha == 3.0
    assert cuba.detach_reset is True
    assert (cuba.v_th_mant, cuba.i_decay, cuba.v_decay) == (96, 4096, 1024)


def test_fuse_and_layout():
    gm, ctx = _canonical(_seq(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(), layer.Flatten(),
                              layer.Linear(72, 3, bias=False), neuron.IFNode()), torch.zeros(2, 1, 1, 8, 8))
    substitute_neurons(gm, ctx)
    fuse_blocks(gm, ctx)
    assert _types(gm) == ["SynapseBlock", "FlattenBlock", "SynapseBlock"]
    assert gm.get_submodule("block0").source == ("0", "1")
    insert_layout(gm, ctx)
    fns = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    assert fns == ["TNX_to_NXT", "NXT_to_TNX"]
    gm.recompile()
    assert gm(torch.zeros(5, 2, 1, 8, 8)).shape == (5, 2, 3)
    assert isinstance(gm.get_submodule("block1"), FlattenBlock)
    assert isinstance(gm.get_submodule("block2"), SynapseBlock)


@pytest.mark.parametrize("adaptive,plain,size", [(nn.AdaptiveAvgPool2d, "AvgPool2d", (3, 2)),
                                                 (nn.AdaptiveMaxPool2d, "MaxPool2d", (1, 4)),
                                                 (nn.AdaptiveAvgPool2d, "AvgPool2d", (None, 2))])
def test_lower_adaptive_pools_keeps_the_output(adaptive, plain, size):
    from fxlava.passes import lower_adaptive_pools

    model = _grid(_seq(layer.Conv2d(1, 3, 3, padding=1, bias=False), neuron.IFNode(),
                       layer.SeqToANNContainer(adaptive(size)), layer.Conv2d(3, 2, 1, bias=False), neuron.IFNode()))
    with torch.no_grad():
        model[3].weight.fill_(0.75)  # fires on about one spike and a half in the pooled window
    x = (torch.rand(5, 2, 1, 6, 8, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    gm, ctx = _canonical(model, x)
    model_graph = _types(gm)
    before = frontend.run_per_step(gm, x)
    assert lower_adaptive_pools(gm, ctx).modified
    assert _types(gm) == [plain if t == adaptive.__name__ else t for t in model_graph]
    after = frontend.run_per_step(gm, x)
    assert before.sum() > 0 and torch.equal(before, after)
