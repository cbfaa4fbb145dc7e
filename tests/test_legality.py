"""Legality decided where each pass runs: one error with every problem, nothing found in a second round.

Each pass decides on the graph it receives and refuses nodes through ``ctx.refuse``; refused
nodes stay in place, later passes leave them (and what follows from them) alone, and compile
raises one UnsupportedModelError at the end. fuse_blocks refuses whatever no pass lowered, with
the target description's fix, whatever the pipeline.
"""
import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from spikingjelly.activation_based import functional, lava_exchange, layer, neuron

import fxlava
from fxlava.passes import default_pipeline
from tests.zoo._lively import grid_weights

THRESHOLD = 1 + 1 / 128  # vThMant 64: SpikingJelly's v >= th and Loihi's v > 64/64 agree on the 1/32 grid


def _seq(*mods):
    net = nn.Sequential(*mods)
    functional.set_step_mode(net, "m")
    return net


def _grid(model, seed=0, step=1 / 32):
    return grid_weights(model, seed, -20, 21, step).eval()


def _spikes(shape, seed, rate=0.4):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _paths(model, x, pipeline=None):
    with pytest.raises(fxlava.UnsupportedModelError) as info:
        fxlava.compile(model, x, pipeline=pipeline)
    return [i.path for i in info.value.issues], info.value


# --- the adaptive pool -> CubaLIFNode model compiled wrongly before ------------------------------------------

def _adaptive_pool_into_cuba_lif():
    return _grid(_seq(layer.Conv2d(1, 2, 3, padding=1, bias=False), neuron.IFNode(v_threshold=THRESHOLD),
                      layer.SeqToANNContainer(nn.AdaptiveAvgPool2d(4)),
                      lava_exchange.CubaLIFNode(current_decay=0.3, voltage_decay=0.3)), step=1 / 16)


def test_adaptive_pool_into_cuba_lif_is_refused_or_spike_exact():
    """Refused, or equal to SpikingJelly's own forward on every spike of 40 random inputs."""
    model = _adaptive_pool_into_cuba_lif()
    x = _spikes((6, 2, 1, 8, 8), 0)
    try:
        net = fxlava.compile(model, x)
    except fxlava.UnsupportedModelError as exc:
        assert [(i.path, i.reason.split(":")[0]) for i in exc.issues] == [("3", "a CubaLIFNode fed by an average pool")]
        return
    for seed in range(40):
        x = _spikes((6, 2, 1, 8, 8), seed)
        functional.reset_net(model)
        with torch.no_grad():
            assert torch.equal(net(x), model(x)), f"input {seed}"


def test_a_check_sees_the_graph_its_pass_receives():
    """lower_adaptive_pools makes the AvgPool2d that avgpool_to_sumpool then judges: the same refusal as for AvgPool2d."""
    x = _spikes((6, 2, 1, 8, 8), 0)
    adaptive = _adaptive_pool_into_cuba_lif()
    plain = _adaptive_pool_into_cuba_lif()
    plain[2] = layer.AvgPool2d(2, step_mode="m")
    assert _paths(adaptive, x)[0] == _paths(plain, x)[0] == ["3"]


# --- every problem in one error, in model order --------------------------------------------------------------

def _biased_with_trailing_synapse():
    return _seq(layer.Flatten(), layer.Linear(64, 8), neuron.IFNode(), layer.Linear(8, 8), neuron.IFNode(),
                layer.Linear(8, 3, bias=False))


def _biased_with_trailing_prelu():
    return _seq(layer.Flatten(), layer.Linear(64, 8), neuron.IFNode(), layer.Linear(8, 3), neuron.IFNode(),
                layer.SeqToANNContainer(nn.PReLU()))


@pytest.mark.parametrize("build,expected", [
    (_biased_with_trailing_synapse, ["1", "3"]),
    (_biased_with_trailing_prelu, ["1", "3"]),
], ids=["trailing synapse", "trailing PReLU"])
def test_biases_in_one_error_a_trailing_head_on_the_host(build, expected):
    paths, err = _paths(build(), torch.zeros(4, 1, 1, 8, 8))
    assert paths == expected  # model order; the trailing layer after the last neuron is net.readout
    assert "synapse with a bias" in str(err)


def _mnist_plif(bias_fixed=False, bn_fixed=False):
    """SpikingJelly's own parametric_lif_net.MNISTNet: BatchNorms with trained statistics and biased Linears."""
    from spikingjelly.activation_based.model import parametric_lif_net

    torch.manual_seed(0)
    net = parametric_lif_net.MNISTNet(channels=4, spiking_neuron=neuron.IFNode, v_threshold=THRESHOLD)
    functional.set_step_mode(net, "m")
    net.conv_fc[10] = layer.Linear(4 * 7 * 7, 32, bias=not bias_fixed, step_mode="m")
    net.conv_fc[13] = layer.Linear(32, 100, bias=not bias_fixed, step_mode="m")
    for bn in (net.conv_fc[1], net.conv_fc[5]):
        with torch.no_grad():
            bn.running_var.uniform_(0.5, 2.0)
            if not bn_fixed:  # a shift: beta - gamma * mean / sqrt(var + eps) != 0
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.bias.uniform_(-0.1, 0.1)
    return net.eval()


def _lif_after_adaptive_pool(fixed=False):
    return _seq(layer.Conv2d(1, 2, 3, padding=1, bias=not fixed), neuron.IFNode(),
                layer.SeqToANNContainer(nn.AdaptiveAvgPool2d(4)),
                neuron.IFNode() if fixed else lava_exchange.CubaLIFNode(0.3, 0.3),
                layer.Flatten(), layer.Linear(32, 3, bias=False), neuron.IFNode(v_reset=0.0 if fixed else None))


def _maxpool_cases(fixed=False):
    mods = [layer.Conv2d(1, 2, 3, padding=1, bias=False), neuron.IFNode(), layer.MaxPool2d(2),
            layer.Conv2d(2, 2, 3, padding=1, bias=False)]
    mods += [neuron.IFNode(), layer.MaxPool2d(2)] if fixed else [layer.MaxPool2d(2), neuron.QIFNode()]
    return _seq(*mods, layer.Flatten(), layer.Linear(8, 3, bias=False), neuron.IFNode())


def _with_trailing_synapse(fixed=False):
    return _seq(*(list(_biased_with_trailing_synapse()) if not fixed else [
        layer.Flatten(), layer.Linear(64, 8, bias=False), neuron.IFNode(), layer.Linear(8, 8, bias=False),
        neuron.IFNode(), layer.Linear(8, 3, bias=False), neuron.IFNode()]))


# (broken model, the model with every listed problem fixed as its fix says, input, paths listed)
FIXES = [
    ("SpikingJelly MNISTNet", lambda: _mnist_plif(), lambda: _mnist_plif(True, True), (4, 2, 1, 28, 28),
     ["conv_fc.1", "conv_fc.5", "conv_fc.10", "conv_fc.13"]),
    ("adaptive pool into CubaLIFNode", lambda: _lif_after_adaptive_pool(), lambda: _lif_after_adaptive_pool(True),
     (4, 2, 1, 8, 8), ["0", "3", "6"]),
    ("max pools", lambda: _maxpool_cases(), lambda: _maxpool_cases(True), (4, 2, 1, 8, 8), ["4", "4", "5"]),
    ("biases and a trailing synapse", lambda: _with_trailing_synapse(), lambda: _with_trailing_synapse(True),
     (4, 2, 1, 8, 8), ["1", "3"]),
]


@pytest.mark.parametrize("name,broken,fixed,shape,expected", FIXES, ids=[f[0] for f in FIXES])
def test_fixing_everything_listed_reveals_no_new_problem(name, broken, fixed, shape, expected):
    x = _spikes(shape, 1)
    paths, _ = _paths(broken(), x)
    assert paths == expected
    net = fxlava.compile(fixed(), x)
    assert net.blocks


def test_a_pool_that_cannot_merge_into_a_refused_synapse_is_reported_with_it():
    """The merge is tried even though the conv is refused for its bias: fixing the bias then reveals nothing."""
    def build(bias):
        return _seq(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(), layer.AvgPool2d(2),
                    layer.Conv2d(2, 2, 3, padding=1, bias=bias), neuron.IFNode())

    x = torch.zeros(4, 1, 1, 9, 9)  # the pool drops a border the padded conv would read
    biased, unbiased = _paths(build(True), x), _paths(build(False), x)
    assert biased[0] == ["2", "3"] and unbiased[0] == ["2"]
    assert "cannot be merged into the next synapse" in str(biased[1])


def test_a_do_nothing_user_pass_does_not_change_the_error():
    model = _seq(layer.Flatten(), layer.Linear(64, 8, bias=False), nn.ReLU(), layer.Linear(8, 3, bias=False),
                 neuron.IFNode())
    x = torch.zeros(4, 1, 1, 8, 8)
    _, plain = _paths(model, x)
    _, with_pass = _paths(model, x, default_pipeline().insert_after("reject_bias", lambda gm, ctx: None))
    assert str(plain) == str(with_pass)
    assert "Loihi layers pass spikes, not activations" in str(plain)  # the target description's fix


def test_whatever_no_pass_lowered_is_refused_with_the_targets_fix():
    """Without fold_batchnorm in the pipeline, a BatchNorm is refused by fuse_blocks, naming the pass to keep."""
    model = _seq(layer.Conv2d(1, 2, 3, bias=False), layer.BatchNorm2d(2), neuron.IFNode())
    paths, err = _paths(model, torch.zeros(4, 1, 1, 8, 8), default_pipeline().remove("fold_batchnorm"))
    assert paths == ["1"] and "keep the fold_batchnorm pass in the pipeline" in str(err)


def test_old_style_pass_that_raises_is_collected_with_the_others():
    def refuse_first_conv(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        raise fxlava.UnsupportedModelError([fxlava.errors.issue_at(node, "a user's rule", "follow it")])

    model = _seq(layer.Conv2d(1, 2, 3), neuron.IFNode(v_reset=None), layer.Flatten(), layer.Linear(72, 3, bias=False),
                 neuron.IFNode())
    paths, err = _paths(model, torch.zeros(4, 1, 1, 8, 8), default_pipeline().insert_before("reject_bias",
                                                                                             refuse_first_conv))
    assert paths == ["0", "0", "1"] and "a user's rule" in str(err) and "soft-reset" in str(err)


def test_a_pass_failing_after_refusals_reports_the_refusals():
    """A pass that trips over a refused node does not hide the model's problems behind a PassError."""
    def explode(gm, ctx):
        raise RuntimeError("boom")

    model = _seq(layer.Flatten(), layer.Linear(64, 3), neuron.IFNode())
    with pytest.raises(fxlava.UnsupportedModelError, match="synapse with a bias") as info:
        fxlava.compile(model, torch.zeros(4, 1, 1, 8, 8), pipeline=default_pipeline().insert_after("reject_bias", explode))
    assert any("pass 'explode' failed" in note and "boom" in note for note in info.value.__notes__)
    with pytest.raises(fxlava.PassError, match="pass 'explode' failed"):  # with nothing refused: the pass's error
        fxlava.compile(_seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.IFNode()),
                       torch.zeros(4, 1, 1, 8, 8), pipeline=default_pipeline().insert_after("reject_bias", explode))


# --- branches reach the passes ---------------------------------------------------------------------------------

class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 1, 3, padding=1, bias=False, step_mode="m")
        self.sn = neuron.IFNode(v_threshold=THRESHOLD, step_mode="m")
        self.out = layer.Conv2d(1, 2, 3, bias=False, step_mode="m")
        self.sn2 = neuron.IFNode(v_threshold=THRESHOLD, step_mode="m")

    def forward(self, x):
        y = self.sn(self.conv(x)) + x
        return self.sn2(self.out(y))


class _ReluInABranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = layer.Conv2d(1, 1, 3, padding=1, bias=False, step_mode="m")
        self.act = nn.ReLU()
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x):
        return self.sn(self.conv(x) + self.act(x))


def test_a_problem_inside_a_branch_is_reported_with_the_branch():
    paths, err = _paths(_ReluInABranch(), torch.zeros(4, 1, 1, 8, 8))
    assert paths == ["", "act"] and "a branch" in str(err) and "Loihi layers pass spikes" in str(err)


def test_a_branch_reaches_the_passes_and_a_pass_may_lower_it():
    """A user's pass before fuse_blocks sees the residual add and can rewrite it (here: drop the skip)."""
    seen = []

    def drop_skip(gm: fx.GraphModule, ctx):
        """Replace each add of a skip connection by its main path."""
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and getattr(node.target, "__name__", "") == "add":
                seen.append(node.name)
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
        return gm

    model = _grid(_Residual())
    x = _spikes((6, 2, 1, 8, 8), 3)
    without = default_pipeline().remove("lower_residuals")  # which would lower the add itself
    paths, err = _paths(model, x, without)
    assert paths == [""] and "merged again by add()" in str(err)  # the fork is the network input
    net = fxlava.compile(model, x, pipeline=without.insert_before("fuse_blocks", drop_skip))
    assert seen == ["add"] and len(net.blocks) == 2


# --- typed options ---------------------------------------------------------------------------------------------

def _lif_mlp():
    return _seq(layer.Flatten(), layer.Linear(64, 3, bias=False), neuron.LIFNode(tau=2.0))


def test_unknown_option_is_a_type_error_naming_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown compile option 'decay_input_scal'; valid options: decay_input_scale"):
        fxlava.compile(_lif_mlp(), torch.zeros(4, 1, 1, 8, 8), decay_input_scal="threshold")
    with pytest.raises(ValueError, match=r"decay_input_scale='thresh': expected one of 'weights', 'threshold'"):
        fxlava.compile(_lif_mlp(), torch.zeros(4, 1, 1, 8, 8), decay_input_scale="thresh")


def test_options_reach_the_pass_and_the_cli_flag_maps_onto_them():
    from fxlava.cli import build_parser
    from fxlava.options import CompileOptions, from_arguments

    x = torch.zeros(4, 1, 1, 8, 8)
    by_weights = fxlava.compile(_lif_mlp(), x, coscale=False)
    by_threshold = fxlava.compile(_lif_mlp(), x, decay_input_scale="threshold", coscale=False)
    assert by_weights.blocks[1].neuron.v_th_mant == 64 and by_threshold.blocks[1].neuron.v_th_mant == 128
    args = build_parser().parse_args(["m.py:net", "--decay-input-scale", "threshold"])
    assert from_arguments(args) == CompileOptions(decay_input_scale="threshold")
    assert from_arguments(build_parser().parse_args([])) == CompileOptions()
    assert from_arguments(build_parser().parse_args(["--no-coscale"])) == CompileOptions(coscale=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--decay-input-scale", "bias"])


# --- fresh names -----------------------------------------------------------------------------------------------

class _NamedLikeABlock(nn.Module):
    """A user's model whose attributes are called block0, block1, ... (the names fuse_blocks picks)."""

    def __init__(self):
        super().__init__()
        self.block0 = nn.Sequential(layer.Conv2d(1, 2, 3, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
        self.block1 = layer.Flatten()
        self.block1_1 = nn.Sequential(layer.Linear(72, 3, bias=False), neuron.IFNode(v_threshold=THRESHOLD))
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.block1_1(self.block1(self.block0(x)))


def test_modules_a_pass_adds_never_clash_with_the_users_attributes():
    model = _grid(_NamedLikeABlock())
    x = _spikes((6, 2, 1, 8, 8), 4)
    net = fxlava.compile(model, x)
    assert [b.kind for b in net.blocks] == ["conv", "flatten", "dense"]
    functional.reset_net(model)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
        assert torch.equal(net(x), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x))))


def test_fresh_name_skips_taken_names():
    from fxlava.rewrite import add_module, fresh_name

    gm = fx.symbolic_trace(nn.Sequential(nn.Identity()))
    gm.block0 = nn.Identity()
    gm.block0_1 = nn.Identity()
    assert fresh_name(gm, "block0") == "block0_2" and fresh_name(gm, "forward") == "forward_1"
    target = add_module(gm, "block0", nn.ReLU())
    assert isinstance(gm.get_submodule(target), nn.ReLU) and isinstance(gm.block0, nn.Identity)


# --- the graph runs after every pass ---------------------------------------------------------------------------

def _every_kind_of_pass():
    """Max pool (OR layer), average pool into a neuron (sum pool), flatten, dense; no ties between IF and Loihi."""
    return _grid(_seq(layer.Conv2d(1, 4, 3, padding=1, bias=False), neuron.IFNode(v_threshold=THRESHOLD),
                      layer.MaxPool2d(2), nn.Dropout(0.3), layer.Conv2d(4, 4, 3, padding=1, bias=False),
                      neuron.IFNode(v_threshold=THRESHOLD), layer.AvgPool2d(2), neuron.IFNode(v_threshold=THRESHOLD),
                      layer.Flatten(), layer.Linear(16, 5, bias=False), neuron.IFNode(v_threshold=THRESHOLD)))


def _run_pipeline_stepwise(model, x, pipeline):
    """[(pass name, graph output on x)] after tracing and after every pass."""
    from fxlava import frontend
    from fxlava.pass_manager import CompileContext

    gm, mode = frontend.trace(model, x)
    ctx = CompileContext(example_input=x, step_mode=mode, input_shape=tuple(x.shape[2:]))
    outs = [("trace", fxlava.run_graph(gm, x))]
    for p in pipeline:
        gm = p(gm, ctx).graph_module
        gm.recompile()
        assert not ctx.issues
        outs.append((p.name, fxlava.run_graph(gm, x)))
    return gm, outs


def test_the_graph_runs_on_spike_sequences_after_every_pass():
    model = _every_kind_of_pass()
    x = _spikes((8, 3, 1, 8, 8), 5)
    with torch.no_grad():
        expected = model(x)
        gm, outs = _run_pipeline_stepwise(model, x, default_pipeline())
    assert expected.sum() > 0
    for name, out in outs:
        assert torch.equal(out, expected), f"after {name}"
    # and the per-step graph itself, called directly, is not what runs in between
    assert gm.meta["fxlava_layout"] == "sequence"


def _docs_pass_namespace(model, x):
    """Run docs/passes.md's first example as written, with ``model`` and ``x`` defined."""
    from tests.test_docs import DOCS, python_blocks

    namespace = {"model": model, "x": x}
    exec(compile(python_blocks(DOCS / "passes.md")[0], str(DOCS / "passes.md"), "exec"), namespace)
    return namespace


def test_the_docs_example_pass_by_running_the_graph_before_and_after_it():
    """halve_thresholds, inserted after substitute_neurons: the graph before it spikes as the model, after it as
    the model with half the thresholds."""
    threshold = 1 + 1 / 32  # vThMant 66, halved 33: neither is ever hit exactly by voltages on the 1/32 grid
    build = lambda th: _grid(_seq(layer.Conv2d(1, 3, 3, padding=1, bias=False), neuron.IFNode(v_threshold=th),
                                  layer.Flatten(), layer.Linear(3 * 64, 4, bias=False), neuron.IFNode(v_threshold=th)))
    x = _spikes((6, 2, 1, 8, 8), 6)
    namespace = _docs_pass_namespace(build(threshold), x)
    halve = namespace["halve_thresholds"]
    pipeline = default_pipeline()
    upto = pipeline.names.index("substitute_neurons") + 1
    with torch.no_grad():
        gm, outs = _run_pipeline_stepwise(build(threshold), x, list(pipeline)[:upto])
        before = outs[-1][1]
        from fxlava.pass_manager import CompileContext

        halve(gm, CompileContext(example_input=x, step_mode="m", input_shape=tuple(x.shape[2:])))
        after = fxlava.run_graph(gm, x)
        assert torch.equal(before, build(threshold)(x))
        assert torch.equal(after, build(threshold / 2)(x))
    assert not torch.equal(before, after)
    # and the compiled network the docs build is the one with half the thresholds
    assert torch.equal(namespace["net"](x), after)


# --- one target description ------------------------------------------------------------------------------------

def test_loihi_numbers_live_in_the_target_description():
    """No module but fxlava/target.py defines Loihi's scales or bit widths (the others import them)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assignment = re.compile(r"^\s*\w+\s*=\s*\(?\s*(1\s*<<\s*(6|12|17)|4096|64)\b", re.M)
    sources = [p for d in ("fxlava", "passes") for p in (repo / d).rglob("*.py") if p.name != "target.py"]
    assert len(sources) > 20
    assert [str(p.relative_to(repo)) for p in sources if assignment.search(p.read_text())] == []


def test_roles_come_from_the_target_description():
    from spikingjelly.activation_based import layer as sj_layer

    from fxlava.neuron import CubaNeuron
    from fxlava.target import role_of

    assert [role_of(m) for m in (sj_layer.Conv2d(1, 1, 1), nn.Linear(1, 1), neuron.LIFNode(), CubaNeuron(1.0, 1.0, 0.0),
                                 lava_exchange.CubaLIFNode(0.5, 0.5), sj_layer.Dropout(0.5), nn.Identity(),
                                 sj_layer.AvgPool2d(2), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), sj_layer.Flatten(),
                                 sj_layer.BatchNorm2d(2), layer.SynapseFilter(), nn.ReLU())] == [
        "synapse", "synapse", "neuron", "neuron", "neuron", "identity", "identity", "avg_pool", "max_pool",
        "adaptive_pool", "flatten", "norm", "stateful", None]


@pytest.fixture
def sj_example_csnn(monkeypatch):
    """SpikingJelly's examples/conv_fashion_mnist.CSNN; torchvision and tensorboard, imported for training only, stubbed."""
    import importlib
    import sys
    import types

    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = None
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    monkeypatch.delitem(sys.modules, "spikingjelly.activation_based.examples.conv_fashion_mnist", raising=False)
    return importlib.import_module("spikingjelly.activation_based.examples.conv_fashion_mnist").CSNN


def test_the_graph_runs_after_every_pass_on_spikingjellys_example_csnn(sj_example_csnn):
    """The example's network (its conv_fc; forward() itself encodes a static image), with BatchNorms folded: after
    every pass the graph spikes as SpikingJelly's forward (weights and scales chosen so that quantisation and
    Loihi's strict threshold change nothing)."""
    net = sj_example_csnn(T=4, channels=4).conv_fc
    _grid(net, seed=7)
    for m in net.modules():
        if isinstance(m, neuron.IFNode):
            m.v_threshold = THRESHOLD
        if isinstance(m, nn.BatchNorm2d):  # scale 2, exact in float, and no shift (a shift would be a bias)
            m.eps = 0.0
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_var.fill_(0.25)
    x = _spikes((6, 2, 1, 28, 28), 8)
    with torch.no_grad():
        expected = net(x)
        _, outs = _run_pipeline_stepwise(net, x, default_pipeline())
    assert expected.sum() > 0
    for name, out in outs:
        assert torch.equal(out, expected), f"after {name}"
