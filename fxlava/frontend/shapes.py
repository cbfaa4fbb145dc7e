"""Shapes: run a graph on the example and note every node's output shape, quietly, naming the node that fails."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

__all__ = ["ShapeRunError", "propagate_shapes", "record_shape"]


def record_shape(node: fx.Node, value: Any) -> None:
    """What torch's ShapeProp records for a node (``tensor_meta``, ``type``), from a value already computed."""
    found = False

    def meta(obj):
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    m = map_aggregate(value, meta)
    if found:
        node.meta["tensor_meta"] = m
    node.meta["type"] = type(value)


class ShapeRunError(Exception):
    """A node of the graph failed on the example input."""

    def __init__(self, node: fx.Node, cause: BaseException):
        self.node, self.cause = node, cause
        super().__init__(f"{node.format_node()}: {type(cause).__name__}: {cause}")


class _ShapeRecorder(fx.Interpreter):
    """torch's ShapeProp without its traceback dump on stderr: a failing node is raised as ShapeRunError."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ShapeRunError(n, exc) from exc
        record_shape(n, result)
        return result


def propagate_shapes(gm: fx.GraphModule, *args) -> Any:
    """Run ``gm`` on ``args`` without gradients, recording ``meta['tensor_meta']`` on every node."""
    with torch.no_grad():
        return _ShapeRecorder(gm).run(*args)
