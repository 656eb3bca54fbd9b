"""The benchmark scripts BENCHMARKS.md quotes call lmmc functions that exist, with arguments they take."""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def _lmmc_names(tree: ast.AST) -> dict[str, Any]:
    """Names a script binds to lmmc modules and objects at any level (`from lmmc.x import y as z`,
    `import lmmc.x`, `from lmmc import bench as B`)."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "lmmc":
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = (getattr(module, alias.name) if hasattr(module, alias.name)
                                                     else importlib.import_module(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "lmmc":
                    module = importlib.import_module(alias.name)
                    names[alias.asname or "lmmc"] = module if alias.asname else importlib.import_module("lmmc")
    return names


def _target(expr: ast.expr, names: dict[str, Any]) -> Any:
    """What a call's function names, where it is an lmmc object the script imported; None otherwise."""
    if isinstance(expr, ast.Name):
        return names.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _target(expr.value, names)
        if inspect.ismodule(base):
            if not hasattr(base, expr.attr):
                try:
                    return importlib.import_module(f"{base.__name__}.{expr.attr}")
                except ImportError:
                    return AttributeError(f"{base.__name__} has no {expr.attr}")
            return getattr(base, expr.attr)
    return None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_lmmc_call_of_a_benchmark_script_binds(script):
    """Five scripts had fallen behind changes to bench's functions (a removed function, a new required
    argument) and failed at their first call; nothing but running them for minutes showed it."""
    tree = ast.parse(script.read_text())
    names = _lmmc_names(tree)
    wrong = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _target(node.func, names)
        if isinstance(target, AttributeError):
            wrong.append(f"line {node.lineno}: {target}")
            continue
        if target is None or inspect.ismodule(target) or not callable(target):
            continue
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue  # *args / **kwargs: the arguments are not known without running it
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin or extension without one
            continue
        try:
            signature.bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as err:
            wrong.append(f"line {node.lineno}: {ast.unparse(node.func)}{signature}: {err}")
    assert wrong == []
