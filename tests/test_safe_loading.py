"""Every checkpoint the package reads is loaded without unpickling arbitrary objects."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = [p for folder in ("molgen", "structure", "guidance") for p in sorted((ROOT / folder).rglob("*.py"))]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_every_load_is_weights_only():
    unsafe = []
    for path in PACKAGE:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            load = node.func.attr == "load" and getattr(node.func.value, "id", None) == "torch"
            resume = node.func.attr == "fit" and _keyword(node, "ckpt_path") is not None  # Lightning's resume
            if (load or resume) and not _is_true(_keyword(node, "weights_only")):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert PACKAGE and not unsafe, f"loads without weights_only=True: {unsafe}"
