"""Campaign rounds that learn: the same campaign config as given, with ``finetune: {}`` (reward-weighted), with
``finetune: {method: grpo}`` (on-policy, fresh reward calls), with guidance given the weighted fine-tuning's
model calls instead (more candidates, equal total calls) and unguided, over several seeds.

Per variant and seed: the mean and best score of each round's new designs, each round's mean naturalness,
the campaign's total model calls (fine-tuning's included) and reward calls (the designs sent to the rewards,
guidance's look-ahead included; each distinct design once).

    python benchmarks/campaigns.py --config examples/campaign_rna.yaml --seeds 0 1 --json OUT.json
    python benchmarks/campaigns.py --config examples/campaign_dna_jaspar.yaml --seeds 0 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(values: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One campaign from a config mapping: per-round figures and total model calls."""
    from molgen.campaign import Campaign, CampaignConfig

    t0 = time.perf_counter()
    c = Campaign(CampaignConfig.from_mapping(values, values["name"]), folder, overwrite=True).run()
    frame, rounds = c.samples_frame(), c.rounds_frame()
    per_round = [{"round": int(r), "mean_score": float(part["score"].mean()), "best_score": float(part["score"].max()),
                  "naturalness": float(part["naturalness"].mean())}
                 for r, part in frame.groupby("round")]
    out = {"rounds": per_round, "model_calls": int(rounds["model_calls"].sum()),
           "reward_calls": max(r.stats.samples for r in c.rewards), "seconds": round(time.perf_counter() - t0, 1)}
    c.close()
    return out


VARIANTS = ("as_given", "finetune", "grpo", "unguided", "equal_calls")


def variants(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The config as given, with ``finetune: {}``, with ``finetune: {method: grpo}`` and unguided."""
    return {"as_given": config, "finetune": {**config, "finetune": {}},
            "grpo": {**config, "finetune": {"method": "grpo"}},
            "unguided": {**config, "guidance": {"method": "unguided"}}}


def equal_calls(config: dict[str, Any], calls: dict[str, int]) -> dict[str, Any]:
    """The config's guidance with its candidates scaled by the fine-tuned run's model calls over the plain run's
    (SVDD's and best-of-N's calls grow with the candidates)."""
    guidance = dict(config.get("guidance") or {})
    candidates = max(1, round(guidance.get("candidates", 4) * calls["finetune"] / calls["as_given"]))
    return {**config, "guidance": {**guidance, "candidates": candidates}}


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="campaign YAML (its finetune key is ignored: both ways are run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="equal_calls needs as_given and finetune before it")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = yaml.safe_load(Path(args.config).read_text())
    base.pop("finetune", None)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = {**base, "seed": seed, "database": None}
            calls: dict[str, int] = {}
            runs = variants(cfg)
            for name in args.variants:
                values = runs[name] if name in runs else equal_calls(cfg, calls)
                got = run({**values, "name": f"{base.get('name', 'campaign')}_{name}"}, Path(tmp) / f"{name}{seed}")
                calls[name] = got["model_calls"]
                rows.append({"variant": name, "seed": seed, **got,
                             "guidance": values.get("guidance"), "finetune": values.get("finetune")})
                means = " ".join(f"{r['mean_score']:.3f}" for r in got["rounds"])
                print(f"seed {seed} {name}: mean score per round {means}; {got['model_calls']} model calls, "
                      f"{got['reward_calls']} reward calls", flush=True)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]

        def per_round(key: str, mine: list[dict[str, Any]] = mine) -> list[float]:
            return np.mean([[x[key] for x in r["rounds"]] for r in mine], 0).round(4).tolist()

        summary[name] = {"mean_score_per_round": per_round("mean_score"),
                         "naturalness_per_round": per_round("naturalness"),
                         "model_calls": int(np.mean([r["model_calls"] for r in mine])),
                         "reward_calls": int(np.mean([r["reward_calls"] for r in mine]))}
    out = {"title": f"Campaign rounds that learn: {args.config}", "config": str(args.config), "seeds": args.seeds,
           "summary": summary, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
