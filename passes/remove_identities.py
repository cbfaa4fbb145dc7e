"""remove_identities: drop Identity and Dropout (the compiled network is the model in eval mode)."""
import torch.fx as fx

from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import bypass, module_nodes, path_of
from fxlava.rules import IDENTITIES


def _identity_types():
    from spikingjelly.activation_based import layer

    return IDENTITIES + (layer.Dropout,)  # layer.Dropout2d subclasses layer.Dropout


def remove_identities(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Remove Identity and Dropout modules, which are identities in eval mode."""
    removed = []
    for node, _ in module_nodes(gm, _identity_types()):
        removed.append(path_of(node))
        bypass(gm, node)
    if removed:
        ctx.record("remove_identities", f"removed {', '.join(removed)}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, bool(removed))
