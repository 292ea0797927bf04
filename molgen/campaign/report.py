"""``molgen report DIR``: one self-contained HTML page for a campaign (inline CSS and SVG, no script, no network).

Sections: the rounds (status, counts, model calls, timings, best and mean score, mean naturalness, the
fine-tuning the round drew from), distributions per round (box + points for every reward, the weighted score
and naturalness), score against naturalness with the Pareto
front of the two (both maximised) and the current selection ringed, the best designs (RNA: sequence, ViennaRNA
MFE structure and energy; DNA: sequence and GC; molecules: RDKit 2D depictions; backbones: CA trace and
contact map), and the run's full configuration and provenance.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from molgen.campaign import svg
from molgen.campaign.runner import Campaign, design_of, finetune_path
from molgen.campaign.selection import pareto_front
from molgen.modalities import get_modality

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1180px;
color:#222;background:#fafafa;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots svg,.card{background:#fff;border:1px solid #ddd;border-radius:6px}
table{border-collapse:collapse;background:#fff;font-size:.88em}td,th{border:1px solid #ddd;padding:3px 7px;
text-align:right}th{background:#f0f0f0}td.seq{font-family:ui-monospace,Menlo,Consolas,monospace;text-align:left;
white-space:pre}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{padding:8px;width:auto}
.card .meta{font-size:.8em;color:#444;max-width:420px;word-break:break-all}
pre{background:#fff;border:1px solid #ddd;padding:10px;font-size:.82em;overflow-x:auto}
svg .t{font-size:13px;font-weight:600}svg .l{font-size:12px}svg .k{font-size:10px;fill:#444}
"""
BEST = 12


def write_report(campaign: Campaign, out: str | Path | None = None) -> Path:
    """Write the report (default ``DIR/report.html``) and return its path."""
    path = Path(out) if out else campaign.root / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(campaign), encoding="utf-8")
    return path


def render(campaign: Campaign) -> str:
    cfg = campaign.config
    info = campaign.info()
    samples = campaign.samples_frame()
    rounds = campaign.rounds_frame()
    chosen = campaign.selected()
    title = f"molgen campaign: {cfg.name}"
    body = [f"<h1>{escape(title)}</h1>",
            f'<p class="sub">{escape(cfg.modality)} &middot; {len(samples)} designs in '
            f'{int((rounds["status"] == "done").sum()) if len(rounds) else 0} of {cfg.rounds} rounds &middot; '
            f"guidance {escape(cfg.guidance.method)} &middot; selection {escape(cfg.selection.rule)} "
            f"(k = {cfg.selection.k}) &middot; molgen {escape(str(info.get('molgen_version', '')))}</p>"]
    body += ["<h2>Rounds</h2>", _rounds_table(rounds, samples, campaign)]
    if len(samples):
        body += ["<h2>Reward distributions per round</h2>", _distributions(samples, cfg.reward_names)]
        body += ["<h2>Reward versus naturalness</h2>", _scatter(samples, chosen, cfg.modality)]
        body += [f"<h2>Best designs (current selection, top {min(BEST, len(chosen))})</h2>",
                 _best(chosen.head(BEST), cfg.modality, cfg.reward_names)]
    body += ["<h2>Configuration</h2>", _configuration(cfg.to_dict(), info, campaign)]
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return escape(str(v))


def _table(frame: pd.DataFrame, seq_cols: tuple[str, ...] = ()) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = "".join(f'<td class="seq">{_fmt(row[c])}</td>' if c in seq_cols else f"<td>{_fmt(row[c])}</td>"
                        for c in frame.columns)
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _rounds_table(rounds: pd.DataFrame, samples: pd.DataFrame, campaign: Campaign) -> str:
    if not len(rounds):
        return "<p>No round has run yet.</p>"
    sel = campaign.selections_frame()
    stats = samples.groupby("round")["score"].agg(["max", "mean"]) if len(samples) else pd.DataFrame()
    natural = samples.groupby("round")["naturalness"].mean() if len(samples) else pd.Series(dtype=float)
    rows = []
    for _, r in rounds.iterrows():
        k = int(r["round"])
        seconds = sum(float(r[c] or 0) for c in ("seconds_generate", "seconds_score", "seconds_select"))
        rows.append({"round": k, "status": r["status"], "designs": r["n"], "model calls": r["model_calls"],
                     "seconds": seconds if r["status"] == "done" else None,
                     "best score": stats["max"].get(k) if len(stats) else None,
                     "mean score": stats["mean"].get(k) if len(stats) else None,
                     "mean naturalness": natural.get(k),
                     "fine-tuning": _finetuning(campaign, k),
                     "selected": int((sel["round"] == k).sum()) if len(sel) else 0,
                     "selection mean score": _selection_mean(sel, samples, k),
                     **{label: int(((samples["round"] == k) & (samples["origin"] == origin)).sum())
                        if len(samples) else 0 for label, origin in (("refined", "refine"),
                                                                     ("recombined", "recombine"))}})
    return _table(pd.DataFrame(rows))


def _finetuning(campaign: Campaign, round_: int) -> str | None:
    """The fine-tuning the round drew from: steps kept (rolled back) and the final KL, from its card."""
    card = finetune_path(campaign.root, round_).with_suffix(".json")
    if not card.is_file():
        return None
    p = json.loads(card.read_text())["provenance"]
    return f"{p['steps']} steps ({len(p['rolled_back'])} rolled back), KL {p['kl']:.3g}"


def _selection_mean(sel: pd.DataFrame, samples: pd.DataFrame, round_: int) -> float | None:
    """Mean score of the portfolio selected after ``round_`` (it can only rise under top_k without a filter)."""
    ids = set(sel.loc[sel["round"] == round_, "sample_id"]) if len(sel) else set()
    return float(samples.loc[samples["id"].isin(ids), "score"].mean()) if ids else None


def _distributions(samples: pd.DataFrame, rewards: list[str]) -> str:
    plots = []
    for col in ["score", *rewards, "naturalness"]:
        groups = {int(r): g[col].to_numpy(dtype=float) for r, g in samples.groupby("round")}
        plots.append(svg.distributions(groups, "score (weighted sum)" if col == "score" else col, col))
    return f'<div class="plots">{"".join(plots)}</div>'


def _scatter(samples: pd.DataFrame, chosen: pd.DataFrame, modality: str) -> str:
    x = samples["naturalness"].to_numpy(dtype=float)
    y = samples["score"].to_numpy(dtype=float)
    front = pareto_front(np.stack([x, y], 1))
    picked = samples["id"].isin(set(chosen["id"])).to_numpy()
    plot = svg.scatter(x, y, samples["round"].astype(int).tolist(), front, picked,
                       "score vs naturalness",
                       get_modality(modality).naturalness_label, "score")
    n = int(front.sum())
    return (f'<div class="plots">{plot}</div><p>{n} design{"s" if n != 1 else ""} on the Pareto front of score '
            "and naturalness (both maximised; red staircase); ringed: the current selection; colours: rounds.</p>")


def _best(best: pd.DataFrame, modality: str, rewards: list[str]) -> str:
    """The best designs: a table for sequence modalities, cards with a picture for the others."""
    if not len(best):
        return "<p>Nothing selected yet.</p>"
    mod = get_modality(modality)
    cols = ["id", "round", "origin", "score", *rewards, "naturalness"]
    frame = best[cols].copy()
    frame.insert(0, "rank", range(1, len(frame) + 1))
    if mod.payload == "sequence":
        extra = mod.report_columns(best["sequence"].tolist())
        for key, values in extra.items():
            frame[key] = values
        return _table(frame, tuple(k for k in extra if "sequence" in k))
    cards = []
    for (_, row), (_, meta) in zip(best.iterrows(), frame.iterrows()):
        text = " &middot; ".join(f"{escape(str(k))} {_fmt(v)}" for k, v in meta.items())
        cards.append(f'<div class="card">{mod.picture(design_of(row))}<div class="meta">{text}</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def _configuration(config: dict[str, Any], info: dict[str, Any], campaign: Campaign) -> str:
    prov = {k: info.get(k) for k in ("checkpoint", "checkpoint_sha256", "molgen_version", "created")}
    prov["database"] = campaign.store.engine.url.render_as_string(hide_password=True)
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=110)
    return (f"<pre>{escape(text)}</pre><h3>Provenance</h3>"
            f"<pre>{escape(yaml.safe_dump(prov, sort_keys=False, width=200))}</pre>")
