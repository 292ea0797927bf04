#!/usr/bin/env bash
# Outputs of every entry point on the shipped models with the default presets, small n, fixed seeds:
#   bash scripts/default_outputs.sh OUT            # then: bash scripts/default_outputs.sh OTHER && diff -r OUT OTHER
# Compare two code versions by running it from each (PYTHONPATH=CHECKOUT for a plain checkout). Timing fields
# (sampling.json seconds, done markers) are dropped so that the folders differ only where samples differ.
set -euo pipefail
OUT=${1:?usage: default_outputs.sh OUT}
PY=${PYTHON:-python}
molgen() { OMP_NUM_THREADS=1 "$PY" -m molgen.cli "$@" >/dev/null; }
mkdir -p "$OUT"
molgen sample molecules --n 8 --out "$OUT/sample_molecules.sdf"
molgen sample rna --n 8 --out "$OUT/sample_rna.fasta"
molgen sample dna --n 8 --out "$OUT/sample_dna.fasta"
molgen sample backbones --n 2 --length 60 --out "$OUT/sample_backbones"
molgen guide molecules --reward qed --n 2 --candidates 2 --out "$OUT/guide_molecules.sdf"
molgen guide rna --reward rna_mfe --n 4 --out "$OUT/guide_rna.fasta"
molgen guide backbones --reward rg --n 2 --candidates 2 --length 60 --out "$OUT/guide_backbones"
for m in molecules rna dna backbones; do
  molgen generate --modality "$m" --n 4 --shard-size 4 --out "$OUT/generate_$m" --length 60
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
for p in out.rglob("sampling.json"):
    meta = json.loads(p.read_text())
    meta.pop("seconds_per_backbone", None)
    p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
for p in out.rglob("done"):
    for f in p.iterdir():
        f.unlink()
    p.rmdir()
for p in out.rglob("*.parquet"):
    frame = pd.read_parquet(p).drop(columns=["molgen"], errors="ignore")
    p.with_suffix(".csv").write_text(frame.to_csv(index=False))
    p.unlink()
PY
