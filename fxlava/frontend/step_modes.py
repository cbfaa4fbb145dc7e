"""Step modes: in which mode the model's neurons see time, which SpikingJelly containers feed them, and resets."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.errors import Issue, UnsupportedModelError

__all__ = ["detect_step_mode", "reset_states", "run_per_step"]


def _container_types() -> tuple:
    from spikingjelly.activation_based import layer, lava_exchange

    types = (layer.SeqToANNContainer, layer.MultiStepContainer, layer.StepModeContainer)
    block = getattr(lava_exchange, "BlockContainer", None)  # only defined when slayer imports
    return types + ((block,) if block is not None else ())


def _is_plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order, with no forward() of its own."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _step_modules(model: nn.Module):
    from spikingjelly.activation_based import base

    return [(n, m) for n, m in model.named_modules() if isinstance(m, base.StepModule)]


def _is_stateful(m: nn.Module) -> bool:
    from spikingjelly.activation_based import base

    return isinstance(m, base.MemoryModule)


def _is_recurrent(m: nn.Module) -> bool:
    """SpikingJelly's recurrent containers (a leaf of the trace, whose output feeds back into its input)."""
    from spikingjelly.activation_based import layer

    return isinstance(m, (layer.ElementWiseRecurrentContainer, layer.LinearRecurrentContainer))


def _time_in_batch(m: nn.Module) -> bool:
    """Containers that run their children once on [T*N, *] (time merged into the batch)."""
    from spikingjelly.activation_based import layer

    if isinstance(m, layer.SeqToANNContainer):
        return True
    return isinstance(m, layer.StepModeContainer) and m.step_mode == "m" and not m.stateful


def _feeds_sequences(m: nn.Module) -> bool:
    """Containers whose children see the whole [T, N, *] sequence from outside, whatever their own step mode."""
    from spikingjelly.activation_based import layer

    if isinstance(m, (layer.MultiStepContainer, layer.SeqToANNContainer)):
        return True
    return isinstance(m, layer.StepModeContainer) and m.step_mode == "m"


def _step_container(m: nn.Module) -> bool:
    """SpikingJelly modules that take [T, N, *] and hand their children one step (or T*N samples) at a time."""
    from spikingjelly.activation_based import layer

    if isinstance(m, (layer.MultiStepContainer, layer.SeqToANNContainer, layer.TLastMultiStepContainer,
                      layer.TLastSeqToANNContainer)):
        return True
    # StepModeContainer and lava_exchange's BlockContainer: a plain sequence in single-step mode
    return isinstance(m, _container_types()) and getattr(m, "step_mode", "s") == "m"


def _walk_step_modes(model: nn.Module):
    """Stateful modules with the step mode in which they see time, and the containers that would misfeed them.

    Returns ``(found, issues)``: ``found`` lists (path, module, effective step mode); a neuron inside a
    MultiStepContainer is in single-step mode but receives [T, N, *] from the outside, so its effective
    step mode is 'm'. ``issues`` names modules inside a SpikingJelly container that SpikingJelly itself
    runs differently from the per-step form fxlava compiles: neurons in containers that merge time into
    the batch, containers nested in containers, multi-step modules inside a container.
    """
    from spikingjelly.activation_based import base

    found, issues = [], []

    def issue(path, m, reason, fix):
        issues.append(Issue(reason=reason, fix=fix, path=path, module_type=f"{type(m).__module__}.{type(m).__qualname__}"))

    def walk(m: nn.Module, prefix: str, inside: Optional[str], merged: Optional[str]):
        for name, child in m.named_children():
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if inside is not None and _step_container(child):
                issue(path, child, "a SpikingJelly step container inside another: it receives one time step "
                                   "[N, *] (or [T*N, *]) and would take its first dimension for time",
                      f"put its layers directly in the outer container ({inside}), or move it out of that one")
            elif inside is not None and isinstance(child, base.StepModule) and not _step_container(child) \
                    and getattr(child, "step_mode", "s") == "m":
                issue(path, child, "a multi-step module inside a SpikingJelly container, which feeds its children "
                                   "one time step at a time",
                      f"leave it in single-step mode (step_mode='s'), as the container ({inside}) expects")
            if _is_stateful(child) and not isinstance(child, _container_types()):
                found.append((path, child, "m" if inside is not None else child.step_mode))
                if merged is not None:
                    issue(path, child, "a neuron inside a container that merges time into the batch "
                                       "(SeqToANNContainer or StepModeContainer(stateful=False, 'm')): it would see "
                                       "all T steps at once, as one step",
                          f"move the neuron out of {merged}, or hold it in a layer.MultiStepContainer, which runs "
                          f"it step by step")
            if _is_recurrent(child):
                continue  # SpikingJelly runs its inner modules single-step; substitute_neurons refuses it whole
            walk(child, path, inside or (path if _feeds_sequences(child) else None),
                 merged or (path if _time_in_batch(child) else None))

    walk(model, "", None, None)
    return found, issues


def detect_step_mode(model: nn.Module) -> str:
    """'m' or 's': the step mode in which the model's stateful (neuron) modules see time, which must agree.

    Raises UnsupportedModelError, naming every offending module, for neurons in both modes and
    for modules that SpikingJelly's containers would feed differently from fxlava's per-step form
    (see ``_walk_step_modes``).
    """
    modes = {}
    found, issues = _walk_step_modes(model)
    for path, m, mode in found:
        modes.setdefault(mode, []).append(path)
    if len(modes) > 1:
        fix = "set one step mode for the whole model: functional.set_step_mode(model, 'm')"
        for mode in ("s", "m"):
            issues.extend(Issue(reason="neurons in both single-step and multi-step mode", path=p,
                                module_type=f"step_mode='{mode}'", fix=fix) for p in modes.get(mode, []))
    if issues:
        raise UnsupportedModelError(issues)
    if modes:
        return next(iter(modes))
    # no neuron at all: containers of SpikingJelly are multi-step by nature
    return "m" if any(isinstance(m, _container_types()) for m in model.modules()) else "s"


def reset_states(model: nn.Module) -> None:
    """Reset every SpikingJelly memory module (neuron state) in ``model``."""
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


def _set_single_step(model: nn.Module) -> None:
    for _, m in _step_modules(model):
        if "s" in m.supported_step_mode():
            m.step_mode = "s"




def run_per_step(gm: fx.GraphModule, x_seq: torch.Tensor) -> torch.Tensor:
    """Run a canonical (per-step) graph over a [T, N, *] sequence from the resting state."""
    reset_states(gm)
    try:
        return torch.stack([gm(x_seq[t]) for t in range(x_seq.shape[0])])
    finally:
        reset_states(gm)
