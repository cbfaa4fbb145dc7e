"""Trained-like BatchNorm statistics and biases for zoo models, seeded (running statistics as training leaves them)."""
import torch
import torch.nn as nn


def trained_batchnorm(bn: nn.modules.batchnorm._BatchNorm, seed: int, mean: float = 0.2) -> nn.Module:
    """Non-zero running mean, running var away from 1, and (if affine) gamma and beta as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * mean)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.3)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1 - 0.1)
    return bn


def trained_biases(model: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Give every conv/linear bias a spread of values like a trained one (many of them off the 1/64 grid)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * scale)
    return model
