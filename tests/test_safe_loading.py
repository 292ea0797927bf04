"""Every checkpoint the package reads is loaded without unpickling arbitrary objects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


class _Planted:
    def __reduce__(self):  # unpickling this would create a file: it must never run
        import os

        return (os.system, ("touch planted-ran",))


def test_bad_checkpoints_are_named_errors_and_run_nothing(tmp_path, monkeypatch):
    import shutil

    import torch

    from molgen.errors import InputError
    from molgen.modalities import get_modality

    monkeypatch.chdir(tmp_path)
    shipped = get_modality("backbones").default_checkpoint()
    planted = tmp_path / "planted.pt"
    torch.save({"weights": _Planted()}, planted)
    shutil.copyfile(shipped.with_suffix(".json"), planted.with_suffix(".json"))
    for name in ("backbones", "molecules", "rna"):
        with pytest.raises(InputError, match="not a molgen checkpoint"):
            get_modality(name).load(planted)
    assert not (tmp_path / "planted-ran").exists()
    with pytest.raises(InputError, match="weights of another architecture"):  # RNA weights, a backbone card
        other = tmp_path / "other.pt"
        shutil.copyfile(get_modality("rna").default_checkpoint(), other)
        shutil.copyfile(shipped.with_suffix(".json"), other.with_suffix(".json"))
        get_modality("backbones").load(other)
    with pytest.raises(InputError, match="a DNA model, not a rna one"):
        get_modality("rna").load(get_modality("dna").default_checkpoint())
    (tmp_path / "broken.pt").write_bytes(b"")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match=r"broken\.json: not a JSON card"):
        get_modality("molecules").load(tmp_path / "broken.pt")
