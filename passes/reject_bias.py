"""reject_bias: the default refuses every biased synapse at once, and says how to compile it as a bias current."""
import torch.fx as fx

from fxlava.errors import issue_at
from fxlava.pass_manager import CompileContext, PassResult
from fxlava.rewrite import module_nodes
from fxlava.target import SYNAPSES

REASON = ("a synapse with a bias. Loihi has a bias (netx writes it as the neuron's bias_mant, 13 bits in steps of "
          "1/64), but fxlava compiles it only when asked: a netx file with biases matches lava-dl in Lava only when "
          "each sample starts with a reset of every layer (reset_interval and reset_offset; fxlava.run_lava does "
          "this), and the bias is rounded to steps of 1/64")
FIX_OPT_IN = ("to compile it as the neuron's bias current, use fxlava.compile(model, x, bias=\"current\") "
              "(fxlava-compile --bias current, or pipeline.replace(\"reject_bias\", bias_to_current) with "
              "bias_to_current from fxlava.passes)")


def check(gm: fx.GraphModule, ctx: CompileContext):
    """One issue per synapse whose bias is not None."""
    return [
        issue_at(node, REASON, f"{FIX_OPT_IN}; or construct it with bias=False "
                               f"(e.g. {type(m).__name__}(..., bias=False)) and retrain", module=m)
        for node, m in module_nodes(gm, SYNAPSES) if m.bias is not None
    ]


def reject_bias(gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Refuse every conv/linear synapse that has a bias, naming them all (opt in with bias="current")."""
    ctx.refuse(check(gm, ctx))
    return PassResult(gm, False)


reject_bias.check = check
