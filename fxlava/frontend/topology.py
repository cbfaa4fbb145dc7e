"""Topology: netx runs a straight chain of layers; every branch, merge or extra input/output is reported."""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from fxlava.errors import Issue, issue_at

__all__ = ["chain_issues"]


def chain_issues(gm: fx.GraphModule) -> list[Issue]:
    """netx needs a straight chain of layers: report every branch, merge or extra input/output."""
    g = nx.DiGraph()
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    for n in nodes:
        g.add_node(n)
        for u in n.users:
            if u.op != "get_attr":
                g.add_edge(n, u)
    issues = []
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        issues.extend(issue_at(n, "the network must have exactly one input", "give forward() a single tensor argument")
                      for n in placeholders[1:])
    for n in nodes:
        if n.op == "output":
            if any(isinstance(a, (tuple, list, dict)) for a in n.args):
                issues.append(issue_at(n, "the network must return a single tensor",
                                       "return one tensor from forward(); compute extra outputs outside the model"))
            continue
        if g.out_degree(n) > 1:
            users = ", ".join(u.meta.get("fxlava_path") or u.name for u in n.users)
            issues.append(issue_at(n, "a branch: netx runs only a straight chain of layers",
                                   f"this output feeds {g.out_degree(n)} nodes ({users}); "
                                   f"rewrite the model as a single chain (residual and branching graphs are not lowered yet)",
                                   module=gm.get_submodule(n.target) if n.op == "call_module" else None))
        node_inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if len(node_inputs) > 1:
            ins = ", ".join(a.meta.get("fxlava_path") or a.name for a in node_inputs)
            issues.append(issue_at(n, "a merge: netx runs only a straight chain of layers",
                                   f"this node combines {len(node_inputs)} inputs ({ins}); rewrite the model as a single chain",
                                   module=gm.get_submodule(n.target) if n.op == "call_module" else None))
    for cycle in list(nx.simple_cycles(g))[:1]:  # fx graphs are acyclic; kept as a guard for user passes
        issues.append(Issue(reason="a loop in the graph", fix="remove the cycle",
                            node=" -> ".join(n.name for n in cycle)))
    return issues

