"""remove_identities: drop Identity and Dropout (the compiled network is the model in eval mode)."""
import torch.fx as fx

from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import bypass, module_of, path_of
from fxlava.target import role_of


def remove_identities(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Remove Identity and Dropout modules, which are identities in eval mode."""
    removed = []
    for node in list(gm.graph.nodes):
        if role_of(module_of(gm, node)) != "identity" or ctx.is_refused(node):
            continue
        removed.append(path_of(node))
        bypass(gm, node)
    if removed:
        ctx.record("remove_identities", f"removed {', '.join(removed)}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(gm, bool(removed))
