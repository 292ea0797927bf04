"""Hostile input and faults, case by case, through the ``molgen`` command as a user meets them.

    python benchmarks/reliability.py --json reliability.json [--fuzz-examples 2000]

Each case runs the real command (``python -m molgen.cli``) in a scratch folder and checks its outcome: the exit
code (0 done, 2 bad input, 3 a path the system refuses, 4 a missing extra), that stderr is one line and not a
traceback, what was written and what was not. ``--fuzz-examples N`` then runs the readers' and parsers' fuzz
tests (``tests/test_readers.py``) with N examples each; any exception other than the documented input errors
fails them. Rows: ``{"case", "expected", "outcome", "ok"}``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TS50 = sorted((ROOT / "data" / "structure" / "ts50").glob("*.pdb.gz"))
CASES: list[tuple[str, str, Callable[[Path], tuple[str, bool]]]] = []
TINY_CAMPAIGN = "modality: rna\nrounds: 1\nn_per_round: 2\nlength: 12\nrewards: [{name: g, spec: gc}]\n"


def case(name: str, expected: str):
    def register(fn: Callable[[Path], tuple[str, bool]]) -> Callable[[Path], tuple[str, bool]]:
        CASES.append((name, expected, fn))
        return fn

    return register


def molgen(*args: str, cwd: Path, env: dict[str, str] | None = None, python: str = "") -> subprocess.CompletedProcess:
    """``python -m molgen.cli ARGS`` (or ``python -c PYTHON`` then the CLI) with one thread; stdout and stderr kept."""
    command = [sys.executable, "-c", python + "\nimport sys\nfrom molgen.cli import main\nsys.exit(main(sys.argv[1:]))",
               *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})})


def one_line(run: subprocess.CompletedProcess) -> bool:
    """stderr holds one error line and no traceback (warnings of libraries aside)."""
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("molgen ")]
    return len(errors) == 1 and "Traceback" not in run.stderr


def said(run: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("molgen ")] or run.stderr.splitlines()[-1:]
    return f"exit {run.returncode}: {lines[0] if lines else '(nothing on stderr)'}"


# ------------------------------------------------------------------------------------------------ checkpoints
@case("planted checkpoint", "refused as a named error; its code never runs")
def planted(tmp: Path) -> tuple[str, bool]:
    code = ("import torch, os\nclass P:\n    def __reduce__(self):\n        return (os.system, ('touch ran',))\n"
            "torch.save({'w': P()}, 'planted.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp, check=True)
    shutil.copyfile(ROOT / "data" / "structure" / "backbone_egnn.json", tmp / "planted.json")
    run = molgen("sample", "backbones", "--n", "1", "--checkpoint", "planted.pt", "--out", "out", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and not (tmp / "ran").exists()


@case("checkpoint of another architecture", "a named error listing the keys")
def other_architecture(tmp: Path) -> tuple[str, bool]:
    shutil.copyfile(ROOT / "data" / "sequences" / "rna_default.pt", tmp / "x.pt")
    shutil.copyfile(ROOT / "data" / "structure" / "backbone_egnn.json", tmp / "x.json")
    run = molgen("sample", "backbones", "--n", "1", "--checkpoint", "x.pt", "--out", "out", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and "another architecture" in run.stderr


# ------------------------------------------------------------------------------------------------ rewards
@case("rna_target without --length", "the target's length is used; every design is scored")
def target_length(tmp: Path) -> tuple[str, bool]:
    run = molgen("guide", "rna", "--reward", "rna_target:((((....))))", "--n", "4", "--steps", "4", "--candidates",
                 "2", "--out", "g.fasta", "--json", "s.json", cwd=tmp)
    stats = json.loads((tmp / "s.json").read_text())["reward_stats"] if run.returncode == 0 else {}
    return (f"exit {run.returncode}, {stats.get('failures')} failures of {stats.get('samples')}",
            run.returncode == 0 and stats.get("failures") == 0)


@case("rna_target with another --length", "refused before sampling")
def target_mismatch(tmp: Path) -> tuple[str, bool]:
    run = molgen("guide", "rna", "--reward", "rna_target:((((....))))", "--length", "20", "--out", "g.fasta",
                 cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and not (tmp / "g.fasta").exists()


@case("a reward that fails for every sample", "the run stops with a named error")
def failing_reward(tmp: Path) -> tuple[str, bool]:
    run = molgen("guide", "dna", "--reward", "gc:target=nan", "--length", "12", "--n", "3", "--steps", "2",
                 "--out", "g.fasta", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and "failed" in run.stderr


# ------------------------------------------------------------------------------------------------ readers
@case("PDB folder: truncated file, MSE and UNK residues, HETATM", "the rest evaluated, the bad file skipped")
def pdb_folder(tmp: Path) -> tuple[str, bool]:
    folder = tmp / "pdbs"
    folder.mkdir()
    lines = gzip.decompress(TS50[0].read_bytes()).decode().splitlines()
    atoms = [ln for ln in lines if ln.startswith("ATOM")]
    first = atoms[0][22:26]
    modified = [("HETATM" + ln[6:17] + "MSE" + ln[20:]) if ln[22:26] == first else ln for ln in atoms]
    (folder / "modified.pdb").write_text("\n".join(modified) + "\nEND\n")
    (folder / "unknown.pdb").write_text("\n".join(ln[:17] + "UNK" + ln[20:] for ln in atoms) + "\nEND\n")
    (folder / "truncated.pdb.gz").write_bytes(TS50[1].read_bytes()[:200])
    shutil.copyfile(TS50[2], folder / "UPPER.PDB.GZ")
    run = molgen("evaluate", "backbones", "pdbs", "--no-tm", "--no-mpnn", "--json", "m.json", cwd=tmp)
    out = json.loads((tmp / "m.json").read_text()) if run.returncode == 0 else {}
    skipped = [Path(s["file"]).name for s in out.get("skipped", [])]
    return (f"exit {run.returncode}, {out.get('n')} evaluated, skipped {skipped}",
            run.returncode == 0 and out.get("n") == 3 and skipped == ["truncated.pdb.gz"])


@case("FASTA with an N, an empty record and a non-UTF-8 byte", "the rest evaluated, each bad record named")
def fasta(tmp: Path) -> tuple[str, bool]:
    (tmp / "s.fasta").write_bytes(b">ok1\nACGUACGUACGUAGCUAGCU\n>bad_letter\nACGUNACGU\n>empty\n\n"
                                  b">bad_byte\nACG\xffU\n>ok2\nGGGGAAAACCCCUUUUAAGG\n")
    run = molgen("evaluate", "rna", "s.fasta", "--no-nll", "--json", "e.json", cwd=tmp)
    out = json.loads((tmp / "e.json").read_text()) if run.returncode == 0 else {}
    return (f"exit {run.returncode}, {out.get('n')} evaluated, {len(out.get('skipped', []))} skipped",
            run.returncode == 0 and out.get("n") == 2 and len(out.get("skipped", [])) == 3)


@case("empty FASTA", "a named error, not a library message")
def empty_fasta(tmp: Path) -> tuple[str, bool]:
    (tmp / "e.fasta").write_text("")
    run = molgen("evaluate", "rna", "e.fasta", "--no-nll", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and "e.fasta" in run.stderr


@case("XYZ with a bad count line", "that record skipped and named; the next one read")
def xyz(tmp: Path) -> tuple[str, bool]:
    good = "3\nwater\nO 0.0 0.0 0.0\nH 0.96 0.0 0.0\nH -0.24 0.93 0.0\n"
    (tmp / "m.xyz").write_text(good + "three\nbroken\nO 0 0 0\nH 1 0 0\nH 0 1 0\n" + good)
    run = molgen("evaluate", "molecules", "m.xyz", "--reference", "none", "--json", "x.json", cwd=tmp)
    out = json.loads((tmp / "x.json").read_text()) if run.returncode == 0 else {}
    reasons = [str(s.get("record")) for s in out.get("skipped", [])]
    ok = out.get("n") == 2 and len(reasons) == 1
    return f"exit {run.returncode}, {out.get('n')} read, skipped records {reasons}", ok


@case("SDF with bonds, charges and aromatic flags; an SDF without hydrogens",
      "judged by the file's own bonds too; missing hydrogens warned")
def sdf(tmp: Path) -> tuple[str, bool]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    with Chem.SDWriter(str(tmp / "m.sdf")) as w:
        for smi in ("c1ccccc1", "[NH4+]", "CC(=O)[O-]"):
            mol = Chem.AddHs(Chem.MolFromSmiles(smi))
            AllChem.EmbedMolecule(mol, randomSeed=0)
            AllChem.MMFFOptimizeMolecule(mol)
            w.write(mol)
    with Chem.SDWriter(str(tmp / "noh.sdf")) as w:
        mol = Chem.MolFromSmiles("CCO")
        AllChem.EmbedMolecule(mol, randomSeed=0)
        w.write(mol)
    run = molgen("evaluate", "molecules", "m.sdf", "--reference", "none", "--json", "a.json", cwd=tmp)
    bonds = json.loads((tmp / "a.json").read_text()).get("file_bonds", {}) if run.returncode == 0 else {}
    warn = molgen("evaluate", "molecules", "noh.sdf", "--reference", "none", "--json", "b.json", cwd=tmp)
    warnings = json.loads((tmp / "b.json").read_text()).get("warnings", []) if warn.returncode == 0 else []
    ok = bonds.get("validity") == 1.0 and bonds.get("mol_stability") == 1.0 and bool(warnings)
    return f"file bonds {bonds}; without hydrogens: {len(warnings)} warning(s)", ok


# ------------------------------------------------------------------------------------------------ system faults
@case("full disk", "one line, exit 3; finished work kept")
def full_disk(tmp: Path) -> tuple[str, bool]:
    run = molgen("sample", "rna", "--n", "2", "--out", "/dev/full", cwd=tmp)
    return said(run), run.returncode == 3 and one_line(run)


@case("a folder the system refuses", "one line naming the path, exit 3")
def refused(tmp: Path) -> tuple[str, bool]:
    run = molgen("sample", "rna", "--n", "2", "--out", "/sys/molgen.fasta", cwd=tmp)
    return said(run), run.returncode == 3 and one_line(run) and "/sys/molgen.fasta" in run.stderr


@case("missing optional extra (pydssp)", "one line naming the extra, exit 4")
def missing_extra(tmp: Path) -> tuple[str, bool]:
    (tmp / "b").mkdir()
    shutil.copyfile(TS50[0], tmp / "b" / TS50[0].name)
    run = molgen("evaluate", "backbones", "b", "--no-tm", "--no-mpnn", cwd=tmp,
                 python="import sys\nsys.modules['pydssp'] = None")
    return said(run), run.returncode == 4 and one_line(run) and "molgen[dssp]" in run.stderr


@case("unusable campaign database", "one line, password masked, exit 3")
def database(tmp: Path) -> tuple[str, bool]:
    (tmp / "c.yaml").write_text(TINY_CAMPAIGN + "database: sqlite:////nonexistent/folder/c.sqlite\n")
    run = molgen("campaign", "run", "c.yaml", "--dir", "c", cwd=tmp)
    return said(run), run.returncode == 3 and one_line(run)


@case("wrong type in a generate --config file", "the file and key named, exit 2, nothing created")
def wrong_type(tmp: Path) -> tuple[str, bool]:
    (tmp / "j.yaml").write_text("modality: rna\nn: ten\n")
    run = molgen("generate", "--config", "j.yaml", "--out", "job", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and "j.yaml" in run.stderr and not (tmp / "job").exists()


# ------------------------------------------------------------------------------------------------ jobs
@case("a bad solver", "refused before any folder is made; the corrected run is not refused")
def bad_solver(tmp: Path) -> tuple[str, bool]:
    run = molgen("generate", "--modality", "rna", "--n", "2", "--solver", "nope", "--out", "job", cwd=tmp)
    again = molgen("generate", "--modality", "rna", "--n", "2", "--steps", "2", "--length", "8", "--out", "job",
                   cwd=tmp)
    return said(run), run.returncode == 2 and not again.returncode and one_line(run)


@case("a deleted or emptied shard, and a finished job re-run",
      "the damaged shard redone; the finished job writes nothing")
def damaged_shard(tmp: Path) -> tuple[str, bool]:
    args = ("generate", "--modality", "rna", "--n", "4", "--shard-size", "2", "--steps", "2", "--length", "8",
            "--out", "job")
    molgen(*args, cwd=tmp)
    first = (tmp / "job" / "shard-00001.fasta").read_text()
    (tmp / "job" / "shard-00001.fasta").write_text("")
    molgen(*args, cwd=tmp)
    redone = (tmp / "job" / "shard-00001.fasta").read_text() == first
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "job").rglob("*") if p.is_file() and p.name != ".lock"}
    molgen(*args, cwd=tmp)
    quiet = stamps == {p: p.stat().st_mtime_ns for p in (tmp / "job").rglob("*") if p.is_file() and p.name != ".lock"}
    return f"redone identical: {redone}; finished re-run wrote nothing: {quiet}", redone and quiet


@case("a second process on a busy campaign folder", "a clear 'in use' error")
def busy(tmp: Path) -> tuple[str, bool]:
    from molgen.locks import FolderLock

    (tmp / "c.yaml").write_text(TINY_CAMPAIGN)
    (tmp / "c").mkdir()
    with FolderLock(tmp / "c"):
        run = molgen("campaign", "run", "c.yaml", "--dir", "c", cwd=tmp)
    return said(run), run.returncode == 2 and one_line(run) and "in use" in run.stderr


@case("campaign status and report of a finished campaign", "read-only: nothing in the folder changes")
def read_only(tmp: Path) -> tuple[str, bool]:
    (tmp / "c.yaml").write_text(TINY_CAMPAIGN + "database: postgresql://user:PASSWORD@localhost:1/db\n")
    (tmp / "d.yaml").write_text(TINY_CAMPAIGN)
    molgen("campaign", "run", "d.yaml", "--dir", "c", "--no-report", cwd=tmp)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "c").rglob("*") if p.is_file()}
    status = molgen("campaign", "status", "c", cwd=tmp)
    report = molgen("report", "c", "--out", "elsewhere.html", cwd=tmp)
    same = stamps == {p: p.stat().st_mtime_ns for p in (tmp / "c").rglob("*") if p.is_file()}
    from molgen.campaign import CampaignConfig

    masked = "PASSWORD" not in json.dumps(CampaignConfig.from_yaml(tmp / "c.yaml").to_dict())
    return (f"status exit {status.returncode}, report exit {report.returncode}, folder unchanged: {same}, "
            f"password masked in the stored config: {masked}", not status.returncode and not report.returncode
            and same and masked)


def fuzz(examples: int) -> dict:
    """The readers' and parsers' fuzz tests with ``examples`` examples each."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_readers.py",
                          "-k", "fuzz"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "MOLGEN_FUZZ_EXAMPLES": str(examples), "OMP_NUM_THREADS": "1"})
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-200:]
    return {"examples_per_test": examples, "passed": run.returncode == 0, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fuzz-examples", type=int, default=0, help="also fuzz every reader and parser (0: no)")
    args = parser.parse_args()
    rows = []
    for name, expected, fn in CASES:
        with tempfile.TemporaryDirectory(prefix="molgen_reliability_") as tmp:
            outcome, ok = fn(Path(tmp))
        rows.append({"case": name, "expected": expected, "outcome": outcome, "ok": bool(ok)})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {outcome}", flush=True)
    out = {"rows": rows, "fuzz": fuzz(args.fuzz_examples) if args.fuzz_examples else None}
    if out["fuzz"]:
        print(f"fuzz: {out['fuzz']['summary']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
