"""Write benchmarks/RESULTS.md from the JSON files in benchmarks/results/, and record new ones.

Every file in benchmarks/results/ is one table: ``title``, ``description``, the provenance fields ``command``,
``commit``, ``date`` and ``hardware`` (and ``source`` when the figures were copied from a model card rather than
measured by a benchmark run here), ``columns`` ([key, label, format] triples) and ``rows`` (one dict per row).
RESULTS.md is generated from them and nothing else, so every figure in it can be traced to a committed file.

    python benchmarks/results_table.py                    # rewrite benchmarks/RESULTS.md
    python benchmarks/results_table.py --check            # exit 1 if RESULTS.md is not what the JSON gives
    python benchmarks/results_table.py record samplers -- python benchmarks/samplers.py --quick --json {json}
    python benchmarks/results_table.py cards              # re-extract the model cards' recorded figures
    python benchmarks/results_table.py refresh            # re-read recorded runs' tables from their raw output

``record KIND[,KIND...] [--name NAME[,NAME...]] [--output FILE] -- COMMAND`` runs COMMAND once (``{json}`` is
replaced by a temporary file that the benchmark writes; with ``--output`` it already ran and wrote FILE), then
stores one table per KIND in benchmarks/results/NAME.json (default NAME = KIND; title, description and order of
an existing file are kept) with the command, the current commit (``git rev-parse --short HEAD``, flagged when
the working tree has uncommitted changes), the UTC date and a description of the hardware; the benchmark's
whole output is kept under ``raw``. KIND selects how the table is read from the output: samplers,
samplers_overhead, samplers_defaults, default_ends, tuned_plans, generation, guidance, sequences, structure,
structure_denoising, molecules, students, likelihood, reliability, rna_design, ehrlich, campaigns, finetune,
masked_plans.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"
REQUIRED = ("title", "command", "commit", "date", "hardware", "columns", "rows")


# ----------------------------------------------------------------------------------------------------- provenance
def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def commit() -> str:
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, check=False).returncode != 0
    return f"{head} (with uncommitted changes)" if dirty else head


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical CPUs", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- benchmark outputs
def _samplers(raw: dict) -> dict:
    rows = [{
        "target": r["target"], "nfe": r["nfe"],
        "molgen": f"{r['molgen_best']}", "molgen_error": r["molgen_error"],
        "warm": r["molgen_warm_best"], "warm_error": r["molgen_warm_error"],
        "cold": r["molgen_cold_best"], "cold_error": r["molgen_cold_error"],
        "diffusers": r["diffusers_best"], "diffusers_error": r["diffusers_error"],
        "ratio": r["ratio"], "cold_ratio": r["cold_ratio"],
    } for r in raw["summary"]["best"]]
    return {
        "columns": [["target", "target", ""], ["nfe", "NFE", ""],
                    ["molgen", "molgen best (solver/grid@last level, mode)", ""], ["molgen_error", "error", ".4f"],
                    ["cold", "molgen cold best", ""], ["cold_error", "error", ".4f"],
                    ["diffusers", "diffusers best", ""], ["diffusers_error", "error", ".4f"],
                    ["ratio", "ratio", ".2f"], ["cold_ratio", "cold ratio", ".2f"]],
        "rows": rows,
    }


def _samplers_defaults(raw: dict) -> dict:
    return {
        "columns": [["target", "target", ""], ["nfe", "NFE", ""], ["diffusers_best", "diffusers best", ""],
                    ["diffusers_error", "error", ".4f"], ["default", "molgen default", ""],
                    ["default_ratio", "default ratio", ".2f"], ["best_named_grid", "best named grid, default ends", ""],
                    ["best_named_grid_ratio", "ratio", ".2f"], ["tuned", "tuned plan", ""],
                    ["tuned_ratio", "tuned ratio", ".2f"], ["tune_seconds", "tuning s", ".0f"],
                    ["tune_model_calls", "tuning calls", ".0f"]],
        "rows": raw["summary"]["defaults"],
    }


def _default_ends(raw: dict) -> dict:
    chosen = raw["chosen"]
    rows = [{"rule": f"{grid} grid ends", "choice": f"first {v['c_first']:g} n, last {v['c_last']:g} min(1, (5/n)^1.5)",
             "ratio": v["geomean_ratio"]} for grid, v in chosen["grids"].items()]
    rows += [{"rule": f"solver for {n} calls (logsnr)", "choice": v["solver"], "ratio": v["geomean_ratio"]}
             for n, v in chosen["solvers"].items()]
    return {"columns": [["rule", "rule", ""], ["choice", "chosen", ""],
                        ["ratio", "geometric-mean error / diffusers' best, development problems", ".3f"]],
            "rows": rows}


def _tuned_plans(raw: dict) -> dict:
    rows = [{**r, "solver": r.get("solver") if r["sampler"] == "tuned plan" else None} for r in raw["rows"]]
    return {"columns": [["modality", "modality", ""], ["nfe", "NFE", ""], ["sampler", "sampler", ""],
                        ["solver", "plan's solver", ""], ["mol_stability", "molecule stability", ".1%"],
                        ["atom_stability", "atom stability", ".1%"], ["validity", "validity", ".1%"],
                        ["ca_ca_valid", "CA-CA valid", ".3f"], ["clash_rate", "clashes", ".3f"],
                        ["helix", "helix", ".2f"], ["strand", "strand", ".2f"],
                        ["tune_seconds", "tuning s", ".0f"], ["tune_model_calls", "tuning calls", ".0f"]],
            "rows": rows}


def _samplers_overhead(raw: dict) -> dict:
    ours = {r["solver"]: r for r in raw["rows"] if r["target"] == "overhead" and r["impl"] == "molgen"}
    rows = [{"solver": r["solver"], "molgen_us": 1e6 * ours[r["solver"]]["overhead_s_per_step"],
             "diffusers_us": 1e6 * r["overhead_s_per_step"], "ratio": r["ratio"]}
            for r in raw["rows"] if r["target"] == "overhead" and r["impl"] == "diffusers"]
    return {"columns": [["solver", "solver", ""], ["molgen_us", "molgen, us per step", ".0f"],
                        ["diffusers_us", "diffusers, us per step", ".0f"], ["ratio", "molgen / diffusers", ".2f"]],
            "rows": rows}


def _generation(raw: dict) -> dict:
    labels = [
        ("sharding_overhead_same_run", "sharding + Lightning + atomic writes + parquet, within the sharded run",
         ".1%"),
        ("sharding_overhead", "sharded run against a separate bare in-memory loop", ".1%"),
        ("resume_finished_s", f"resuming a finished job, N = {raw['n']} (s)", ".4f"),
        ("resume_finished_quarter_n_s", f"resuming a finished job, N = {max(raw['n'] // 4, 1)} (s)", ".4f"),
        ("bare_samples_per_s", "bare in-memory loop, samples/s", ".1f"),
        ("sharded_samples_per_s", "sharded run in-process, samples/s", ".1f"),
        ("cli_1_process_samples_per_s", "CLI, 1 process, samples/s (start-up included)", ".1f"),
        ("cli_2_processes_samples_per_s", "CLI, 2 processes (DDP, gloo), samples/s", ".1f"),
    ]
    rows = [{"figure": label, "value": format(raw[key], fmt)} for key, label, fmt in labels if key in raw]
    return {"columns": [["figure", "figure", ""], ["value", "measured", ""]], "rows": rows}


NATURALNESS = ("nll_bits_per_token", "atom_stability", "ca_ca_valid", "log_density")


def _guidance(raw: dict) -> dict:
    rows = []
    for task, res in raw.items():
        if not isinstance(res, dict):
            continue
        n = (res.get("config") or {}).get("n")
        for method, r in res.items():
            if not (isinstance(r, dict) and "reward_median" in r):
                continue
            natural = next((k for k in NATURALNESS if isinstance(r.get(k), float)), None)
            rows.append({
                "task": task, "method": method, "n": n, "median": r["reward_median"], "top10": r.get("reward_top10"),
                "mean": r.get("reward_mean"), "calls": r["model_calls"] / n if n else None,
                "natural": f"{natural} {r[natural]:.3g}" if natural else None, "kmer3_r": r.get("kmer3_r"),
                "diversity": r.get("diversity"),
            })
    return {"columns": [["task", "task", ""], ["method", "method", ""], ["n", "n", ""],
                        ["median", "reward median", ".4g"], ["top10", "top-10 % mean", ".4g"],
                        ["mean", "mean", ".4g"], ["calls", "model calls per output", ".0f"],
                        ["natural", "naturalness", ""], ["kmer3_r", "3-mer r", ".2f"],
                        ["diversity", "diversity", ".3g"]],
            "rows": rows}


def _sequence_rows(modality: str, res: dict) -> list[dict]:
    return [{"modality": modality, "solver": r["solver"], "steps": r["steps"], "kmer3_r": r.get("kmer3_r"),
             "ratio": r.get("kmer3_r_ratio_vs_ref"), "ratio_se": r.get("kmer3_r_ratio_se"),
             "kmer6_r": r.get("kmer6_r"), "nll": r.get("nll_bits_per_nt"), "s_per_seq": r.get("wall_s_per_seq")}
            for r in res["rows"]]


SEQUENCE_COLUMNS = [["modality", "modality", ""], ["solver", "sampler", ""], ["steps", "steps", ""],
                    ["kmer3_r", "3-mer r", ".3f"], ["ratio", "3-mer r / 256-step r", ".3f"],
                    ["ratio_se", "(SE)", ".3f"], ["kmer6_r", "6-mer r", ".3f"],
                    ["nll", "model NLL of samples, bits/nt", ".3f"], ["s_per_seq", "s per sequence", ".3f"]]


def _sequences(raw: dict) -> dict:
    rows = []
    for modality in ("rna", "dna"):
        if modality in raw:
            rows += _sequence_rows(modality, raw[modality])
    return {"columns": SEQUENCE_COLUMNS, "rows": rows}


STRUCTURE_COLUMNS = [["name", "row", ""], ["ca_ca_valid", "CA-CA valid", ".3f"], ["clash_rate", "clash", ".3f"],
                     ["rg_ratio", "Rg ratio", ".2f"], ["helix", "helix", ".2f"], ["strand", "strand", ".2f"],
                     ["coil", "coil", ".2f"], ["psea_helix", "P-SEA helix", ".2f"],
                     ["psea_strand", "P-SEA strand", ".2f"], ["psea_paired", "P-SEA paired", ".2f"],
                     ["tm_diversity", "TM diversity", ".2f"],
                     ["novelty", "novelty", ".2f"], ["mpnn_nll", "MPNN NLL", ".2f"],
                     ["mpnn_recovery", "MPNN recovery", ".2f"], ["s_per_backbone", "s per backbone", ".2f"]]


def _structure(raw: dict) -> dict:
    rows = raw["rows"] if isinstance(raw["rows"], list) else [{"name": k, **v} for k, v in raw["rows"].items()]
    return {"columns": STRUCTURE_COLUMNS, "rows": [{c[0]: r.get(c[0]) for c in STRUCTURE_COLUMNS} for r in rows]}


DENOISING_COLUMNS = [["model", "model", ""], ["steps", "optimiser steps", ""], ["train_wall_s", "run wall s", ""],
                     ["pair_dim", "pair track width", ""], ["self_condition", "self-conditioning", ""]]


def _structure_denoising(raw: dict) -> dict:
    """One row per checkpoint; the error columns are the keys the benchmark wrote (``mse_{none|labels}_{s}A``)."""
    errors = list(dict.fromkeys(k for c in raw["checkpoints"].values() for k in c["held_out_denoising"]))
    columns = DENOISING_COLUMNS + [[k, "MSE at " + k.split("_")[2].replace("A", " A")
                                    + (" (labels)" if "_labels_" in k else ""), ".3f"] for k in errors]
    rows = [{"model": name, **{k: v for k, v in c.items() if k != "held_out_denoising"}, **c["held_out_denoising"]}
            for name, c in raw["checkpoints"].items()]
    return {"columns": columns, "rows": [{c[0]: r.get(c[0]) for c in columns} for r in rows]}


MOLECULE_COLUMNS = [["sampler", "sampler", ""], ["steps", "NFE", ""], ["n", "n", ""],
                    ["atom_stability", "atom stability", ".1%"], ["mol_stability", "molecule stability", ".1%"],
                    ["validity", "validity", ".1%"], ["uniqueness", "uniqueness", ".1%"]]


def _molecules(raw: dict) -> dict:
    rows = []
    for label, group in (("default", raw["few_step"]), ("plain ODE, whole schedule", raw["few_step_plain_ode"]),
                         ("reference", [raw["reference"]])):
        for r in group:
            rows.append({"sampler": f"{r['solver']} ({label})", **{c[0]: r.get(c[0]) for c in MOLECULE_COLUMNS[1:]}})
    return {"columns": MOLECULE_COLUMNS, "rows": rows}


STUDENT_COLUMNS = [["model", "model", ""], ["calls", "calls", ""], ["n", "n", ""],
                   ["atom_stability", "atom stability", ".1%"], ["mol_stability", "molecule stability", ".1%"],
                   ["mol_se", "(SE)", ".1%"], ["validity", "validity", ".1%"], ["valid_se", "(SE)", ".1%"],
                   ["uniqueness", "uniqueness", ".1%"], ["novelty", "novelty", ".1%"]]


def _students(raw: dict) -> dict:
    rows = [{**r, "mol_se": r["stderr"]["mol_stability"], "valid_se": r["stderr"]["validity"]} for r in raw["rows"]]
    return {"columns": STUDENT_COLUMNS, "rows": sorted(rows, key=lambda r: (r["calls"], r["model"] != "teacher"))}


LIKELIHOOD_COLUMNS = [["states", "states", ""], ["n", "n", ""], ["bits_per_dim", "bits/dim", ".3f"],
                      ["sd_states", "sd over states", ".3f"], ["sd_probe", "Hutchinson sd", ".3f"],
                      ["seconds", "seconds", ".1f"]]


def _likelihood(raw: dict) -> dict:
    return {"columns": LIKELIHOOD_COLUMNS, "rows": raw["rows"]}


RELIABILITY_COLUMNS = [["case", "case", ""], ["expected", "expected", ""], ["outcome", "outcome", ""],
                       ["ok", "ok", ""]]


def _reliability(raw: dict) -> dict:
    rows = [{**r, "outcome": r["outcome"].replace("|", "/")[:220]} for r in raw["rows"]]
    if raw.get("fuzz"):
        f = raw["fuzz"]
        rows.append({"case": f"fuzz: every reader and spec parser, {f['examples_per_test']} examples per test",
                     "expected": "only the documented input errors escape", "outcome": f"{f['summary']}",
                     "ok": f["passed"]})
    return {"columns": RELIABILITY_COLUMNS, "rows": rows}


RNA_DESIGN_COLUMNS = [["band", "length (nt)", ""], ["method", "method", ""], ["targets", "targets", ""],
                      ["solve_rate", "solved", ".2f"], ["solve_rate_se", "(SE)", ".2f"],
                      ["undesignable", "proved undesignable", ""],
                      ["solve_rate_designable", "solved of the designable", ".2f"],
                      ["median_bp_distance", "median bp distance", ".1f"],
                      ["median_target_probability", "median p(target)", ".3g"],
                      ["median_ensemble_defect", "median ensemble defect", ".3f"],
                      ["median_seconds", "median s", ".2f"], ["median_model_calls", "median model calls", ".0f"],
                      ["refused", "refused (too long)", ""], ["diversity", "designs' Hamming diversity", ".3f"]]


def _rna_design(raw: dict) -> dict:
    rows = list(raw["rows"]) + [{"band": "20-60, 4 designs each", "method": d["method"], "targets": d["targets"],
                                 "diversity": d["mean_pairwise_hamming"]} for d in raw.get("diversity", [])]
    return {"columns": RNA_DESIGN_COLUMNS, "rows": rows}


def _ehrlich(raw: dict) -> dict:
    cols = [["method", "method", ""], ["oracle_calls", "oracle calls", ""], ["best_value", "best value", ".4f"],
            ["calls_to_optimum", "calls to reach 1.0", ""], ["seconds", "seconds", ".0f"]]
    return {"columns": cols, "rows": [{"method": m, **s} for m, s in raw["summary"].items()]}


def _campaigns(raw: dict) -> dict:
    rounds = len(next(iter(raw["summary"].values()))["mean_score_per_round"])
    cols = [["variant", "variant", ""], *[[f"r{k + 1}", f"round {k + 1} mean score", ".3f"] for k in range(rounds)],
            ["model_calls", "model calls", ".0f"], ["naturalness", "naturalness (rounds 1..last)", ""]]
    if all("reward_calls" in s for s in raw["summary"].values()):
        cols.insert(-1, ["reward_calls", "reward calls", ".0f"])
    rows = [{"variant": name, **{f"r{k + 1}": v for k, v in enumerate(s["mean_score_per_round"])},
             "model_calls": s["model_calls"], "reward_calls": s.get("reward_calls"),
             "naturalness": f"{s['naturalness_per_round'][0]:.3f} .. {s['naturalness_per_round'][-1]:.3f}"}
            for name, s in raw["summary"].items()]
    return {"columns": cols, "rows": rows}


# what a kind keeps of the benchmark's output under "raw" (default: all of it)
RAW = {"samplers_overhead": lambda raw: {"rows": [r for r in raw["rows"] if r["target"] == "overhead"]},
       "samplers_defaults": lambda raw: {"defaults": raw["summary"]["defaults"]},
       "rna_design": lambda raw: {k: v for k, v in raw.items() if k != "runs"}}  # per-target runs stay in --json

def _finetune(raw: dict) -> dict:
    cols = [["method", "method", ""], ["reward_calls", "reward calls", ""], ["model_calls", "model calls", ""],
            ["reward_mean", "fresh samples' mean reward", ".3f"], ["reward_top10_mean", "top-10 % mean", ".3f"],
            ["validity", "validity", ".3f"], ["atom_stability", "atom stability", ".3f"], ["kl", "KL", ".3f"],
            ["rolled_back", "steps rolled back", ""], ["seconds", "seconds", ".0f"]]
    return {"columns": cols, "rows": raw["rows"]}


def _masked_plans(raw: dict) -> dict:
    cols = [["modality", "model", ""], ["nfe", "calls", ""], ["default_bits", "default grid (bits/letter)", ".4f"],
            ["tuned_bits", "tuned plan", ".4f"], ["reference_bits", f"{raw['reference_steps']} steps", ".4f"],
            ["grid", "plan kept", ""], ["tune_seconds", "tuning s", ".0f"]]
    return {"columns": cols, "rows": raw["rows"]}


KINDS = {"samplers": _samplers, "samplers_overhead": _samplers_overhead, "samplers_defaults": _samplers_defaults,
         "default_ends": _default_ends, "tuned_plans": _tuned_plans,
         "generation": _generation,
         "guidance": _guidance, "sequences": _sequences, "structure": _structure,
         "structure_denoising": _structure_denoising, "molecules": _molecules, "students": _students,
         "likelihood": _likelihood, "reliability": _reliability, "rna_design": _rna_design,
         "ehrlich": _ehrlich, "campaigns": _campaigns, "finetune": _finetune, "masked_plans": _masked_plans}


def record(kinds: list[str], names: list[str], command: list[str], cwd: Path = ROOT,
           version: str | None = None, output: Path | None = None) -> list[Path]:
    """Run ``command`` once (in ``cwd``) and store one results file per (kind, name); with ``output``, the
    command already ran and wrote that file (dated by its modification time)."""
    if output is not None:
        raw, when = json.loads(output.read_text()), datetime.fromtimestamp(output.stat().st_mtime, timezone.utc)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            argv = [a.replace("{json}", str(out)) for a in command]
            subprocess.run(argv, cwd=cwd, check=True)
            raw, when = json.loads(out.read_text()), datetime.now(timezone.utc)
    shown = " ".join(shlex.quote(a.replace("{json}", "OUT.json")) for a in command)
    for prefix in (".venv/bin/python ", sys.executable + " "):
        if shown.startswith(prefix):
            shown = "python " + shown[len(prefix):]
    provenance = {"command": shown, "commit": version or commit(),
                  "date": when.strftime("%Y-%m-%d %H:%M UTC"), "hardware": hardware()}
    paths = []
    for kind, name in zip(kinds, names, strict=True):
        path = RESULTS / f"{name}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        doc = {"title": old.get("title", name), "description": old.get("description", ""),
               "order": old.get("order", 50), **provenance, "kind": kind, **KINDS[kind](raw),
               "raw": RAW.get(kind, lambda r: r)(raw)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- model cards
def _card(path: str) -> dict:
    return json.loads((ROOT / path).read_text())["provenance"]


def _out_json(command: str) -> str:
    """A recorded command with its output path written as OUT.json (where the JSON went is not a setting)."""
    words = command.split()
    return " ".join("OUT.json" if i and words[i - 1] == "--json" else w for i, w in enumerate(words))


def _card_date(path: str) -> str:
    return git("log", "-1", "--format=%cs", "--", path) or "not recorded"


def _card_version(path: str, provenance: dict) -> str:
    """Cards keep the code version of their first export; figures added later carry none of their own."""
    last = git("log", "-1", "--format=%h", "--", path) or "unknown"
    return (f"not recorded with the figures; the card's code_version is {provenance['code_version']} and the card "
            f"was last committed in {last}")


def cards() -> list[Path]:
    """The figures recorded in the shipped model cards, one results file per card."""
    written = []
    # molecules: the export measures EDM metrics on 1,000 samples per step count and stores them on the card
    card_path = "data/molecules/qm9_egnn.json"
    p = _card(card_path)
    rows = []
    for key, m in sorted(p["metrics"].items(), key=lambda kv: int(kv[0].split("_")[2])):
        s = m["sampler"]
        rows.append({"sampler": f"dpmpp_2m, {s['grid']} grid from sigma/alpha {s['first_noise']:g} A, step scale "
                                f"{s['step_scale']:g} below {s['step_scale_below']:g} A",
                     "steps": int(key.split("_")[2]), "n": m["n"], **{k: m[k] for k in (
                         "atom_stability", "mol_stability", "validity", "uniqueness", "novelty")},
                     "seconds": m.get("sampling_seconds"), "seed": m["seed"]})
    written.append(_write_card("molecules_card", {
        "title": "3D molecules: EDM metrics of the shipped QM9 model",
        "description": (f"`data/molecules/qm9_egnn.pt`, EMA weights at optimiser step {p['global_step']:,}. "
                        "Atom counts from the training histogram, seed 0, novelty against the SMILES of the QM9 "
                        "training split. For scale, EDM (1000 steps, 3,000 epochs) reports 98.7 % atom and 82.0 % "
                        "molecule stability and 91.9 % validity."),
        "order": 30,
        "command": "python -m molgen.molecules.export --source data/molecules/qm9_egnn.pt --n 1000 --steps 10 20 50",
        "commit": _card_version(card_path, p),
        "date": f"{p['exported_at_utc']} UTC (card's exported_at_utc)", "hardware": p["hardware"],
        "source": (f"{card_path}: provenance.metrics, which stores each row's n, seed and sampler; the command is "
                   "the export's documented form, not stored in the card"),
        "columns": [*MOLECULE_COLUMNS[:1], ["steps", "NFE", ""], ["n", "n", ""], *MOLECULE_COLUMNS[3:],
                    ["novelty", "novelty", ".1%"], ["seconds", "sampling s", ".0f"]],
        "rows": rows,
    }))
    # sequences: the benchmark's rows are stored on each card under metrics.samples
    for modality in ("rna", "dna"):
        card_path = f"data/sequences/{modality}_default.json"
        p = _card(card_path)
        s = p["metrics"]["samples"]
        rows = _sequence_rows(modality, s)
        ceiling = s.get("natural_ceiling") or {}
        desc = (f"`data/sequences/{modality}_default.pt` ({p['parameters']:,} parameters, {p['global_step']:,} "
                f"optimiser steps, held-out NELBO {p['metrics']['heldout_bits_per_token']:.3f} bits/nt). "
                f"{s['n']} sequences per row, one seed; 3-mer r = Pearson r of 3-mer frequencies against held-out "
                f"natural sequences; the ratio is against the 256-step row, with its bootstrap SE. Natural "
                f"sequences at the same n give 3-mer r {ceiling.get('kmer3_r_mean', float('nan')):.3f}. "
                "Plain ancestral and tau-leaping draw exactly the sequences of cached ancestral, so that row "
                "stands for all three.")
        written.append(_write_card(f"{modality}_card", {
            "title": f"{modality.upper()}: few-step masked-diffusion samplers on the shipped model",
            "description": desc, "order": 40 if modality == "rna" else 41,
            "command": _out_json(s["benchmark_command"]),
            "commit": _card_version(card_path, p),
            "date": f"{_card_date(card_path)} (commit date of the card)", "hardware": s["hardware"],
            "source": f"{card_path}: provenance.metrics.samples",
            "columns": SEQUENCE_COLUMNS, "rows": rows,
        }))
    # backbones: the benchmark's rows are stored on the card under benchmark
    card_path = "data/structure/backbone_egnn.json"
    p = _card(card_path)
    b = p["benchmark"]
    written.append(_write_card("backbones_card", {
        "title": "Protein backbones: the shipped model at 2-200 model calls",
        "description": (f"`data/structure/backbone_egnn.pt` (EMA weights, step {p['steps']:,}); 8 backbones of 80 "
                        "residues per row, seed 0; novelty on 2 backbones per row. " + b["sampler"] + ". The "
                        "natural row is TS50 plus Pfam40 chains."),
        "order": 60,
        "command": _out_json("python benchmarks/" + b["command"].removeprefix("python ").removeprefix("benchmarks/")),
        "commit": _card_version(card_path, p),
        "date": f"{_card_date(card_path)} (commit date of the card)", "hardware": p["hardware"],
        "source": f"{card_path}: provenance.benchmark",
        **_structure(b),
    }))
    return written


def _write_card(name: str, doc: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- rendering
def fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def render_table(doc: dict) -> list[str]:
    cols = doc["columns"]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in doc["rows"]:
        lines.append("| " + " | ".join(fmt(row.get(c[0]), c[2]) for c in cols) + " |")
    return lines


def load_all() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        missing = [k for k in REQUIRED if k not in doc]
        if missing:
            raise SystemExit(f"{path.relative_to(ROOT)}: missing {', '.join(missing)}")
        docs.append((path, doc))
    return sorted(docs, key=lambda pd: (pd[1].get("order", 50), pd[0].name))


def render() -> str:
    lines = [
        "# Benchmark results",
        "",
        "<!-- generated by benchmarks/results_table.py from benchmarks/results/*.json: edit those, then run",
        "     python benchmarks/results_table.py -->",
        "",
        "Every table below is generated from one JSON file in `benchmarks/results/`, which records the command that",
        "produced it, the code version, the date and the hardware. Tables whose `source` names a model card copy the",
        "figures that the card recorded when the checkpoint was measured; the others were measured by the command",
        "shown. Figures are from small runs on CPUs unless the hardware says otherwise, so read them with their n.",
        "Every row of a table shares its file's provenance, listed here:",
        "",
    ]
    docs = load_all()
    lines += ["| table | command | code version | date | hardware |", "|---|---|---|---|---|"]
    for _, doc in docs:
        lines.append("| " + " | ".join(fmt(v, "") for v in (
            doc["title"], f"`{doc['command']}`", doc["commit"], doc["date"], doc["hardware"])) + " |")
    lines.append("")
    for path, doc in docs:
        # snippet markers: a docs page can include one section, --8<-- "benchmarks/RESULTS.md:NAME"
        lines += [f"## {doc['title']}", "", f"<!-- --8<-- [start:{path.stem}] -->"]
        if doc.get("description"):
            lines += [doc["description"], ""]
        lines += [
            f"- file: `benchmarks/results/{path.name}`",
            f"- command: `{doc['command']}`",
            f"- code version: {doc['commit']}",
            f"- date: {doc['date']}",
            f"- hardware: {doc['hardware']}",
        ]
        if doc.get("source"):
            lines.append(f"- source: {doc['source']}")
        lines += ["", *render_table(doc), f"<!-- --8<-- [end:{path.stem}] -->", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["record"]:
        p = argparse.ArgumentParser(prog="results_table.py record", usage="%(prog)s KIND [options] -- COMMAND")
        p.add_argument("kind", help=f"comma-separated, from {', '.join(sorted(KINDS))}")
        p.add_argument("--name", default=None, help="comma-separated results file names (default: the kinds)")
        p.add_argument("--cwd", type=Path, default=ROOT,
                       help="run the command here, e.g. in a clean export of a commit (git archive HEAD | tar -x)")
        p.add_argument("--commit", default=None, help="the code version run, when --cwd is not this checkout")
        p.add_argument("--output", type=Path, default=None,
                       help="COMMAND already ran on this machine and wrote this JSON: record it without a rerun")
        own, command = (argv[1:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv[1:], [])
        args = p.parse_args(own)
        if not command:
            p.error("give the benchmark command after --")
        kinds = args.kind.split(",")
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            p.error(f"unknown kind(s) {unknown}; choose from {sorted(KINDS)}")
        names = args.name.split(",") if args.name else kinds
        if len(names) != len(kinds):
            p.error("--name needs one name per kind")
        for path in record(kinds, names, command, args.cwd, args.commit, args.output):
            print(f"wrote {path.relative_to(ROOT)}")
        OUT.write_text(render())
        return 0
    if argv[:1] == ["refresh"]:  # re-read the tables of recorded runs from their raw output
        for path in sorted(RESULTS.glob("*.json")):
            doc = json.loads(path.read_text())
            if doc.get("kind") in KINDS and "raw" in doc:
                doc.update(KINDS[doc["kind"]](doc["raw"]))
                path.write_text(json.dumps(doc, indent=1) + "\n")
                print(f"refreshed {path.relative_to(ROOT)}")
        OUT.write_text(render())
        return 0
    if argv[:1] == ["cards"]:
        for path in cards():
            print(f"wrote {path.relative_to(ROOT)}")
        OUT.write_text(render())
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail if benchmarks/RESULTS.md is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print("benchmarks/RESULTS.md is out of date: run python benchmarks/results_table.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
