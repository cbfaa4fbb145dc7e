"""Copy-on-write clones of tensors: what fxlava copies from a model costs nothing until someone writes."""
from __future__ import annotations

import torch

__all__ = ["lazy_clone"]


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """``t.clone()``, copied only when either tensor is first written to (PyTorch's copy-on-write clone).

    Reading either side never copies; an in-place op, ``.numpy()`` or ``data_ptr()`` on either does,
    once. Copying a large model's weights up front (VGG-11's 133 M) otherwise costs about half a
    forward pass, most of it the operating system handing out fresh pages.
    """
    clone = getattr(torch, "_lazy_clone", None)
    if clone is None or t.is_sparse or t.is_quantized or t.layout != torch.strided:
        return t.clone()
    try:
        return clone(t)
    except (RuntimeError, NotImplementedError):  # a device or tensor kind without copy-on-write storage
        return t.clone()
