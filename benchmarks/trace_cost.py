"""What tracing costs, as a ratio to one forward pass of the model on the example, in the same process.

Run from the repository root:  .venv/bin/python -m benchmarks.trace_cost [--repeat N]

fxlava's tracer runs every operation on the example input while tracing (to answer shape queries
and record each node's shape), so ``frontend.trace`` should cost about one forward pass plus the
bookkeeping of torch.fx. For each model: the median time of the model's own forward on the example
(the baseline), of ``fxlava.frontend.trace`` and of ``fxlava.compile``, and their ratios to the
baseline. Timings depend on the machine's load; the ratios are what to compare between versions.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from spikingjelly.activation_based import functional, neuron

import fxlava
from fxlava import frontend
from fxlava.examples.mnist_csnn import MNISTNet
from tests.sj_models import sj, multi_step, spikes


def _models():
    yield "demo CSNN (16 ch, T 8, N 4)", MNISTNet(channels=16), spikes(8, 4, 1, 28, 28)
    plif = multi_step(sj("model.parametric_lif_net").MNISTNet(channels=16, spiking_neuron=neuron.LIFNode))
    for m in plif.modules():
        if isinstance(m, torch.nn.Linear):
            m.bias = None
    yield "parametric_lif_net.MNISTNet (16 ch, T 8, N 4)", plif, spikes(8, 4, 1, 28, 28)


def _medians(fns, repeat):
    """Median time of each function, run interleaved (a, b, c, a, b, c, ...) so that load hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def _forward(model, x):
    functional.reset_net(model)
    with torch.no_grad():
        model(x)
    functional.reset_net(model)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print("| model | forward (s) | frontend.trace | fxlava.compile |")
    print("|---|---|---|---|")
    for name, model, x in _models():
        model.eval()
        fxlava.compile(model, x)  # warm-up: lazy imports, kernel registration
        base, tr, co = _medians([lambda: _forward(model, x), lambda: frontend.trace(model, x),
                                 lambda: fxlava.compile(model, x)], args.repeat)
        print(f"| {name} | {base:.3f} | {tr / base:.2f} x | {co / base:.2f} x |")


if __name__ == "__main__":
    main()
