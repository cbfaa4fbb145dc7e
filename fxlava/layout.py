"""SpikingJelly's [T, N, *] and lava-dl's [N, *, T] layouts, and the conversions between them."""
import torch

__all__ = ["TNX_to_NXT", "NXT_to_TNX"]


def TNX_to_NXT(x: torch.Tensor) -> torch.Tensor:
    """[T, N, *] (SpikingJelly multi-step) -> [N, *, T] (lava-dl)."""
    return x.permute(*range(1, x.dim()), 0)


def NXT_to_TNX(x: torch.Tensor) -> torch.Tensor:
    """[N, *, T] (lava-dl) -> [T, N, *] (SpikingJelly multi-step)."""
    return x.permute(x.dim() - 1, *range(x.dim() - 1))
