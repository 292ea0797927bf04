"""A design campaign: rounds of generate -> score -> select over the portfolio of all designs so far.

    from molgen.campaign import Campaign, CampaignConfig
    c = Campaign(CampaignConfig.from_yaml("examples/campaign_rna.yaml"), "runs/c1")
    c.run()
    c.samples_frame()          # pandas: one row per design, one column per reward, score, naturalness
    c.selected()               # the current selection, best first

Round r draws its designs with the seed ``round_seed(seed, r)`` (a function of the campaign seed and r only)
and, when ``refine.fraction > 0``, re-noises part of the selection of round r - 1. Its score is
sum_k w_k r_k; the guidance methods steer toward that weighted sum. Selection ranks the whole portfolio:
``top_k`` by score, ``pareto`` by non-dominated front over the reward columns (and naturalness when asked),
score breaking ties, then the newer design (so a selection can drift over a plateau of equal scores); a
design drawn twice counts once; ``min_distance`` then drops designs too close to a better one already kept.
Everything goes into the SQL store; re-running continues after the last finished round. Each reward is asked
once per distinct design (``Reward.remember``, seeded from the store on resume): a design drawn again gets its
earlier value, so an expensive oracle is never called twice on one sequence or SMILES.

With ``finetune`` set, round r >= 2 is drawn (guidance on top) from the campaign's model with a low-rank
adapter fine-tuned on every design of rounds < r and its score, or (``method: grpo``) by GRPO on fresh scored
rollouts of the campaign's sampler (``molgen.finetune``; round 2's adapter starts
at zero, round r's continues round r - 1's; the KL is always to the campaign's model), saved as
``DIR/finetune/round-RRR.pt`` with its card before the round generates; a resumed round reads it back, so it
draws with the same weights. The fine-tuning's model calls count in the round's ``model_calls``.

With ``guidance: {method: svdd_mc}`` round r >= 2 is steered by a value network regressed on every design of
rounds < r and its score (a surrogate of the rewards; ``surrogate``), so sampling calls no reward: each round
costs ``n_per_round`` reward calls. Round 1 is drawn unguided.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from molgen import __version__
from molgen.campaign import selection as sel
from molgen.campaign.config import CampaignConfig
from molgen.campaign.rounds import RoundGenerator, checkpoint_path
from molgen.campaign.store import Store, database_url, json_text, sample_id
from molgen.checkpoints import sha256_file
from molgen.locks import FolderLock
from molgen.modalities import Design, Modality, get_modality
from molgen.seeds import derived_seed

CONFIG_FILE = "campaign.json"
FINETUNE_DIR = "finetune"
SURROGATE_STEPS = 300  # value-net fitting steps before each svdd_mc round


class Campaign:
    """A campaign folder ``root`` (config copy, SQLite file, report) bound to one configuration."""

    def __init__(self, config: CampaignConfig, root: str | Path, *, overwrite: bool = False,
                 read_only: bool = False) -> None:
        """Bind ``root`` to ``config``; ``read_only`` writes nothing (status, reports). Binding and running hold
        the folder's lock (``molgen.locks``): a second process gets a clear "in use" error."""
        self.config = config
        self.root = Path(root)
        self._rounds: RoundGenerator | None = None
        self._rewards: list[Any] | None = None
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        self.store = Store(database_url(self.root, config.database))
        if not read_only:
            with FolderLock(self.root):
                self._bind(overwrite)

    @classmethod
    def open(cls, root: str | Path) -> Campaign:
        """An existing campaign folder, read-only, with the configuration it was run with."""
        path = Path(root) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a campaign folder (no {CONFIG_FILE}); run `molgen campaign run`")
        return cls(CampaignConfig.from_mapping(json.loads(path.read_text()), str(path)), root, read_only=True)

    # ------------------------------------------------------------------------------------------ identity
    def _bind(self, overwrite: bool) -> None:
        cfg = self.config
        existing = self.store.campaign()
        if existing is not None and existing["identity"] != cfg.identity_hash():
            if not overwrite:
                old = json.loads(existing["config"])
                diff = _differences(old, json.loads(json_text(cfg.to_dict())))  # tuples read back as lists
                raise ValueError(f"{self.root} holds a campaign with a different configuration (differs in "
                                 f"{diff}); use another directory or pass --overwrite")
        ckpt = checkpoint_path(cfg)
        digest = sha256_file(ckpt) if ckpt.exists() else None
        if existing is not None and existing["checkpoint_sha256"] != digest and not overwrite:
            raise ValueError(f"the model checkpoint {ckpt} changed since this campaign started (sha256 "
                             f"{str(existing['checkpoint_sha256'])[:12]}... -> {str(digest)[:12]}...); "
                             "use another directory or pass --overwrite")
        if overwrite:
            self.store.reset()
            shutil.rmtree(self.root / FINETUNE_DIR, ignore_errors=True)
            existing = None
        row = {"name": cfg.name, "modality": cfg.modality, "config": json_text(cfg.to_dict()),
               "identity": cfg.identity_hash(), "checkpoint": str(ckpt),
               "checkpoint_sha256": digest,
               "sampler": json_text(cfg.to_dict()["sampler"]), "guidance": json_text(cfg.to_dict()["guidance"]),
               "seed": cfg.seed, "molgen_version": __version__}
        if existing is None or any(existing.get(k) != v for k, v in row.items()):
            self.store.write_campaign(row)
        text = json.dumps(cfg.to_dict(), indent=2) + "\n"
        card = self.root / CONFIG_FILE
        if not card.is_file() or card.read_text() != text:
            card.write_text(text)

    # ------------------------------------------------------------------------------------------ running
    @property
    def modality(self) -> Modality:
        return get_modality(self.config.modality)

    @property
    def rounds(self) -> RoundGenerator:
        """The modality's guidance problem for this campaign (its model is loaded on first use)."""
        if self._rounds is None:
            self._rounds = RoundGenerator(self.config)
        return self._rounds

    @property
    def rewards(self) -> list[Any]:
        from molgen.guidance.rewards import parse_reward

        if self._rewards is None:
            frame, payload = self.samples_frame(), self.modality.payload
            self._rewards = [parse_reward(r.spec).remember(_known(frame, payload, r.name))
                             for r in self.config.rewards]
        return self._rewards

    def guide_reward(self) -> Any:
        """The scalar the guidance methods steer toward: sum_k w_k r_k (guidance's own SumReward)."""
        from molgen.guidance.rewards import SumReward

        weights = [r.weight for r in self.config.rewards]
        if len(weights) == 1 and weights[0] == 1.0:
            return self.rewards[0]
        return SumReward(name="score", parts=self.rewards, weights=weights,
                         penalty=sum(w * r.penalty for w, r in zip(weights, self.rewards)))

    def pending_rounds(self) -> list[int]:
        done = set(self.store.done_rounds())
        return [r for r in range(1, self.config.rounds + 1) if r not in done]

    def run(self, verbose: bool = False) -> Campaign:
        """Run every round not yet finished (a crashed round is redone from scratch)."""
        torch.set_grad_enabled(False)
        try:
            with FolderLock(self.root):
                for r in self.pending_rounds():
                    stats = self.run_round(r)
                    if verbose:
                        print(f"round {r}/{self.config.rounds}: {stats['n']} designs, best score {stats['best']:.4g}, "
                              f"selected {stats['selected']}, {stats['seconds']:.1f} s", flush=True)
        finally:
            torch.set_grad_enabled(True)
        return self

    def run_round(self, r: int) -> dict[str, Any]:
        cfg = self.config
        seed = round_seed(cfg.seed, r)
        self.store.start_round(r, seed)
        t0 = time.perf_counter()
        tuned, tuning_calls = self.finetuned(r) if cfg.finetune is not None and r >= 2 else (None, 0)
        self.rounds.use_model(tuned)
        value = self.surrogate(r) if cfg.guidance.method == "svdd_mc" and r >= 2 else None
        out = self.rounds.generate(cfg.n_per_round, seed, self.guide_reward(), self._parents(r), value)
        if len(out.designs) != cfg.n_per_round:
            raise RuntimeError(f"round {r}: generated {len(out.designs)} of {cfg.n_per_round} designs")
        t1 = time.perf_counter()
        values = self._scores(out)
        score = sum(spec.weight * values[spec.name] for spec in cfg.rewards)
        t2 = time.perf_counter()
        ids = [sample_id(r, i) for i in range(len(out.designs))]
        samples = [
            {"id": sid, "round": r, "idx": i, "origin": d.origin, "parent": d.parent, "sequence": d.sequence,
             "smiles": d.smiles, "structure": d.structure, "naturalness": _finite(d.naturalness),
             "score": float(score[i])}
            for i, (sid, d) in enumerate(zip(ids, out.designs))
        ]
        scores = [{"sample_id": sid, "reward": name, "value": float(v[i])} for name, v in values.items()
                  for i, sid in enumerate(ids)]
        chosen = self._select(pd.concat([self.samples_frame(), _new_frame(samples, values)], ignore_index=True))
        t3 = time.perf_counter()
        self.store.commit_round(r, samples, scores, chosen, {
            "model_calls": int(out.model_calls) + tuning_calls, "seconds_generate": t1 - t0, "seconds_score": t2 - t1,
            "seconds_select": t3 - t2})
        return {"n": len(samples), "best": float(np.max(score)), "selected": len(chosen), "seconds": t3 - t0}

    def _scores(self, out: Any) -> dict[str, np.ndarray]:
        """Each reward's values on a round's designs. A single reward of weight 1 is what guidance steered by and
        already scored, so its scores are reused (an expensive oracle is asked once per design)."""
        if self.guide_reward() is self.rewards[0] and bool(torch.isfinite(out.rewards).all()):
            return {self.config.rewards[0].name: out.rewards.numpy()}
        inputs = self.modality.reward_inputs(out.designs)
        return {spec.name: reward(inputs).double().cpu().numpy() for spec, reward in zip(self.config.rewards,
                                                                                          self.rewards)}

    def finetuned(self, r: int) -> tuple[torch.nn.Module, int]:
        """The adapted model round ``r`` draws from and the model calls its fine-tuning cost: read back from
        ``finetune_path(root, r)`` when a previous attempt saved it, else fine-tuned from round r - 1's adapter
        (round 2: from zero), on every design of the finished rounds (``method: weighted``) or on fresh rollouts
        scored by the guidance reward (``method: grpo``), with seed ``derived_seed("molgen-finetune", seed, r)``,
        and saved there with its card."""
        from molgen.finetune import finetune_on, grpo_on, load_adapter, save_adapter

        problem = self.rounds.problem
        path = finetune_path(self.root, r)
        if path.is_file() and path.with_suffix(".json").is_file():
            model, card = load_adapter(path, problem.sampler.model, problem.sha256)
            return model, int(card["provenance"]["model_calls"])
        spec, seed = self.config.finetune, derived_seed("molgen-finetune", self.config.seed, r)
        reward = self.guide_reward()
        start = self.finetuned(r - 1)[0] if r >= 3 else None
        if spec.method == "grpo":
            settings: Any = spec.grpo_settings(seed)
            model, report = grpo_on(problem, reward, settings, start=start)
        else:
            frame = self.samples_frame()
            x0, mask = self.modality.encode(problem, [design_of(row) for _, row in frame.iterrows()])
            scores = torch.tensor(frame["score"].to_numpy(dtype=np.float64))
            settings = spec.settings(seed)
            model, report = finetune_on(problem.sampler, x0, mask, scores, settings, penalty=reward.penalty,
                                        start=start)
        save_adapter(path, model, report, base_sha256=problem.sha256, settings=settings, reward=reward.name,
                     base_checkpoint=str(problem.checkpoint))
        return model, report.model_calls

    def surrogate(self, r: int) -> Any:
        """SVDD-MC's value hook for round ``r``: the problem's value net regressed on every design of the finished
        rounds and its score (noisy states at uniform t, ``guidance.value.fit_value``, ``SURROGATE_STEPS``
        steps, seed ``derived_seed("molgen-surrogate", seed, r)``), so a resumed round fits the same net."""
        from molgen.guidance.value import as_value, fit_value

        problem = self.rounds.problem
        frame = self.samples_frame()
        x0, mask = self.modality.encode(problem, [design_of(row) for _, row in frame.iterrows()])
        scores = torch.tensor(frame["score"].to_numpy(dtype=np.float64))
        scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, self.guide_reward().penalty))
        seed = derived_seed("molgen-surrogate", self.config.seed, r)
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            net = problem.value_net()
            fit_value(net, x0, scores, problem.noise, mask=mask, steps=SURROGATE_STEPS,
                      generator=torch.Generator().manual_seed(seed))
        return as_value(net.eval())

    def _parents(self, r: int) -> list[tuple[str, Design]]:
        if r == 1 or self.config.refine.fraction == 0:
            return []
        frame = self.samples_frame().set_index("id")
        return [(sid, design_of(frame.loc[sid])) for sid in self.store.selection(r - 1)]

    def _select(self, portfolio: pd.DataFrame) -> list[str]:
        """The ids kept after a round. The portfolio is ranked newest first, so that of two designs with equal
        scores the newer is kept (a selection drifts across a plateau of equal scores instead of freezing on
        the first design that reached it), and each distinct design (payload) counts once, as its newest copy."""
        spec = self.config.selection
        portfolio = portfolio.iloc[::-1]
        key = self.modality.payload
        if key is not None:
            portfolio = portfolio[portfolio[key].isna() | ~portfolio.duplicated(subset=key)]
        portfolio = portfolio.reset_index(drop=True)
        objectives = None
        if spec.rule == "pareto":
            cols = self.config.reward_names + (["naturalness"] if spec.objectives == "rewards+naturalness" else [])
            objectives = portfolio[cols].to_numpy(dtype=np.float64)
        distance = None
        if spec.min_distance is not None:
            distance = self.modality.distance([design_of(row) for _, row in portfolio.iterrows()])
        index = sel.select(portfolio["score"].to_numpy(dtype=np.float64), spec.k, objectives=objectives,
                           distance=distance, min_distance=spec.min_distance)
        return portfolio["id"].iloc[index].tolist()

    # ------------------------------------------------------------------------------------------ queries
    def samples_frame(self) -> pd.DataFrame:
        """Every design of the finished rounds: id, round, origin, parent, payload, naturalness, score and
        one column per reward."""
        return self.store.samples_frame(self.config.reward_names)

    def rounds_frame(self) -> pd.DataFrame:
        return self.store.rounds_frame()

    def selections_frame(self) -> pd.DataFrame:
        return self.store.selections_frame()

    def scores_frame(self) -> pd.DataFrame:
        return self.store.scores_frame()

    def selected(self, round_: int | None = None) -> pd.DataFrame:
        """The selection after ``round_`` (default: the last finished round), best first."""
        done = self.store.done_rounds()
        if not done:
            return self.samples_frame().iloc[:0]
        ids = self.store.selection(done[-1] if round_ is None else round_)
        frame = self.samples_frame().set_index("id")
        return frame.loc[ids].reset_index()

    def info(self) -> dict[str, Any]:
        return self.store.campaign() or {}

    def close(self) -> None:
        self.store.close()


def status_text(campaign: Campaign) -> str:
    """Rounds (status, designs, model calls, seconds), counts and the best designs, as plain text."""
    cfg = campaign.config
    rounds, samples = campaign.rounds_frame(), campaign.samples_frame()
    lines = [f"campaign {cfg.name!r} ({cfg.modality}) in {campaign.root}: "
             f"{len(campaign.store.done_rounds())} of {cfg.rounds} rounds done, {len(samples)} designs"]
    for _, r in rounds.iterrows():
        secs = sum(0.0 if pd.isna(r[c]) else float(r[c]) for c in ("seconds_generate", "seconds_score",
                                                                       "seconds_select"))
        part = samples[samples["round"] == r["round"]]
        chosen = samples["id"].isin(set(campaign.store.selection(int(r["round"]))))
        best = (f", best score {part['score'].max():.4g}, "
                f"selection mean score {samples.loc[chosen, 'score'].mean():.4g}" if len(part) else "")
        calls = "?" if pd.isna(r["model_calls"]) else int(r["model_calls"])  # a killed round recorded none
        lines.append(f"  round {int(r['round'])}: {r['status']}, {len(part)} designs, "
                     f"{calls} model calls, {secs:.1f} s{best}")
    if len(samples):
        cols = ["score", *cfg.reward_names, "naturalness"]
        lines.append("best per column: " + ", ".join(f"{c} {samples[c].max():.4g}" for c in cols))
        top = campaign.selected().head(5)
        payload = campaign.modality.payload
        lines.append(f"selected ({len(campaign.selected())}), best first:")
        for _, row in top.iterrows():
            extra = f"  {row[payload]}" if payload else ""
            lines.append(f"  {row['id']}  score {row['score']:.4g}" + "".join(
                f"  {c} {row[c]:.4g}" for c in cfg.reward_names) + extra)
    return "\n".join(lines)


def finetune_path(root: Path, round_: int) -> Path:
    """The adapter round ``round_`` of the campaign in ``root`` draws from (its card beside it, ``.json``)."""
    return root / FINETUNE_DIR / f"round-{round_:03d}.pt"


def round_seed(seed: int, round_: int) -> int:
    """The seed of round ``round_`` of a campaign with seed ``seed`` (``molgen.seeds.derived_seed``)."""
    return derived_seed("molgen-campaign", seed, round_)


def design_of(row: pd.Series) -> Design:
    def text(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

    return Design(sequence=text("sequence"), smiles=text("smiles"), structure=text("structure"),
                  parent=text("parent"), origin=str(row.get("origin", "sample")),
                  naturalness=float(row.get("naturalness", np.nan)))


def _known(frame: pd.DataFrame, payload: str | None, reward: str) -> dict[str, float]:
    """``reward``'s finite values of the stored designs by payload (a sequence, a SMILES); none without one."""
    if payload is None or not len(frame):
        return {}
    return {k: float(v) for k, v in zip(frame[payload], frame[reward]) if isinstance(k, str) and np.isfinite(v)}


def _new_frame(samples: list[dict[str, Any]], values: dict[str, np.ndarray]) -> pd.DataFrame:
    frame = pd.DataFrame(samples)
    for name, v in values.items():
        frame[name] = v
    return frame


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for k in keys:
        if k in ("rounds", "database") and not prefix:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out
