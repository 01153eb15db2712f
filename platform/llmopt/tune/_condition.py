"""`when` conditions of search-space parameters, and dotted RunConfig field paths.

A condition is a Python-like expression parsed with `ast` and evaluated by walking the tree, so only
names, constants, comparisons, `in`, `and`, `or` and `not` are possible (no calls, no attribute access
beyond dotted names): space files are data, never code.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from llmopt.config import RunConfig

_CONSTANTS = {"true": True, "false": False, "none": None, "null": None, "True": True, "False": False}


_ALLOWED = (
    ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Eq, ast.NotEq,
    ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Name, ast.Attribute, ast.Constant, ast.List,
    ast.Tuple, ast.Load, ast.USub,
)  # fmt: skip


class Condition:
    """A parsed `when` expression; `names` are the dotted names it reads."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"condition {text!r} is not a valid expression ({exc.msg})") from None
        for node in ast.walk(self.tree):
            if not isinstance(node, _ALLOWED):
                raise ValueError(
                    f"condition {text!r} uses {type(node).__name__}; only names, constants, comparisons, "
                    "`in`, `and`, `or` and `not` are allowed"
                )
        self.names = sorted(n for n in _names(self.tree) if n not in _CONSTANTS)

    def __call__(self, lookup) -> bool:
        return bool(_evaluate(self.tree.body, lookup))


def _names(node: ast.AST) -> set[str]:
    """Whole dotted names read by an expression (`a.b.c`, not also `a` and `a.b`)."""
    name = _dotted(node)
    if name is not None:
        return {name}
    return set().union(*(_names(child) for child in ast.iter_child_nodes(node)))


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _evaluate(node: ast.AST, lookup) -> Any:
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, lookup) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, lookup)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, lookup)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, lookup)
            ok = {
                ast.Eq: lambda a, b: a == b,
                ast.NotEq: lambda a, b: a != b,
                ast.Lt: lambda a, b: a < b,
                ast.LtE: lambda a, b: a <= b,
                ast.Gt: lambda a, b: a > b,
                ast.GtE: lambda a, b: a >= b,
                ast.In: lambda a, b: a in b,
                ast.NotIn: lambda a, b: a not in b,
            }[type(op)](left, right)
            if not ok:
                return False
            left = right
        return True
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, lookup) for e in node.elts]
    name = _dotted(node)
    return _CONSTANTS[name] if name in _CONSTANTS else lookup(name)


def field_at(path: str):
    """The pydantic FieldInfo of a dotted RunConfig leaf, or None."""
    model: type[BaseModel] = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if i == len(parts) - 1:
            return None if isinstance(annotation, type) and issubclass(annotation, BaseModel) else field
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return None


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def get_path(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def close_path(path: str) -> str:
    import difflib

    leaves = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                leaves.append(prefix + name)

    walk(RunConfig, "")
    close = difflib.get_close_matches(path, leaves, n=1)
    return f"; did you mean {close[0]!r}?" if close else "; see `llmopt config show` for the fields"
