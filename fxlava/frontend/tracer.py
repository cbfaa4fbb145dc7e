"""Stage 1: torch.fx tracing of a copy of the user's model, with SpikingJelly's modules as leaves."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

__all__ = ["SpikingTracer"]


def _is_spikingjelly(m: nn.Module) -> bool:
    return type(m).__module__.startswith("spikingjelly.")


def _is_neuron_subclass(m: nn.Module) -> bool:
    """A user's subclass of a SpikingJelly neuron: a leaf, so that substitute_neurons names it."""
    from fxlava.target import is_neuron

    return is_neuron(m)


def _compiled_by_type(m: nn.Module) -> bool:
    """A module (or a user's subclass of one) that a pass compiles by its type: a leaf, so that the pass
    sees it and lower_module_subclasses can check that it computes what its type computes."""
    from fxlava.target import ADAPTIVE_POOLS, AVG_POOLS, FLATTENS, IDENTITIES, MAX_POOLS, NORMS, SYNAPSES

    return isinstance(m, SYNAPSES + AVG_POOLS + MAX_POOLS + ADAPTIVE_POOLS + FLATTENS + NORMS + IDENTITIES)


class SpikingTracer(fx.Tracer):
    """Keeps SpikingJelly neurons, layers and containers (and torch.nn layers) as leaf modules."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_spikingjelly(m) or _is_neuron_subclass(m) or _compiled_by_type(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

