"""How closely the compiled (quantised) network follows the user's float model, per zoo model.

Run from the repository root:  .venv/bin/python -m benchmarks.agreement [--samples N]

For each model of tests/zoo, on the same random spike inputs: the fraction of output spikes
(over T x N x outputs) on which fxlava's ``net(x)`` agrees with the float model, and the
fraction of samples whose predicted class (argmax of the firing rate) agrees. A model whose
forward ends in a readout (e.g. ``.mean(0)``) is compared on that output, ``net.readout(net(x))``,
value for value. For the
tutorial's MNIST CSNN, SpikingJelly's own BlockContainer route on the same weights is
measured in the same run, side by side.
"""
from __future__ import annotations

import argparse
import time

import torch
from spikingjelly.activation_based import functional

import fxlava
from tests.zoo import NAMES, load


def run_float(model, x, step_mode):
    functional.reset_net(model)
    with torch.no_grad():
        if step_mode == "m":
            y = model(x)
        else:
            y = torch.stack([model(x[t]) for t in range(x.shape[0])])
    functional.reset_net(model)
    return y


def agreement(y, ref, readout=None):
    """Spike agreement on [T, N, *] spikes; for a model with a readout (e.g. a rate), on its output."""
    if readout is not None and readout.ops:
        out = readout(y)
        same = (out == ref).float().mean().item()
        classes = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        return same, classes
    spikes = (y == ref).float().mean().item()
    classes = (y.mean(0).argmax(-1) == ref.mean(0).argmax(-1)).float().mean().item()
    return spikes, classes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="random inputs per model")
    args = parser.parse_args(argv)
    rows = []
    for name in NAMES:
        z = load(name)
        model, x = z.build(), z.example_input()
        net = fxlava.compile(model, x, **z.EXPECT.get("options", {}))
        xr = (torch.rand(x.shape[0], args.samples, *x.shape[2:], generator=torch.Generator().manual_seed(0)) < 0.3).float()
        ref = run_float(model, xr, net.step_mode)
        t0 = time.perf_counter()
        with torch.no_grad():
            y = net(xr)
        dt = time.perf_counter() - t0
        rows.append((name, "fxlava", *agreement(y, ref, net.readout), ref.mean().item(), dt))
        if name == "mnist_csnn":
            from tests.sj_route import block_container_net, copy_weights

            sj = block_container_net(model.conv_fc[0].out_channels)
            copy_weights(model, sj)
            t0 = time.perf_counter()
            with torch.no_grad():
                functional.reset_net(sj)
                y_sj = sj(xr)
            dt = time.perf_counter() - t0
            rows.append((name, "SJ BlockContainer", *agreement(y_sj, ref), ref.mean().item(), dt))
    print(f"| model | route | spike agreement | class agreement | float firing rate | forward s |")
    print("|---|---|---|---|---|---|")
    for name, route, s, c, rate, dt in rows:
        print(f"| {name} | {route} | {s:.4f} | {c:.4f} | {rate:.3f} | {dt:.3f} |")


if __name__ == "__main__":
    main()
