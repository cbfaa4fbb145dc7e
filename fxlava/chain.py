"""Is a graph the straight chain netx runs? Forks, merges, extra inputs and outputs, found with networkx.

A netx network is a chain of layers (``fxlava.target.MAY_FEED``). A graph that still forks when
blocks are fused cannot be written; ``chain_issues`` names each fork, the operation where its
paths merge again (found as the fork's immediate post-dominator) and the source lines of every
path, so that the user sees the whole branch, not two unrelated nodes.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

from fxlava.errors import Issue, _source_line, issue_at

__all__ = ["chain_issues", "BRANCH", "MERGE", "RESIDUAL"]

BRANCH = "a branch: netx runs only a straight chain of layers"
RESIDUAL = "a residual connection (a branch merged again by an add): netx runs only a straight chain of layers"
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
MERGE = "a merge: netx runs only a straight chain of layers"
_FIX = ("rewrite the model as a single chain, or write a pass that lowers the branch before fuse_blocks "
        "(fxlava does not lower residual or branching graphs yet)")


def _graph(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue
        g.add_node(n)
        g.add_edges_from((n, u) for u in n.users if u.op != "get_attr")
    return g


def _name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "output":
        return "the network's outputs"
    if node.op == "call_module":
        return str(node.meta.get("fxlava_path") or node.target)
    if node.op == "placeholder":
        return f"the input {node.name}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}()" if node.op == "call_function" else f".{name}()"


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    line = _source_line(node)
    return f"{_name(gm, node)} (at {line})" if line else _name(gm, node)


def _describe_path(gm: fx.GraphModule, path: list) -> str:
    """'a -> b (at file:line: code) -> c (at ...)': each source line once, after the nodes it made."""
    if not path:
        return "the fork's output itself (a skip connection)"
    parts, names, line = [], [], _source_line(path[0])
    for node in path:
        if _source_line(node) != line:
            parts.append(" -> ".join(names) + (f" (at {line})" if line else ""))
            names, line = [], _source_line(node)
        names.append(_name(gm, node))
    parts.append(" -> ".join(names) + (f" (at {line})" if line else ""))
    return " -> ".join(parts)


def _module(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def chain_issues(gm: fx.GraphModule) -> tuple[list[Issue], set]:
    """(issues, nodes in a branch): every fork with its merge and paths, extra inputs, non-tensor outputs."""
    g = _graph(gm)
    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    issues, covered = [], set()
    placeholders = [n for n in nodes if n.op == "placeholder"]
    issues.extend(issue_at(n, "the network must have exactly one input", "give forward() a single tensor argument")
                  for n in placeholders[1:])
    if any(isinstance(a, (tuple, list, dict)) for a in output.args):
        issues.append(issue_at(output, "the network must return a single tensor",
                               "return one tensor from forward(); compute extra outputs outside the model"))
    post_dominators = nx.immediate_dominators(g.reverse(copy=False), output) if output in g else {}
    merged = set()
    for n in nodes:
        users = [u for u in n.users if u.op != "get_attr"]
        if n.op == "output" or len(users) < 2:
            continue
        merge = post_dominators.get(n, output)
        paths = []
        for u in users:
            try:
                path = nx.shortest_path(g, u, merge)[:-1]
            except nx.NetworkXNoPath:
                path = [u]
            paths.append(path)
            covered.update(path)
        covered.update((n, merge))
        merged.add(merge)
        described = "".join(f"\n           path {i + 1}: {_describe_path(gm, path)}" for i, path in enumerate(paths))
        fix = (f"the output of {_name(gm, n)} feeds {len(users)} paths, merged again by "
               f"{_describe(gm, merge)}:{described}\n           {_FIX[0].upper()}{_FIX[1:]}")
        issues.append(issue_at(n, RESIDUAL if merge.target in _ADDS else BRANCH, fix, module=_module(gm, n)))
    for n in nodes:
        inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if n.op != "output" and len(inputs) > 1 and n not in merged:
            ins = ", ".join(_describe(gm, a) for a in inputs)
            issues.append(issue_at(n, MERGE, f"this node combines {len(inputs)} inputs ({ins}); {_FIX}",
                                   module=_module(gm, n)))
            covered.add(n)
    return issues, covered
