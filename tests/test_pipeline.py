"""The pass API: a printable pipeline, user passes inserted by name, failures reported with context."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from spikingjelly.activation_based import functional, layer, neuron

import fxlava
from fxlava.blocks import SynapseBlock
from fxlava.rewrite import module_nodes


def _model():
    net = nn.Sequential(layer.Flatten(), layer.Linear(16, 8, bias=False), neuron.IFNode(),
                        layer.Linear(8, 3, bias=False), neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-30, 31, p.shape, generator=torch.Generator().manual_seed(0)) / 32)
    return net


X = (torch.rand(6, 2, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5).float()


def test_default_pipeline_is_printable_and_ordered():
    p = fxlava.default_pipeline()
    assert p.names == ["lower_module_subclasses", "remove_identities", "fold_constant_scales", "reject_bias",
                       "fold_batchnorm", "resolve_conv_padding",
                       "lower_adaptive_pools", "avgpool_to_sumpool", "substitute_neurons", "maxpool_to_or",
                       "lower_residuals", "fuse_blocks", "coscale_layers", "insert_layout"]
    text = str(p)
    assert "8. avgpool_to_sumpool" in text and "1/k^2" in text


def test_custom_pass_halves_thresholds():
    """A worked user pass: after substitution, halve every neuron's threshold (as a user might to tune rates)."""
    seen = []

    def halve_thresholds(gm: fx.GraphModule, ctx: fxlava.CompileContext):
        """Halve every CUBA neuron's threshold."""
        from fxlava.neuron import CubaNeuron

        for node, m in module_nodes(gm, CubaNeuron):
            seen.append(node.meta["fxlava_path"])
            gm.get_submodule(node.target).__init__(m.threshold / 2, m.current_decay, m.voltage_decay,
                                                   m.surrogate_function, m.detach_reset)
        return fxlava.PassResult(gm, bool(seen))

    base = fxlava.compile(_model(), X, coscale=False)
    pipeline = fxlava.default_pipeline().insert_after("substitute_neurons", halve_thresholds)
    assert pipeline.names.index("halve_thresholds") == pipeline.names.index("substitute_neurons") + 1
    net = fxlava.compile(_model(), X, pipeline=pipeline, coscale=False)
    assert seen == ["2", "4"]
    thresholds = [b.neuron.v_th_mant for b in net.blocks if isinstance(b, SynapseBlock)]
    assert thresholds == [32, 32]
    assert [b.neuron.v_th_mant for b in base.blocks if isinstance(b, SynapseBlock)] == [64, 64]
    # the edited network is still proven equal to its lava-dl form
    assert torch.equal(net(X), fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(X))))
    assert not torch.equal(net(X), base(X))


def test_pipeline_edits_return_copies():
    p = fxlava.default_pipeline()
    q = p.remove("remove_identities").replace("reject_bias", lambda gm, ctx: None)
    assert "remove_identities" in p.names and "remove_identities" not in q.names
    assert "<lambda>" in q.names
    with pytest.raises(KeyError, match="no pass named 'nope'"):
        p.insert_before("nope", lambda gm, ctx: None)


def test_failing_pass_is_named_with_the_passes_before_it():
    def explode(gm, ctx):
        raise RuntimeError("boom")

    pipeline = fxlava.default_pipeline().insert_before("fuse_blocks", explode)
    with pytest.raises(fxlava.PassError, match=r"pass 'explode' failed \(passes run before it: lower_module_subclasses, remove_identities, "
                                               r"fold_constant_scales, reject_bias, fold_batchnorm, resolve_conv_padding, lower_adaptive_pools, avgpool_to_sumpool, "
                                               r"substitute_neurons, maxpool_to_or, lower_residuals\): RuntimeError: boom"):
        fxlava.compile(_model(), X, pipeline=pipeline)


def test_graph_module_trains_through_the_users_surrogate():
    net = fxlava.compile(_model(), X)
    out = net(X)
    loss = out.sum()
    loss.backward()
    grads = [p.grad for p in net.graph_module.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
