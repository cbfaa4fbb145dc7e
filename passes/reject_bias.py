"""reject_bias: Loihi CUBA blocks in netx have no synaptic bias; refuse every biased synapse at once."""
import torch.fx as fx

from fxlava.errors import issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_nodes
from fxlava.target import SYNAPSES

REASON = "a synapse with a bias (Loihi blocks exported to netx have no bias)"


def check(gm: fx.GraphModule, ctx: CompileContext):
    """One issue per synapse whose bias is not None."""
    return [
        issue_at(node, REASON, f"construct it with bias=False (e.g. {type(m).__name__}(..., bias=False)) and retrain; "
                               f"a bias is a constant input current every time step, which no threshold can replace", module=m)
        for node, m in module_nodes(gm, SYNAPSES) if m.bias is not None
    ]


def reject_bias(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Refuse every conv/linear synapse that has a bias, naming them all."""
    ctx.refuse(check(gm, ctx))
    return PassResult(gm, False)


reject_bias.check = check
