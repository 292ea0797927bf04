"""Design campaigns: selection rules on hand-built cases, strict configs, the SQL store, resume after a crash,
refusal of another configuration, SDEdit-style refinement, the command line."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from molgen.campaign import Campaign, CampaignConfig
from molgen.campaign import selection as sel
from molgen.campaign.rounds import RoundGenerator
from molgen.campaign.runner import status_text
from molgen.cli import main
from molgen.locks import FolderInUse, FolderLock
from molgen.modalities import Design, get_modality

TARGET = "((((....))))"  # 12 nt
TIMING = ["seconds_generate", "seconds_score", "seconds_select", "started", "finished"]


def tiny(**over) -> dict:
    cfg = {
        "name": "tiny", "modality": "rna", "seed": 3, "rounds": 3, "n_per_round": 6, "length": 12,
        "sampler": {"steps": 4},
        "rewards": [{"name": "target", "spec": f"rna_target:{TARGET}"}, {"name": "mfe", "spec": "rna_mfe",
                                                                          "weight": 0.05}],
        "guidance": {"method": "svdd", "candidates": 2},
        "selection": {"rule": "pareto", "k": 4, "min_distance": 0.2},
        "refine": {"fraction": 0.5, "t": 0.5, "recombine": 0.5},
    }
    cfg.update(over)
    return cfg


def crash_in_round_2(campaign: Campaign, monkeypatch) -> None:
    """Run ``campaign`` until its round 2 starts generating (the first round with parents), then kill it."""
    original = RoundGenerator.generate

    def fail_in_round_2(self, n, seed, reward, parents, value=None):
        if parents:
            raise RuntimeError("worker died")
        return original(self, n, seed, reward, parents, value)

    monkeypatch.setattr(RoundGenerator, "generate", fail_in_round_2)
    with pytest.raises(RuntimeError, match="worker died"):
        campaign.run()
    monkeypatch.setattr(RoundGenerator, "generate", original)


def write_yaml(path: Path, values: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


# ------------------------------------------------------------------------------------------------ selection
def test_pareto_front_exact():
    pts = np.array([[1, 5], [2, 4], [3, 3], [2, 2], [1, 1], [3, 3], [0, 6], [4, 0], [4, -1]], float)
    front = sel.pareto_front(pts)
    assert front.tolist() == [True, True, True, False, False, True, True, True, False]
    assert sel.pareto_ranks(pts).tolist() == [0, 0, 0, 1, 2, 0, 0, 0, 1]
    # three objectives: (1,1,1) is dominated only by (1,1,2); (2,0,0) and (0,2,0) trade off
    pts3 = np.array([[1, 1, 1], [1, 1, 2], [2, 0, 0], [0, 2, 0], [0, 0, 0]], float)
    assert sel.pareto_front(pts3).tolist() == [False, True, True, True, False]
    assert sel.pareto_ranks(pts3).tolist() == [1, 0, 0, 0, 2]
    # NaN never dominates
    assert sel.pareto_front(np.array([[np.nan, 9.0], [1.0, 1.0]])).tolist() == [True, True]


def test_select_top_k_pareto_and_diversity():
    score = np.array([4.0, 3.0, 2.0, 1.0])
    assert sel.select(score, 2) == [0, 1]
    seqs = ["AAAA", "AAAT", "TTTT", "AATT"]
    dist = lambda i, j: sel.hamming(seqs[i], seqs[j])  # noqa: E731
    # AAAT is 0.25 from AAAA; AATT is exactly 0.5 from both AAAA and TTTT (kept: >= threshold)
    assert sel.select(score, 3, distance=dist, min_distance=0.5) == [0, 2, 3]
    assert sel.select(score, 4, distance=dist, min_distance=0.6) == [0, 2]
    # Pareto: points 2 and 3 form the front, ties inside a front go by score
    obj = np.array([[0, 0], [1, 0], [5, 1], [1, 5]], float)
    assert sel.select(score, 4, objectives=obj) == [2, 3, 1, 0]
    assert sel.hamming("ACGU", "ACG") == 0.25 and sel.hamming("", "") == 0.0


# ------------------------------------------------------------------------------------------------ config
def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    ok = CampaignConfig.from_yaml(write_yaml(tmp_path / "ok.yaml", tiny()))
    assert ok.selection.k == 4 and ok.rewards[1].weight == 0.05
    cases = [
        (tiny(colour="red"), "colour"),
        (tiny(selection={"rule": "top_k", "kk": 3}), "selection.kk"),
        (tiny(rewards=[{"name": "a", "spec": "rna_mfe", "wieght": 2}]), "rewards[0].wieght"),
        (tiny(guidance={"method": "magic"}), "guidance.method"),
        (tiny(selection={"rule": "best"}), "selection.rule"),
        (tiny(rewards=[{"name": "a", "spec": "no_such_reward"}]), "rewards[0].spec"),
        (tiny(n_per_round="many"), "n_per_round"),
        (tiny(rounds=0), "rounds"),
        (tiny(refine={"t": 0.0}), "refine.t"),
        (tiny(refine={"t": [0.1, 1.5]}), "refine.t"),
        (tiny(refine={"t": [0.1, "big"]}), "refine.t"),
        (tiny(refine={"t": []}), "refine.t"),
        (tiny(rewards=[{"name": "q", "spec": "qed"}]), "rewards[0].spec"),  # a molecule reward for RNA
        (tiny(guidance={"method": "svdd", "lam": float("inf")}), "guidance.lam"),
        (tiny(refine={"fraction": 0.5, "recombine": 1.5}), "refine.recombine"),
        ({"modality": "molecules", "rounds": 2, "n_per_round": 4, "rewards": [{"name": "q", "spec": "qed"}],
          "refine": {"fraction": 0.5, "recombine": 0.5}}, "refine.recombine"),  # molecules are not strings
        (tiny(modality="dna", rewards=[{"name": "g", "spec": "gc"}], refine={"fraction": 0.5, "t": 0.5}), None),
    ]
    for i, (values, key) in enumerate(cases):
        path = write_yaml(tmp_path / f"bad{i}.yaml", values)
        if key is None:  # a valid neighbour of the bad cases
            assert CampaignConfig.from_yaml(path).refine.fraction == 0.5
            continue
        with pytest.raises(ValueError) as err:
            CampaignConfig.from_yaml(path)
        assert key in str(err.value) and str(path) in str(err.value), (key, str(err.value))
    with pytest.raises(ValueError, match="missing key"):
        CampaignConfig.from_mapping({"modality": "rna"}, "x.yaml")


# ------------------------------------------------------------------------------------------------ runs
def frames(c: Campaign) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return c.samples_frame(), c.selections_frame(), c.rounds_frame().drop(columns=TIMING)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Campaign:
    return Campaign(CampaignConfig.from_mapping(tiny()), tmp_path_factory.mktemp("full")).run()


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch, uninterrupted):
    cfg = CampaignConfig.from_mapping(tiny())
    full = uninterrupted
    s_full, sel_full, r_full = frames(full)
    assert len(s_full) == 18 and s_full["id"].is_unique
    assert set(s_full.loc[s_full["round"] > 1, "origin"]) == {"sample", "refine", "recombine"}
    # refined and recombined designs descend from the previous round's selection
    for r in (2, 3):
        parents = set(full.store.selection(r - 1))
        moved = (s_full["round"] == r) & s_full["origin"].isin(["refine", "recombine"])
        assert set(s_full.loc[moved, "parent"]) <= parents

    crashed = Campaign(cfg, tmp_path / "crash")
    crash_in_round_2(crashed, monkeypatch)
    rounds = crashed.rounds_frame()
    assert rounds["status"].tolist() == ["done", "running"]
    assert crashed.samples_frame()["round"].tolist() == [1] * 6
    assert "round 2: running, 0 designs, ? model calls" in status_text(Campaign.open(tmp_path / "crash"))

    resumed = Campaign(cfg, tmp_path / "crash").run()
    s_res, sel_res, r_res = frames(resumed)
    pd.testing.assert_frame_equal(s_res, s_full)
    pd.testing.assert_frame_equal(sel_res, sel_full)
    pd.testing.assert_frame_equal(r_res, r_full)
    # re-running a finished campaign adds nothing; raising `rounds` continues it
    assert Campaign(cfg, tmp_path / "crash").pending_rounds() == []
    more = Campaign(CampaignConfig.from_mapping(tiny(rounds=4)), tmp_path / "crash")
    assert more.pending_rounds() == [4]
    # plain SQL sees the same store
    with sqlite3.connect(tmp_path / "crash" / "campaign.sqlite") as con:
        assert con.execute("select count(*), count(distinct id) from samples").fetchone() == (18, 18)
        assert con.execute("select count(*) from scores").fetchone() == (36,)
        row = con.execute("select modality, checkpoint_sha256, molgen_version from campaign").fetchone()
    assert row[0] == "rna" and len(row[1]) == 64 and row[2]


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, uninterrupted):
    """SIGKILL the command-line run while round 2 is running; the resumed campaign equals the uninterrupted one."""
    cfg = write_yaml(tmp_path / "c.yaml", tiny())
    folder = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "molgen.cli", "campaign", "run", str(cfg), "--dir", str(folder),
                             "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = folder / "campaign.sqlite"
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=0.1) as con:
                    status = con.execute("select status from rounds where round = 2").fetchone()
            except sqlite3.OperationalError:  # tables not created yet, or locked by a commit
                status = None
            if status == ("running",):
                proc.kill()
                break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert status == ("running",), f"never saw round 2 running (rc {proc.returncode}): {proc.stderr.read()[-500:]}"
    assert proc.returncode == -signal.SIGKILL
    killed = Campaign.open(folder)
    assert killed.store.done_rounds() == [1] and len(killed.samples_frame()) == 6
    resumed = Campaign.open(folder).run()
    for a, b in zip(frames(resumed), frames(uninterrupted)):
        pd.testing.assert_frame_equal(a, b)


def test_other_config_is_refused_unless_overwrite(tmp_path):
    Campaign(CampaignConfig.from_mapping(tiny(rounds=1, n_per_round=2)), tmp_path).run()
    other = CampaignConfig.from_mapping(tiny(rounds=1, n_per_round=2, seed=4,
                                             guidance={"method": "bon", "candidates": 2}))
    with pytest.raises(ValueError, match=r"differs in \['guidance\.method', 'seed'\]"):  # not the rewards list
        Campaign(other, tmp_path)
    with FolderLock(tmp_path), pytest.raises(FolderInUse, match="in use"):  # another process runs it
        Campaign(CampaignConfig.from_mapping(tiny(rounds=1, n_per_round=2)), tmp_path)
    c = Campaign(other, tmp_path, overwrite=True)
    assert c.samples_frame().empty and c.pending_rounds() == [1]
    c.run()
    assert len(c.samples_frame()) == 2 and c.info()["seed"] == 4


def test_changed_checkpoint_is_refused(tmp_path):
    from molgen.sequences.pretrained import default_checkpoint

    ckpt = tmp_path / "rna.pt"
    shutil.copyfile(default_checkpoint("rna"), ckpt)
    shutil.copyfile(default_checkpoint("rna").with_suffix(".json"), ckpt.with_suffix(".json"))
    cfg = CampaignConfig.from_mapping(tiny(rounds=1, n_per_round=2, checkpoint=str(ckpt)))
    Campaign(cfg, tmp_path / "c").run()
    assert Campaign(cfg, tmp_path / "c").pending_rounds() == []
    with open(ckpt, "ab") as f:  # a training run replaced the weights
        f.write(b"\0")
    with pytest.raises(ValueError, match="checkpoint .* changed since this campaign started"):
        Campaign(cfg, tmp_path / "c")


def test_refinement_keeps_every_unmasked_token():
    """SDEdit for masked diffusion: the re-noised state is q(x_t | x_0), and the reverse chain only fills masks."""
    from molgen.guidance.baselines import run_unguided

    cfg = CampaignConfig.from_mapping(tiny())
    mod, problem = get_modality(cfg.modality), RoundGenerator(cfg).problem
    pre = problem.sampler
    parents = ["GGGGAAACCCCA", "ACGUACGUACGU", "GCGCGCAUAUAU"]
    x0, _ = mod.encode(problem, [Design(sequence=s) for s in parents])
    g = torch.Generator().manual_seed(0)
    fractions = []
    for t in (0.25, 0.75):
        x_t = mod.noise_to(problem, x0, None, t, g)
        masked = x_t == pre.process.mask_id
        fractions.append(float(masked.float().mean()))
        smp = mod.partial_sampler(problem, t)
        assert smp.n_steps == round(pre.steps * t) + 1 and float(smp.grid[0]) == t
        with torch.no_grad():
            child, _, _ = run_unguided(smp, x_t, g)
        assert torch.equal(child[~masked], x0[~masked])
        assert not (child == pre.process.mask_id).any()
    assert fractions[0] < fractions[1]  # about 1 - alpha(t) = t of the tokens are re-masked


def test_a_ladder_of_refinement_levels_deals_every_parent_small_and_large_moves():
    cfg = CampaignConfig.from_mapping(tiny(refine={"fraction": 1.0, "t": [0.1, 1.0]}, guidance={"method": "unguided"}))
    assert cfg.refine.levels == (0.1, 1.0) and CampaignConfig.from_mapping(json.loads(json.dumps(cfg.to_dict()))) == cfg
    parents = [(f"p{i}", Design(sequence=s)) for i, s in enumerate(["GGGGAAACCCCA", "ACGUACGUACGU", "GCGCGCAUAUAU"])]
    gen = RoundGenerator(cfg)
    out = gen.generate(12, 0, _reward(), parents)
    by = {pid: d.sequence for pid, d in parents}
    moved = [sum(a != b for a, b in zip(d.sequence, by[d.parent])) for d in out.designs]
    small, large = moved[:6], moved[6:]  # the first level's refinements come first, then the second's
    assert sorted(d.parent for d in out.designs[:6]) == sorted(d.parent for d in out.designs[6:])  # every parent
    assert np.mean(small) < 3 < np.mean(large)  # ~10 % re-masked against a fresh draw (~75 % differ)


def test_recombined_refinements_are_rearranged_parents_scored_as_they_are():
    """A share ``recombine`` of the refinements is the parents rearranged (one window replaced by a segment of a
    selected design, or rotated by one place), scored by the round's reward and measured by the model; a config
    without the key keeps its old identity."""
    cfg = CampaignConfig.from_mapping(tiny(refine={"fraction": 1.0, "t": 0.5, "recombine": 0.5},
                                           guidance={"method": "unguided"}))
    assert "recombine" not in CampaignConfig.from_mapping(tiny(refine={"fraction": 0.5})).identity()["refine"]
    assert cfg.identity()["refine"]["recombine"] == 0.5
    parents = [(f"p{i}", Design(sequence=s)) for i, s in enumerate(["GGGGAAACCCCA", "ACGUACGUACGU", "GCGCGCAUAUAU"])]
    reward = _reward()
    out = RoundGenerator(cfg).generate(24, 0, reward, parents)
    by = {pid: d.sequence for pid, d in parents}
    moved = [d for d in out.designs if d.origin == "recombine"]
    assert len(moved) == 12 and {d.parent for d in moved} == set(by)
    assert all(_rotation_or_transplant(d.sequence, by[d.parent], by.values()) for d in moved)
    assert all(math.isfinite(d.naturalness) for d in out.designs)
    assert torch.allclose(out.rewards[-12:], reward([d.sequence for d in moved]).double())


def _rotation_or_transplant(child: str, parent: str, donors) -> bool:
    """Whether ``child`` is ``parent`` with one window rotated by one place, or overwritten by a segment of one
    of ``donors``."""
    n = len(parent)
    for i in range(n):
        for j in range(i + 1, n + 1):
            if child[:i] != parent[:i] or child[j:] != parent[j:]:
                continue
            mid = parent[i:j]
            rotated = child[i:j] in (mid[1:] + mid[:1], mid[-1:] + mid[:-1])
            if rotated or j - i >= 2 and any(child[i:j] in d for d in donors):
                return True
    return False


def test_rearrange_moves_are_translocations_and_shifts():
    from molgen.modalities.sequences import rearrange

    seq, donor = "ABCDEFGHIJKLMNOP", "qrstuvwxyz"
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(200):
        child = rearrange(seq, donor, g)
        assert len(child) == len(seq) and _rotation_or_transplant(child, seq, [donor])
        kinds.add("shift" if sorted(child) == sorted(seq) else "translocation")
        moved = [a != b for a, b in zip(child, seq)]
        assert moved.count(True) != 1  # a move changes a window, never a lone letter
    assert kinds == {"shift", "translocation"}
    assert rearrange("A", donor, g) == "A"
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [rearrange(seq, seq, g1) for _ in range(5)] == [rearrange(seq, seq, g2) for _ in range(5)]


def test_selection_keeps_the_newest_of_equal_designs_once(tmp_path):
    """Ties go to the newer design (the selection drifts across a plateau) and a design drawn twice counts once."""
    c = Campaign(CampaignConfig.from_mapping(tiny(selection={"rule": "top_k", "k": 3})), tmp_path / "c")
    portfolio = pd.DataFrame({"id": ["r001-0", "r001-1", "r002-0", "r002-1", "r002-2"],
                              "sequence": ["AAAA", "CCCC", "GGGG", "AAAA", "UUUU"],
                              "score": [1.0, 0.5, 0.5, 1.0, 0.1]})
    assert c._select(portfolio) == ["r002-1", "r002-0", "r001-1"]
    c.close()


def _reward():
    from molgen.guidance.rewards import parse_reward

    return parse_reward("rna_mfe")


def test_cli_run_status_report(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"  # a database outside the folder, by URL
    cfg = write_yaml(tmp_path / "c.yaml", tiny(rounds=2, n_per_round=3, guidance={"method": "unguided"},
                                              selection={"rule": "top_k", "k": 2}, refine={"fraction": 0.0},
                                              database=url))
    assert main(["campaign", "run", str(cfg), "--dir", str(tmp_path / "c"), "--no-report"]) == 0
    assert main(["campaign", "status", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 rounds done, 6 designs" in out and "round 2: done, 3 designs" in out
    assert (tmp_path / "elsewhere.sqlite").exists() and not (tmp_path / "c" / "campaign.sqlite").exists()
    assert main(["report", str(tmp_path / "c"), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    bad = write_yaml(tmp_path / "bad.yaml", tiny(sampler={"stpes": 4}))
    assert main(["campaign", "run", str(bad), "--dir", str(tmp_path / "b")]) == 2
    assert "sampler.stpes" in capsys.readouterr().err
    assert main(["campaign", "status", str(tmp_path / "nothing")]) == 2


def test_molecule_and_backbone_campaigns_guided_and_refined(tmp_path):
    mol = CampaignConfig.from_mapping({
        "modality": "molecules", "rounds": 2, "n_per_round": 4, "sampler": {"steps": 4},
        "rewards": [{"name": "qed", "spec": "qed"}, {"name": "valid", "spec": "validity"}],
        "guidance": {"method": "bon", "candidates": 2}, "refine": {"fraction": 0.5, "t": 0.3},
        "selection": {"rule": "top_k", "k": 3, "min_distance": 0.4}})
    c = Campaign(mol, tmp_path / "mol").run()
    s = c.samples_frame()
    assert len(s) == 8 and s["naturalness"].between(0, 1).all()
    assert ((s["valid"] > 0) == (s["smiles"] != "")).all()  # validity is the largest fragment's share of atoms
    assert ((s["valid"] == 1) == ((s["smiles"] != "") & ~s["smiles"].str.contains(".", regex=False))).all()
    assert len(c.selected()) <= 3
    from rdkit import Chem

    def atoms(block: str) -> int:
        return Chem.MolFromMolBlock(block, sanitize=False, removeHs=False).GetNumAtoms()

    refined = s[s["origin"] == "refine"]
    assert len(refined) == 2
    by_id = s.set_index("id")
    for _, row in refined.iterrows():  # refinement keeps the parent's atoms (SDEdit from t = 0.3)
        assert row["parent"] in set(c.store.selection(1))
        assert atoms(row["structure"]) == atoms(by_id.loc[row["parent"], "structure"])

    bb = CampaignConfig.from_mapping({
        "modality": "backbones", "rounds": 2, "n_per_round": 2, "length": 40, "sampler": {"steps": 4},
        "rewards": [{"name": "compact", "spec": "quadratic:c=0,tau=10"}],
        "guidance": {"method": "svdd", "candidates": 2}, "refine": {"fraction": 0.5, "t": 0.1},
        "selection": {"rule": "top_k", "k": 2, "min_distance": 0.05}})
    c = Campaign(bb, tmp_path / "bb").run()
    s = c.samples_frame()
    assert len(s) == 4 and all(t.count(" CA ") == 40 for t in s["structure"])
    from molgen.modalities.backbones import ca_from_pdb

    # compactness reward = -sum |x|^2 / (2 tau^2) over zero-centred CA coordinates
    ca = ca_from_pdb(s["structure"][0])
    assert s["compact"][0] == pytest.approx(-(ca**2).sum() / 200.0, rel=1e-3)
    # a refined backbone from t = 0.1 stays close to its parent; fresh ones do not
    child = s[s["origin"] == "refine"].iloc[0]
    parent = ca_from_pdb(s.set_index("id").loc[child["parent"], "structure"])
    rmsd_parent = np.sqrt(((ca_from_pdb(child["structure"]) - parent) ** 2).sum(-1).mean())
    fresh = ca_from_pdb(s[(s["round"] == 2) & (s["origin"] == "sample")].iloc[0]["structure"])
    assert rmsd_parent < 0.5 * np.sqrt(((fresh - parent) ** 2).sum(-1).mean())


def test_database_passwords_never_reach_disk(monkeypatch):
    from molgen.campaign.store import PASSWORD_VARIABLE, database_url, mask_password

    url = "postgresql://user:PASSWORD@db.example/designs"
    cfg = CampaignConfig.from_mapping(tiny(database=url))
    assert cfg.database == url  # the run connects with it
    stored = cfg.to_dict()["database"]  # campaign.json, the store's config column and the report show this
    assert stored == mask_password(url) == "postgresql://user:***@db.example/designs"
    assert "PASSWORD" not in json.dumps(cfg.to_dict())
    monkeypatch.delenv(PASSWORD_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=PASSWORD_VARIABLE):  # reopening a stored campaign needs the password
        database_url(Path("."), stored)
    monkeypatch.setenv(PASSWORD_VARIABLE, "PASSWORD")
    assert database_url(Path("."), stored) == url
    assert database_url(Path("."), url) == url and mask_password(None) is None


# ------------------------------------------------------------------------------------------------ fine-tuning
FINETUNE = {"steps": 3, "batch": 6, "rank": 2, "lr": 0.05, "kl_bound": 5.0}


def test_finetune_key_is_checked_and_part_of_the_identity():
    from molgen.campaign.config import FinetuneSpec

    plain = CampaignConfig.from_mapping(tiny())
    assert plain.finetune is None and "finetune" not in plain.identity()  # older campaigns keep their identity
    assert CampaignConfig.from_mapping(tiny(finetune=None)).identity_hash() == plain.identity_hash()
    defaults = CampaignConfig.from_mapping(tiny(finetune={}))
    assert defaults.finetune == FinetuneSpec() and defaults.identity_hash() != plain.identity_hash()
    assert CampaignConfig.from_mapping(tiny(finetune={"beta": 3})).finetune.beta == 3.0
    with pytest.raises(ValueError, match=r"finetune\.stepz"):
        CampaignConfig.from_mapping(tiny(finetune={"stepz": 3}))
    with pytest.raises(ValueError, match="finetune.lr must be a finite number > 0"):
        CampaignConfig.from_mapping(tiny(finetune={"lr": 0}))
    assert set(defaults.identity()["finetune"]).isdisjoint({"method", "iterations", "group_size"})
    grpo = CampaignConfig.from_mapping(tiny(finetune={"method": "grpo"}))
    assert grpo.identity()["finetune"]["method"] == "grpo" and grpo.identity_hash() != defaults.identity_hash()
    assert grpo.finetune.grpo_settings(0).groups == 64 // 8
    with pytest.raises(ValueError, match="finetune.method must be weighted or grpo"):
        CampaignConfig.from_mapping(tiny(finetune={"method": "ppo"}))
    with pytest.raises(ValueError, match="multiple of finetune.group_size"):
        CampaignConfig.from_mapping(tiny(finetune={"method": "grpo", "batch": 10, "group_size": 4}))
    for modality in ("molecules", "backbones"):  # continuous models fine-tune too
        CampaignConfig.from_mapping({"modality": modality, "rewards": [{"name": "r", "spec": "qed" if modality ==
                                     "molecules" else "rg"}], "finetune": {}})


@pytest.mark.parametrize("modality, values", [
    ("molecules", {"n_per_round": 4, "sampler": {"steps": 4}, "rewards": [{"name": "qed", "spec": "qed"}]}),
    ("backbones", {"n_per_round": 4, "length": 40, "sampler": {"steps": 4},
                   "rewards": [{"name": "compact", "spec": "quadratic:c=0,tau=10"}]}),
])
def test_continuous_campaigns_fine_tune_between_rounds(tmp_path, modality, values):
    from molgen.finetune import lora_state

    cfg = CampaignConfig.from_mapping({"modality": modality, "rounds": 3, "selection": {"k": 2},
                                       "finetune": {"steps": 3, "batch": 4}, **values})
    c = Campaign(cfg, tmp_path / "c").run()
    folder = tmp_path / "c" / "finetune"
    cards = {r: json.loads((folder / f"round-00{r}.json").read_text())["provenance"] for r in (2, 3)}
    assert [p["data_size"] for p in cards.values()] == [4, 8]  # every design scored before the round
    calls = c.rounds_frame().set_index("round")["model_calls"]
    for r, prov in cards.items():
        assert prov["steps"] + len(prov["rolled_back"]) == 3 and prov["model_calls"] == 3 * 4 * 6
        assert math.isfinite(prov["nelbo"]) and prov["kl"] >= 0 and calls[r] > prov["model_calls"]
    adapter, _ = c.finetuned(3)
    assert any(float(v.abs().max()) > 0 for k, v in lora_state(adapter).items() if k.endswith("lora_b"))
    assert len(c.samples_frame()) == 12


@pytest.mark.parametrize("modality, values", [
    ("rna", {}),
    ("molecules", {"modality": "molecules", "length": None, "n_per_round": 4, "sampler": {"steps": 4},
                   "rewards": [{"name": "qed", "spec": "qed"}], "refine": {"fraction": 0.0},
                   "selection": {"k": 2}}),
])
def test_grpo_rounds_learn_on_policy_and_count_their_reward_calls(tmp_path, modality, values):
    ft = {"method": "grpo", "iterations": 2, "batch": 8, "group_size": 4, "rank": 2, "lr": 0.01, "kl_bound": 5.0}
    c = Campaign(CampaignConfig.from_mapping(tiny(rounds=2, finetune=ft, **values)), tmp_path / "c").run()
    card = json.loads((tmp_path / "c" / "finetune" / "round-002.json").read_text())
    prov, settings = card["provenance"], card["config"]["settings"]
    assert prov["data_size"] == 2 * 8 and len(prov["reward_means"]) == 2  # fresh samples, each scored once
    assert prov["steps"] + len(prov["rolled_back"]) == 2 * 2  # iterations x epochs
    assert settings["groups"] == 2 and settings["group_size"] == 4 and prov["model_calls"] > 0
    calls = c.rounds_frame().set_index("round")["model_calls"]
    assert calls[2] > prov["model_calls"] and len(c.samples_frame()) == 2 * c.config.n_per_round


def test_finetuned_rounds_count_their_calls_and_resume_with_the_same_weights(tmp_path, monkeypatch, uninterrupted):
    cfg = CampaignConfig.from_mapping(tiny(finetune=FINETUNE))
    full = Campaign(cfg, tmp_path / "full").run()
    folder = tmp_path / "full" / "finetune"
    assert sorted(p.name for p in folder.iterdir()) == [f"round-00{r}.{e}" for r in (2, 3) for e in ("json", "pt")]
    cards = {r: json.loads((folder / f"round-00{r}.json").read_text())["provenance"] for r in (2, 3)}
    assert [c["data_size"] for c in cards.values()] == [6, 12]  # every design scored before the round
    for prov in cards.values():
        assert prov["base_sha256"] == full.info()["checkpoint_sha256"]
        assert prov["steps"] + len(prov["rolled_back"]) == 3 and prov["model_calls"] == 3 * 6 * 6
    calls = full.rounds_frame().set_index("round")["model_calls"]
    plain_calls = uninterrupted.rounds_frame().set_index("round")["model_calls"]
    assert calls[1] == plain_calls[1] and calls[2] == plain_calls[2] + cards[2]["model_calls"]
    s_full, s_plain = full.samples_frame(), uninterrupted.samples_frame()
    assert s_full[s_full["round"] == 1]["sequence"].tolist() == s_plain[s_plain["round"] == 1]["sequence"].tolist()
    assert s_full[s_full["round"] == 2]["sequence"].tolist() != s_plain[s_plain["round"] == 2]["sequence"].tolist()

    crashed = Campaign(cfg, tmp_path / "crash")
    crash_in_round_2(crashed, monkeypatch)
    assert (tmp_path / "crash" / "finetune" / "round-002.pt").is_file()  # saved before the round generated

    import molgen.finetune

    fresh = molgen.finetune.finetune

    def only_round_3(base, process, tokens, *args, **kwargs):
        assert len(tokens) == 12, "round 2's saved adapter should be read back, not trained again"
        return fresh(base, process, tokens, *args, **kwargs)

    monkeypatch.setattr(molgen.finetune, "finetune", only_round_3)
    resumed = Campaign(cfg, tmp_path / "crash").run()
    for a, b in zip(frames(resumed), frames(full)):
        pd.testing.assert_frame_equal(a, b)
    Campaign(cfg, tmp_path / "crash", overwrite=True)  # a fresh start drops the adapters too
    assert not (tmp_path / "crash" / "finetune").exists()


def test_unusable_databases_are_named_without_their_password():
    from molgen.campaign.store import DatabaseUnavailable, Store
    from molgen.errors import EXIT_DEPENDENCY, EXIT_OS, exit_code

    with pytest.raises(DatabaseUnavailable, match=r"nosuchdialect://u:\*\*\*@host/db") as bad:
        Store("nosuchdialect://u:secret@host/db")
    assert "secret" not in str(bad.value) and exit_code(bad.value) == EXIT_OS
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed: the missing-driver case cannot be shown")
    with pytest.raises(ModuleNotFoundError, match=r"postgresql://u:\*\*\*@127.0.0.1:1/db needs its Python driver") as e:
        Store("postgresql://u:secret@127.0.0.1:1/db")  # no driver installed here
    assert exit_code(e.value) == EXIT_DEPENDENCY
