"""resolve_conv_padding: give every conv the explicit, symmetric zero padding that slayer and netx express.

slayer's conv block and netx's conv layer take one padding per spatial dimension, applied on both
sides, and always pad with zeros. So:

* ``padding='valid'`` becomes ``(0, 0)``; ``padding='same'`` becomes ``dilation * (kernel - 1) / 2``
  per dimension when that is a whole number (odd kernels, or even dilation);
* ``padding='same'`` that torch splits unequally between the two sides (an even kernel with odd
  dilation: torch puts the extra row or column at the bottom or right) is refused;
* ``padding_mode`` other than ``'zeros'`` (reflect, replicate, circular) is refused when the conv
  pads at all; with no padding it changes nothing and is dropped.

Kernel size, stride, dilation, groups and per-dimension padding tuples such as ``(1, 2)`` need no
rewriting: the blocks and both backends carry them as they are. The rewrite is checked against
torch's own convolution on random data.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from fxlava.errors import FxlavaError, issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_nodes, path_of

PASS = "resolve_conv_padding"


def _explicit_padding(conv: nn.Conv2d):
    """(padding pair, None) or (None, (reason, fix))."""
    if conv.padding == "valid":
        padding = (0, 0)
    elif conv.padding == "same":
        k, d = _pair(conv.kernel_size), _pair(conv.dilation)
        total = [d[i] * (k[i] - 1) for i in range(2)]
        if any(t % 2 for t in total):
            return None, (f"a conv with padding='same' and kernel {tuple(k)}, dilation {tuple(d)}: torch pads "
                          f"one more row or column at the bottom/right than at the top/left, and netx pads "
                          f"both sides equally",
                          "use an odd kernel size (or an even dilation), or pass explicit padding= and "
                          "crop or shift the input yourself")
        padding = (total[0] // 2, total[1] // 2)
    else:
        padding = _pair(conv.padding)
    if conv.padding_mode != "zeros" and any(padding):
        return None, (f"a conv with padding_mode={conv.padding_mode!r}: netx convs pad with zeros only",
                      "construct it with padding_mode='zeros' (the default) and retrain, or padding=0")
    return tuple(int(p) for p in padding), None


def check(gm: fx.GraphModule, ctx: CompileContext):
    """Issues for convs whose padding netx cannot express."""
    issues = []
    for node, conv in module_nodes(gm, nn.Conv2d):
        _, problem = _explicit_padding(conv)
        if problem is not None:
            issues.append(issue_at(node, *problem, module=conv))
    return issues


def resolve_conv_padding(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Make every conv's padding explicit, symmetric and zero (padding='same'/'valid' -> integers)."""
    ctx.refuse(check(gm, ctx))  # also for a conv refused already: a second, independent problem
    changed = []
    for node, conv in module_nodes(gm, nn.Conv2d):
        padding, _ = _explicit_padding(conv)
        if ctx.is_refused(node) or padding is None or (conv.padding == padding and conv.padding_mode == "zeros"):
            continue
        shape_in = node.args[0].meta.get("fxlava_shape")
        before = (conv.padding, conv.padding_mode)
        x = torch.rand(2, *shape_in, dtype=torch.float64) if shape_in is not None else None
        with torch.no_grad():
            ref = conv._conv_forward(x, conv.weight.double(), None) if x is not None else None
        # the traced graph owns this copy of the conv; its class (e.g. SpikingJelly's layer.Conv2d) is kept
        conv.padding, conv.padding_mode = padding, "zeros"
        if x is not None:
            with torch.no_grad():
                out = F.conv2d(x, conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
            if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-12, atol=1e-12):
                raise FxlavaError(f"internal error: explicit padding {padding} for {path_of(node)} changed its output")
        changed.append(path_of(node))
        ctx.record(PASS, f"{path_of(node)}: padding={before[0]!r}, padding_mode={before[1]!r} -> padding={padding}")
    return PassResult(gm, bool(changed))


resolve_conv_padding.check = check
