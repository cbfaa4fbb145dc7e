"""Issue 13's floors on SpikingJelly's parametric_lif_net.MNISTNet trained in float by its own recipe.

The model keeps its BatchNorm and biased Linears (compiled with ``bias="current"``) and is trained as
``benchmarks/post_training.py`` trains it (Adam, lr 0.001, cosine annealing, MSE on the rate), for
one epoch here. Compiled with co-scaling, lava-dl must stay within 0.5 points of the float model's
accuracy, reach the ideal 8-bit reference's output-spike agreement minus 0.02, and equal the graph on
every spike, on the same Poisson spikes of the 1,000 test digits.
"""
import argparse

import pytest
import torch

from benchmarks.post_training import measure, plif_mnistnet, recipe
from fxlava.examples.lava_mnist import float_forward, train_epoch
from fxlava.examples.mnist_data import load_mnist


@pytest.mark.slow
def test_float_trained_plif_mnistnet_meets_the_floors_when_co_scaled():
    torch.set_num_threads(1)
    data = load_mnist()
    model, name, options = plif_mnistnet(seed=0, channels=8)
    assert options == {"bias": "current"}
    optimizer, schedule, _ = recipe("plif", model, argparse.Namespace(adam_lr=1e-3, epochs=1))
    model.train()
    _, train_acc = train_epoch(float_forward(model), optimizer, data.train_x, data.train_y, T=8, batch=64,
                               loss="mse", generator=torch.Generator().manual_seed(0))
    schedule.step()
    model.eval()
    rows = {r["route"]: r for r in measure(model, name, data, T=8, seed=1, lava_per_class=0, options=options)}
    flt, ref, on = (rows["float (SpikingJelly)"], rows["8-bit reference (SpikingJelly)"],
                    rows["fxlava, coscale=True"])
    assert flt["acc"] > 0.5, f"the float model did not learn: {flt['acc']} (train {train_acc})"
    assert on["graph_equal"]
    assert abs(on["acc"] - flt["acc"]) <= 0.005 + 1e-9, (on["acc"], flt["acc"])
    assert on["agreement"] >= ref["agreement"] - 0.02, (on["agreement"], ref["agreement"])


def test_the_folded_reference_puts_the_folded_conv_weights_on_one_8_bit_grid():
    from benchmarks.post_training import round_8bit

    model, _, _ = plif_mnistnet(seed=0, channels=4)
    bn = model.conv_fc[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 8.0]))
        bn.running_var.copy_(torch.tensor([1.0, 0.25, 4.0, 1.0]))
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)

    def on_grid(w):
        steps = w / (w.abs().max() / 127)
        return torch.allclose(steps, steps.round(), atol=1e-4)

    folded = round_8bit(model, fold_batchnorm=True).conv_fc[0].weight * k
    plain = round_8bit(model).conv_fc[0].weight
    assert on_grid(folded) and not on_grid(plain * k)
    assert on_grid(plain)
    assert torch.equal(round_8bit(model, fold_batchnorm=True).conv_fc[10].weight, round_8bit(model).conv_fc[10].weight)
