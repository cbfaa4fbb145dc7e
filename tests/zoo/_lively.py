"""Scale a model's synapses layer by layer until every neuron layer fires at a useful rate."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, neuron


def lively(model: nn.Module, x: torch.Tensor, rate: float = 0.15, seed: int = 0, grid: float = 2 / 64) -> nn.Module:
    """Initialise synapse weights (seeded, on lava-dl's weight grid) so each neuron layer fires near ``rate``."""
    g = torch.Generator().manual_seed(seed)
    synapses = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    neurons = [m for m in model.modules() if isinstance(m, neuron.BaseNode)]
    for syn in synapses:
        with torch.no_grad():
            syn.weight.copy_(torch.randn(syn.weight.shape, generator=g))
    step_mode = next((n.step_mode for n in neurons), "m")

    def rates():
        out = {}
        hooks = [n.register_forward_hook(lambda m, i, o, k=k: out.setdefault(k, []).append(o.float().mean()))
                 for k, n in enumerate(neurons)]
        with torch.no_grad():
            functional.reset_net(model)
            if step_mode == "m":
                model(x)
            else:
                for t in range(x.shape[0]):
                    model(x[t])
            functional.reset_net(model)
        for h in hooks:
            h.remove()
        return [torch.stack(out.get(k, [torch.tensor(0.0)])).mean().item() for k in range(len(neurons))]

    # pair each synapse with the first neuron registered after it; tune them front to back
    pairs, pending = [], None
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            pending = m
        elif isinstance(m, neuron.BaseNode) and pending is not None:
            pairs.append((pending, neurons.index(m)))
            pending = None
    for syn, k in pairs:
        lo, hi = 1e-3, 1e3
        for _ in range(30):
            mid = (lo * hi) ** 0.5
            with torch.no_grad():
                base = syn.weight / syn.weight.abs().max()
                syn.weight.copy_(base * mid)
            r = rates()[k]
            if r < rate:
                lo = mid
            else:
                hi = mid
        with torch.no_grad():
            # keep weights on lava-dl's grid and range so real and quantised arithmetic agree closely
            syn.weight.copy_((syn.weight / grid).round().clamp(-128, 127) * grid)
    model.eval()
    return model


def grid_weights(model: nn.Module, seed: int, low: int, high: int, step: float = 1 / 32) -> nn.Module:
    """Every parameter drawn from {low, ..., high - 1} * step, seeded: on lava-dl's grid, without lively()'s search."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(low, high, p.shape, generator=g) * step)
    return model
