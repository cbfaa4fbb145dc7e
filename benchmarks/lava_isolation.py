"""What running Lava in its own process group costs: run_lava against the same run in this process.

Run from the repository root:  .venv/bin/python -m benchmarks.lava_isolation [--repeats N]

run_lava forks a child that runs Lava (so a hang or a dead worker cannot take the caller with it);
the baseline is the same code, ``fxlava.lava_runner._run_here``, called in this process. Both run the
tutorial's MNIST CSNN netx file on the same spikes, alternately, and must give the same output.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxlava
from fxlava import lava_runner
from tests.zoo import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    z = load("mnist_csnn")
    x = z.example_input()
    net = fxlava.compile(z.build(), x)
    xin = fxlava.TNX_to_NXT(x[:, : args.samples] if x.shape[1] >= args.samples else x)
    with tempfile.TemporaryDirectory() as tmp:
        path = net.export_hdf5(Path(tmp) / "net.net")
        spikes = xin.numpy()
        isolated, inline = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            a = lava_runner.run_lava(path, xin)
            isolated.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = lava_runner._run_here(path, spikes, False, 32, lambda exc: None)
            inline.append(time.perf_counter() - t)
            assert torch.equal(a, torch.from_numpy(b))
    iso, inl = np.median(isolated), np.median(inline)
    print(f"{spikes.shape[0]} samples x {spikes.shape[-1]} steps, median of {args.repeats}: "
          f"run_lava (own process group) {iso:.2f} s, same run in this process {inl:.2f} s, ratio {iso / inl:.2f}")


if __name__ == "__main__":
    main()
