"""The frontend: trace a SpikingJelly model with torch.fx and put the graph in fxlava's canonical per-step form.

The stages, one file each, in the order ``trace`` runs them:

* ``step_modes.py``: the step mode in which the model's neurons see time (and the SpikingJelly
  containers that would feed them differently from the per-step form), neuron resets;
* ``tracer.py``: torch.fx tracing of a copy of the model, SpikingJelly's modules kept as leaves;
* ``time_loop.py``: a forward() that runs single-step modules once per step and stacks the outputs,
  folded into one step;
* ``encoder.py``: a forward() that repeats a static input over time itself: the ops up to its
  first spiking layer cut off into an ``Encoder`` that runs on the host;
* ``readout.py``: the parameter-free ops after the last spiking layer, cut off into a ``Readout``
  that runs on the host;
* ``canonical.py``: the canonical form the built-in passes read.

Forks and merges are kept: ``fuse_blocks`` refuses a graph still branched when blocks are fused
(``fxlava/chain.py``, whose ``chain_issues`` stays importable here), so passes may lower them.

The canonical form is one node per operation, executed once per time step on ``[N, *]`` tensors
(SpikingJelly's single-step semantics), with
* SpikingJelly containers (``SeqToANNContainer``, ``MultiStepContainer``,
  ``StepModeContainer``, ``BlockContainer``) expanded into their children (also through
  ``nn.Sequential`` children); neurons inside them count in the step mode the container
  feeds them from outside, and what SpikingJelly would run differently from this per-step
  form (a neuron in a container that merges time into the batch, nested step containers,
  multi-step modules inside a container, a module with its own forward() inside one) is
  refused at trace time,
* every SpikingJelly module set to single-step mode,
* reshapes that only merge or split the time and batch dimensions removed, reshapes that
  flatten one sample turned into ``nn.Flatten`` modules, and functional pooling / dropout
  calls turned into the equivalent modules.
Whatever cannot be put in that form is left in the graph as it is, for the passes to
lower or refuse. Each node keeps its user-facing module path (``meta['fxlava_path']``),
the user's source line (``meta['stack_trace']``) and its per-sample output shape
(``meta['fxlava_shape']``) and its place in the model (``meta['fxlava_order']``), by which
errors list their issues.
"""
from __future__ import annotations

import copy
import dataclasses
import logging

import torch
import torch.fx as fx
import torch.nn as nn

from fxlava.chain import chain_issues
from fxlava.cow import lazy_clone
from fxlava.errors import FxlavaError, Issue, UnsupportedModelError, _source_line, issue_at, model_order
from fxlava.frontend.hooks import lower_hooks
from fxlava.frontend.canonical import _Canonicalizer, _fill_shapes
from fxlava.frontend.encoder import Encoder, split_encoder, split_static_encoder
from fxlava.frontend.readout import Readout, output_issues, split_readout
from fxlava.frontend.step_modes import _set_single_step, detect_step_mode, reset_states, run_per_step
from fxlava.frontend.time_loop import fold_time_loops, static_input_loop
from fxlava.frontend.shapes import ShapeRunError, propagate_shapes
from fxlava.frontend.tracer import SpikingTracer, UntraceableError

__all__ = ["SpikingTracer", "trace", "detect_step_mode", "chain_issues", "output_issues", "run_per_step",
           "reset_states", "Readout", "Encoder"]

log = logging.getLogger(__name__)


def trace(model: nn.Module, example_input: torch.Tensor, host_encoder: bool = True) -> tuple[fx.GraphModule, str]:
    """Trace a copy of ``model`` and return its canonical per-step GraphModule and the model's step mode.

    The user's model is never modified: tracing, shape propagation and every rewrite act on a
    deep copy (its parameters copy-on-write, ``fxlava.cow``), whose neuron states are reset before
    and after the example run.

    A multi-step model whose forward() repeats a static input over time (``example_input`` is then
    what forward() takes, e.g. images ``[N, C, H, W]``) has its ops up to the first spiking layer cut
    off into ``gm.meta['fxlava_encoder']`` (``host_encoder=False`` leaves them, to be refused); the
    graph then starts at that layer's spikes, and ``gm.meta['fxlava_example']`` holds them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxlava.compile expects a torch.nn.Module; got {type(model).__name__}")
    step_mode = detect_step_mode(model)
    # [T, N, *] spikes; a forward() that repeats its input over time takes [N, *] (split_encoder, split_static_encoder)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise _bad_example(example_input)
    root, hooks = _copy(model)
    T, N = example_input.shape[:2]
    gm0, loops, static_encoder = None, 0, None
    if step_mode == "s":
        # single-step neurons: forward() takes one step [N, *], or takes [T, N, *] and loops over the
        # steps itself; the second kind traces, on the whole sequence, into T copies of one step
        try:
            gm0 = _trace_and_run(model, root, example_input.to(torch.float32), example_input, step_mode)
            loops = fold_time_loops(gm0)
        except FxlavaError:
            gm0, loops = None, 0
        static = static_input_loop(gm0) if gm0 is not None and not loops else None
        if static is not None and host_encoder:  # its loop up to the first spiking layer runs on the host
            static_encoder = split_static_encoder(gm0, example_input)
            loops = fold_time_loops(gm0) if static_encoder is not None else 0
            if not loops:
                static_encoder = None
        if static is not None and static_encoder is None:  # refused if tracing one step fails too
            start, copies = static
            static = UnsupportedModelError([issue_at(
                start, f"forward() runs the same single-step layers {copies} times on its own input (a static input "
                       f"repeated over time inside forward()): the first layer reads real values every step, and "
                       f"Loihi's input layer takes spikes",
                "give the model spikes: encode outside it (encoding.PoissonEncoder each step) and pass [T, N, *]; "
                "or write forward() in multi-step mode with SpikingJelly's layer.* modules, x_seq = "
                "x.unsqueeze(0).repeat(T, 1, ...) and functional.set_step_mode(model, 'm'), and fxlava runs the "
                "layers up to the first spiking one on the host (net.encoder)")])
        if not loops:  # tracing may have left proxies in the copy's attributes (self.v = ...): start afresh
            gm0, (root, hooks) = None, _copy(model)
    if gm0 is None:
        x0 = (example_input if step_mode == "m" else example_input[0]).to(torch.float32)
        try:
            gm0 = _trace_and_run(model, root, x0, example_input, step_mode)
        except FxlavaError as exc:
            if step_mode == "s" and static is not None:
                raise static from exc
            if example_input.dim() < 3:  # neither [T, N, *] nor an input forward() takes
                raise _bad_example(example_input) from exc
            raise
        if step_mode == "m":  # multi-step modules called once per step (on x[t:t+1]) and gathered
            loops = fold_time_loops(gm0)
    else:
        step_mode = "m"  # the model takes the sequence, like a multi-step model
    encoder = split_encoder(gm0, example_input) if host_encoder and step_mode == "m" and not loops else static_encoder
    if encoder is not None:
        encoder, example_input = encoder
        T, N = example_input.shape[:2]
    elif example_input.dim() < 3:
        raise _bad_example(example_input)
    lead = 2 if step_mode == "m" else 1
    readout = split_readout(gm0, step_mode)
    canonicalizer = _Canonicalizer(gm0, root, lead, T, N, folded_loops=bool(loops))
    graph = canonicalizer.run()
    if canonicalizer.issues:
        raise UnsupportedModelError(canonicalizer.issues)
    if canonicalizer.input_transposed:  # forward() takes [N, T, *]: the compiled network takes [T, N, *]
        example_input = example_input.transpose(0, 1)
    _set_single_step(root)
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    gm.graph.eliminate_dead_code()  # shape queries (x.shape[0]) that only fed removed reshapes
    gm.recompile()
    _fill_shapes(gm, example_input[0])
    for i, n in enumerate(gm.graph.nodes):  # the model order, in which errors list their issues
        n.meta["fxlava_order"] = i
    # ops with no per-step form, refused with the passes' refusals (compile hands them to ctx.refuse)
    gm.meta["fxlava_trace_issues"] = [dataclasses.replace(i, order=model_order(i.fx_node))
                                      for i in canonicalizer.later_issues()]
    gm.meta["fxlava_trace_left"] = canonicalizer.left_after()
    gm.meta["fxlava_step_mode"] = step_mode
    gm.meta["fxlava_layout"] = "per_step"  # see fxlava.graph_runner.run_graph
    gm.meta["fxlava_shape_queries"] = gm0.meta["fxlava_shape_queries"]
    gm.meta["fxlava_dropped"] = list(canonicalizer.dropped)
    gm.meta["fxlava_time_loops"] = loops
    gm.meta["fxlava_hooks"] = hooks
    gm.meta["fxlava_input_transposed"] = canonicalizer.input_transposed
    gm.meta["fxlava_readout"] = readout or Readout(step_mode=step_mode)
    gm.meta["fxlava_encoder"] = encoder
    gm.meta["fxlava_example"] = example_input
    return gm, step_mode



def _bad_example(example_input) -> ValueError:
    return ValueError(
        f"example_input must be a tensor of spikes shaped [T, N, *] (SpikingJelly's multi-step layout), or what a "
        f"forward() that repeats it over time takes; got "
        f"{tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__}")


def _copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` in eval mode, its weight reparametrisations made permanent (other hooks refused)."""
    # the tensors reparametrising hooks keep as plain attributes (a pruned weight = weight_orig * mask) may
    # carry autograd history, which deepcopy refuses; the copy's hooks recompute them anyway
    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, torch.Tensor) and not v.is_leaf}
    # parameters as copy-on-write clones: the copy shares the model's memory until either side writes
    # to it (training the compiled network, or the user training the model), and then gets its own
    memo.update((id(p), nn.Parameter(lazy_clone(p.detach()), requires_grad=p.requires_grad))
                for p in model.parameters() if type(p) is nn.Parameter and id(p) not in memo)
    root = copy.deepcopy(model, memo).eval()
    done, issues = lower_hooks(root)
    if issues:
        raise UnsupportedModelError(issues)
    return root, done


def _trace_and_run(model: nn.Module, root: nn.Module, x0: torch.Tensor, example_input: torch.Tensor,
                   step_mode: str) -> fx.GraphModule:
    """Trace ``root`` on ``x0`` (shape queries answered from it) and record every node's shape."""
    reset_states(root)
    tracer = SpikingTracer((x0,))
    try:
        graph = tracer.trace(root)
    except UntraceableError as exc:
        raise UnsupportedModelError([Issue(
            reason=f"forward() cannot be traced: {exc.construct}", path="", module_type=type(model).__qualname__,
            node=f"{type(exc.cause).__name__}: {exc.cause}", source=exc.source,
            fix="keep forward() free of Python control flow on tensor values (shapes are fine: they are "
                "answered from the example input); compute such code outside the model")]) from exc
    finally:
        reset_states(root)
    gm0 = fx.GraphModule(root, graph)
    gm0.meta["fxlava_shape_queries"] = list(tracer.shape_queries)
    if tracer.complete:  # every node's shape was recorded while tracing, from the same example
        return gm0
    try:  # an operation failed on the example: run the graph again to name it
        propagate_shapes(gm0, x0)
    except ShapeRunError as exc:
        where = _source_line(exc.node) or exc.node.format_node()
        raise FxlavaError(
            f"running {type(model).__name__} on the example input {tuple(example_input.shape)} failed at "
            f"{where} ({type(exc.cause).__name__}: {exc.cause}); fix: pass an example input shaped [T, N, *] "
            f"that forward() accepts in the model's step mode ('{step_mode}': "
            f"{'the whole [T, N, *] sequence' if step_mode == 'm' else 'one step [N, *] per call'})"
        ) from exc.cause
    finally:
        reset_states(root)
    return gm0
