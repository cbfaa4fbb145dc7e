"""Speed of checking a netx file, and of writing one: Lava, lava-dl, the compiled graph and load_netx side by side.

Run from the repository root:  .venv/bin/python -m benchmarks.netx_speed [--threads 1] [--lava-samples 20]

Part 1, the demo's trained MNIST CSNN (T 8), on Poisson-coded held-out digits, per sample, at
batch 1, 100 and 1,000, all in one process:

- Lava: ``fxlava.run_lava`` (builds the network once and streams the samples; at batch 1 its
  compile and start-up is included). Lava runs ``min(batch, --lava-samples)`` of the samples.
- lava-dl: ``net.lava_dl(x)``; compiled graph: ``net(x)``; executor: ``fxlava.load_netx(path)(x)``.
  Every output spike of the four is compared; the run stops if any differs.
- the dense-compute bound: the network's multiply-accumulates per sample (every synapse, every
  step, as a dense conv/matmul computes them) at the float32 matmul rate this process measures.

Part 2, SpikingJelly's own VGG-11 (``activation_based.model.spiking_vgg``, IF neurons) at
224x224, T 2, N 1, with its biases removed and an IF neuron after the last Linear (a netx layer
is synapse + neuron): one SpikingJelly forward against ``fxlava.compile`` (after a warm-up
compile of a small model, so that one-time imports are not counted), ``net.lava_dl`` and
``net.export_hdf5``; the file's size per weight, plain and compressed.

The machine is shared: only ratios measured in the same run mean anything, and the load
average at the start and end is written next to them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.nn as nn

import fxlava
from fxlava.backends.lava_dl import blocks_with_shapes
from fxlava.blocks import SynapseBlock

RESULTS = os.path.join(os.path.dirname(__file__), "results", "netx_speed.md")


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """float32 FLOP/s of a dense n x n matmul in this process (the compute the machine gives us now)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    seconds, _ = timed(lambda: a @ b, repeats)
    return 2 * n ** 3 / seconds


def macs_per_step(net: fxlava.CompiledNetwork) -> int:
    """Multiply-accumulates of one sample's synapses in one time step, counted densely."""
    total = 0
    for block, shape in blocks_with_shapes(net.graph_module):
        if isinstance(block, SynapseBlock):
            w = block.synapse.weight
            per_output = w[0].numel()  # in/groups * kH * kW, or in_features
            outputs = shape[0] * (shape[1] * shape[2] if len(shape) == 3 else 1)
            total += outputs * per_output
    return total


def mnist_part(args, lines: list[str]) -> None:
    from fxlava.examples.mnist_csnn import MNISTNet
    from fxlava.examples.mnist_data import load_mnist, poisson_encode

    T = 8
    model = MNISTNet(channels=16)
    weights = os.path.join(os.path.dirname(fxlava.__file__), "examples", "mnist_csnn_trained.pt")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    data = load_mnist()
    g = torch.Generator().manual_seed(0)
    x_all = poisson_encode(data.test_x[: max(args.batches)], T, g)  # [T, N, 1, 28, 28]
    net = fxlava.compile(model, x_all[:, :2])
    tmp = tempfile.mkdtemp()
    path = net.export_hdf5(os.path.join(tmp, "mnist_csnn.net"))
    executor = fxlava.load_netx(path)
    lava_dl = net.lava_dl
    flops = matmul_flops()
    bound = 2 * macs_per_step(net) * T / flops  # seconds per sample

    lines += [f"## MNIST CSNN (T {T}, trained weights, held-out digits), per sample, {torch.get_num_threads()} thread(s)",
              "",
              f"dense-compute bound: {macs_per_step(net) * T / 1e6:.1f} M multiply-accumulates per sample at "
              f"{flops / 1e9:.1f} GFLOP/s (float32 {1024}x{1024} matmul measured in this run) = {bound * 1e3:.3f} ms",
              "",
              "| batch | Lava ms (samples run) | lava-dl ms | compiled graph ms | executor ms | executor vs Lava | "
              "executor vs graph | executor vs bound | all equal |",
              "|---|---|---|---|---|---|---|---|---|"]
    for batch in args.batches:
        x = x_all[:, :batch]
        xin = fxlava.TNX_to_NXT(x).contiguous()
        repeats = 5 if batch <= 100 else 2
        with torch.no_grad():
            t_graph, y_graph = timed(lambda: net(x), repeats)
            t_ladl, y_ladl = timed(lambda: lava_dl(xin), repeats)
            t_exec, y_exec = timed(lambda: executor(xin), repeats)
        k = min(batch, args.lava_samples)
        t_lava, y_lava = timed(lambda: fxlava.run_lava(path, xin[:k]), 1)
        equal = (torch.equal(fxlava.TNX_to_NXT(y_graph), y_ladl) and torch.equal(y_exec, y_ladl)
                 and torch.equal(y_lava, y_ladl[:k]))
        if not equal:
            raise SystemExit(f"batch {batch}: the four do not agree on every spike")
        per = {name: t / n * 1e3 for name, t, n in (("lava", t_lava, k), ("ladl", t_ladl, batch),
                                                      ("graph", t_graph, batch), ("exec", t_exec, batch))}
        lines.append(f"| {batch} | {per['lava']:.2f} ({k}) | {per['ladl']:.3f} | {per['graph']:.3f} | {per['exec']:.3f} | "
                     f"{per['lava'] / per['exec']:.0f}x | {per['graph'] / per['exec']:.2f}x | "
                     f"{per['exec'] / (bound * 1e3):.1f}x the bound | {equal} |")
        print(lines[-1], flush=True)


def _stub_torchvision() -> None:
    """spiking_vgg imports torchvision's download helper at module level; it is never called here."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    tv, models, utils = (types.ModuleType(n) for n in ("torchvision", "torchvision.models", "torchvision.models.utils"))

    def no_download(*args, **kwargs):
        raise RuntimeError("no pretrained weights in this benchmark")

    utils.load_state_dict_from_url = no_download
    tv.models, models.utils = models, utils
    sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.models.utils": utils})


def vgg11() -> nn.Module:
    """SpikingJelly's spiking VGG-11 with IF neurons, no biases, an IF neuron after the last Linear, multi-step."""
    _stub_torchvision()
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.model import spiking_vgg

    model = spiking_vgg.spiking_vgg11(spiking_neuron=neuron.IFNode)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.bias = None
    model.classifier.append(neuron.IFNode())
    functional.set_step_mode(model, "m")
    return model.eval()


def vgg_part(args, lines: list[str]) -> None:
    from spikingjelly.activation_based import functional

    from fxlava.examples.mnist_csnn import MNISTNet

    fxlava.compile(MNISTNet(channels=4), torch.zeros(2, 1, 1, 28, 28))  # one-time imports and warm-up
    model = vgg11()
    x = (torch.rand(2, 1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) < 0.3).float()

    def sj_forward():
        functional.reset_net(model)
        with torch.no_grad():
            out = model(x)
        functional.reset_net(model)
        return out

    sj_forward()
    t_sj, _ = timed(sj_forward, 3)
    t0 = time.perf_counter()
    net = fxlava.compile(model, x)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    net.lava_dl
    t_ladl = time.perf_counter() - t0
    tmp = tempfile.mkdtemp()
    plain = os.path.join(tmp, "vgg11.net")
    t0 = time.perf_counter()
    net.export_hdf5(plain)
    t_export = time.perf_counter() - t0
    packed = net.export_hdf5(os.path.join(tmp, "vgg11_gz.net"), compress=True)
    weights = sum(b.synapse.weight.numel() for b in net.blocks if isinstance(b, SynapseBlock))
    size, size_gz = os.path.getsize(plain), os.path.getsize(packed)
    total = t_compile + t_ladl + t_export
    lines += ["", "## SpikingJelly VGG-11, 224x224, T 2, N 1, no bias or BatchNorm, 1 thread", "",
              "| step | seconds | x one SJ forward |", "|---|---|---|",
              f"| one SpikingJelly forward (median of 3) | {t_sj:.2f} | 1.00 |",
              f"| fxlava.compile | {t_compile:.2f} | {t_compile / t_sj:.2f} |",
              f"| net.lava_dl | {t_ladl:.2f} | {t_ladl / t_sj:.2f} |",
              f"| net.export_hdf5 | {t_export:.2f} | {t_export / t_sj:.2f} |",
              f"| compile + lava_dl + export | {total:.2f} | {total / t_sj:.2f} |", "",
              f"netx file: {size / 1e6:.1f} MB for {weights / 1e6:.1f} M weights = {size / weights:.3f} bytes per weight; "
              f"compressed (export_hdf5(path, compress=True)): {size_gz / 1e6:.1f} MB = {size_gz / weights:.3f} bytes per weight"]
    print("\n".join(lines[-12:]), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads for part 1 (part 2 always uses 1)")
    p.add_argument("--lava-samples", type=int, default=20, help="most samples run in Lava per batch size")
    p.add_argument("--batches", default="1,100,1000", help="batch sizes of part 1")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--skip-vgg", action="store_true")
    p.add_argument("--out", default=RESULTS, help="markdown file for the results")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    load_start = os.getloadavg()
    lines = ["# netx_speed: checking and writing netx files", "",
             f"`.venv/bin/python -m benchmarks.netx_speed {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(" `", "`"),
             "", f"{os.cpu_count()} cores shared with other jobs; load average at start {load_start[0]:.1f}", ""]
    if not args.skip_mnist:
        torch.set_num_threads(args.threads)
        mnist_part(args, lines)
    if not args.skip_vgg:
        torch.set_num_threads(1)
        vgg_part(args, lines)
    lines += ["", f"load average at the end {os.getloadavg()[0]:.1f}"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
