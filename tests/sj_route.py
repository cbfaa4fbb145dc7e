"""SpikingJelly's own hand-driven route for the tutorial's MNIST CSNN (BlockContainer), with given weights."""
import torch
import torch.nn as nn
from spikingjelly.activation_based import lava_exchange, neuron, surrogate


def _if():
    return neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True)


def block_container_net(channels: int) -> nn.Sequential:
    """The tutorial's network exactly as the tutorial writes it (multi-step BlockContainers)."""
    B = lava_exchange.BlockContainer
    return nn.Sequential(
        B(nn.Conv2d(1, channels, kernel_size=3, stride=1, padding=1, bias=False), _if(), step_mode="m"),
        B(nn.Conv2d(channels, channels, kernel_size=2, stride=2, bias=False), _if(), step_mode="m"),
        B(nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False), _if(), step_mode="m"),
        B(nn.Conv2d(channels, channels, kernel_size=2, stride=2, bias=False), _if(), step_mode="m"),
        B(nn.Flatten(), None, step_mode="m"),
        B(nn.Linear(channels * 7 * 7, 128, bias=False), _if(), step_mode="m"),
        B(nn.Linear(128, 10, bias=False), _if(), step_mode="m"),
    )


def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy the synapse weights of ``src`` into ``dst``, in order (plain-layer model <-> BlockContainer net)."""
    ws = [m.weight for m in src.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ds = [m.weight for m in dst.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(ws) == len(ds)
    with torch.no_grad():
        for w, d in zip(ws, ds):
            d.copy_(w)
    return dst


def to_lava(net: nn.Sequential) -> nn.Sequential:
    """The tutorial's to_lava(): one slayer block per BlockContainer."""
    return nn.Sequential(*[b.to_lava_block() for b in net]).eval()
