"""Small graph-rewriting helpers for passes: find nodes by module type, replace and erase them."""
from __future__ import annotations

from typing import Iterator, Optional

import torch.fx as fx
import torch.nn as nn

__all__ = ["module_of", "module_nodes", "path_of", "replace_with_module", "bypass", "next_module_node",
           "set_module", "fresh_name", "add_module"]


def module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    """The module a call_module node calls, or None for any other node."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def module_nodes(gm: fx.GraphModule, types) -> Iterator[tuple[fx.Node, nn.Module]]:
    """(node, module) for every call_module node whose module is an instance of ``types``."""
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        if m is not None and isinstance(m, types):
            yield node, m


def path_of(node: fx.Node) -> str:
    """The module's path in the user's model (or the node name for generated nodes)."""
    return node.meta.get("fxlava_path") or f"<{node.name}>"


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Install ``module`` at the dotted path ``target`` (replacing what is there)."""
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


def replace_with_module(gm: fx.GraphModule, nodes: list[fx.Node], module: nn.Module, target: str,
                        meta_from: Optional[fx.Node] = None) -> fx.Node:
    """Replace a chain of single-input nodes (first .. last) by one call to ``module``."""
    first, last = nodes[0], nodes[-1]
    set_module(gm, target, module)
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(target, (first.args[0],))
    new.meta.update((meta_from or first).meta)
    last.replace_all_uses_with(new)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return new


def bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a single-input node, wiring its input straight to its users."""
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def next_module_node(node: fx.Node) -> Optional[fx.Node]:
    """The only user of ``node``, or None if it has none or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def fresh_name(gm: nn.Module, hint: str) -> str:
    """An attribute name free on ``gm``: ``hint``, or ``hint_1``, ``hint_2``... if the user's model has it."""
    name, i = hint, 0
    while hasattr(gm, name):
        i += 1
        name = f"{hint}_{i}"
    return name


def add_module(gm: nn.Module, hint: str, module: nn.Module) -> str:
    """Add ``module`` to ``gm`` under a fresh name (see ``fresh_name``); returns the name, a call_module target."""
    target = fresh_name(gm, hint)
    gm.add_module(target, module)
    return target
