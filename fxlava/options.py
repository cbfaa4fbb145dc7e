"""Compile options: one typed, validated object, shared by ``fxlava.compile`` and the CLI.

An option is one field of ``CompileOptions``: its default, its allowed values (``choices``) and
its help text. ``fxlava.compile(model, x, **options)`` and ``fxlava-compile --option-name``
both go through ``CompileOptions.from_kwargs``, so a misspelt option is an error naming the
valid ones, never a silent default. Adding an option is adding a field.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = ["CompileOptions", "add_arguments", "from_arguments"]


def _option(default, choices: tuple, help: str, check=None, flag=None):
    """A field: ``check(value)`` raises for a bad value; ``flag`` = (name, argparse kwargs) replaces ``--name``."""
    return field(default=default, metadata={"choices": tuple(choices), "help": help, "check": check, "flag": flag})


def _check_coscale(value) -> None:
    from fxlava.target import WEIGHT_GRIDS

    def factor(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    def pinned(v):
        return factor(v) or (isinstance(v, (tuple, list)) and len(v) == 2 and factor(v[0]) and v[1] in WEIGHT_GRIDS)

    if value is True or value is False:
        return
    if isinstance(value, dict) and all(isinstance(k, str) and pinned(v) for k, v in value.items()):
        return
    raise ValueError(f"coscale={value!r}: expected True, False, {{layer: scale}} (net.scales of an earlier compile) "
                     f"or {{layer: (scale, grid)}} (net.coscale; grids {', '.join(map(repr, WEIGHT_GRIDS))})")


@dataclass(frozen=True)
class CompileOptions:
    """Options of ``fxlava.compile`` (also ``fxlava-compile --decay-input-scale`` and so on)."""

    decay_input_scale: str = _option(
        "weights", ("weights", "threshold"),
        "where substitute_neurons puts a neuron's input scale (decay_input=True: 1/tau): into the weights of "
        "the synapse that feeds it, or into its threshold")
    bias: str = _option(
        "reject", ("reject", "current"),
        "'reject' refuses conv/linear biases and BatchNorm shifts; 'current' compiles them as Loihi neuron bias "
        "currents (the bias_to_current pass replaces reject_bias)")
    coscale: Union[bool, dict] = _option(
        True, (),
        "multiply each layer's weights, bias and threshold by one factor that fills Loihi's 8-bit weight range "
        "(coscale_layers); False keeps them as the model has them; {layer: (scale, grid)} (net.coscale) reuses "
        "the factors and weight grids of an earlier compile",
        check=_check_coscale,
        flag=("--no-coscale", dict(action="store_false",
                                   help="keep every layer's weights and threshold as the model has them "
                                        "(no co-scaling; fxlava.passes.coscale_layers)")))
    encoder: str = _option(
        "host", ("host", "refuse"),
        "a forward() that repeats a static input over time (SpikingJelly's image encoding: x.unsqueeze(0).repeat(T, "
        "...) in multi-step mode, or its own loop over T in single-step mode): 'host' runs its ops up to the first "
        "spiking layer on the host (net.encoder) and compiles the rest from that layer's spikes; 'refuse' refuses "
        "those ops")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name}={value!r}: expected one of {', '.join(map(repr, choices))}")
            if f.metadata.get("check"):
                f.metadata["check"](value)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **options: Any) -> "CompileOptions":
        """Options from keyword arguments; an unknown name raises TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown compile option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                            f"valid options: {', '.join(cls.names())}")
        return cls(**options)

    def get(self, name: str, default: Any = None) -> Any:
        """Dict-style access, for passes written against the earlier ``ctx.options`` dict."""
        return getattr(self, name, default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option-name`` flag per compile option, with its choices, default and help."""
    group = parser.add_argument_group("compile options")
    for f in dataclasses.fields(CompileOptions):
        if f.metadata.get("flag"):
            name, kwargs = f.metadata["flag"]
            group.add_argument(name, dest=f.name, default=f.default, **kwargs)
            continue
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                           choices=f.metadata.get("choices") or None,
                           help=f"{f.metadata.get('help', '')} (default: {f.default})")


def from_arguments(args: argparse.Namespace) -> CompileOptions:
    """The compile options a parsed command line asks for."""
    return CompileOptions.from_kwargs(**{name: getattr(args, name) for name in CompileOptions.names()})
