"""Every reader evaluates what it can and names the rest; fuzzed readers raise only ``InputError``.

Real files (written here from the TS50 chains and RDKit molecules) with the defects users meet: truncated
files, modified residues, empty and ambiguous FASTA records, bad XYZ count lines, charged and aromatic SDFs.
The fuzz budget is ``MOLGEN_FUZZ_EXAMPLES`` examples per reader (default 25: seconds in CI).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rdkit import Chem
from rdkit.Chem import AllChem

from molgen.errors import InputError, Skipped
from molgen.molecules.io import Molecule, read_sdf, read_xyz
from molgen.molecules.metrics import evaluate, file_bond_metrics
from molgen.sequences.alphabets import DNA
from molgen.sequences.evaluate import evaluate_fasta
from molgen.sequences.io import read_records, read_sequences, screen
from molgen.structure.data import TS50_DIR
from molgen.structure.io import backbone_from_ca, list_structure_files, read_backbone, read_backbones, write_backbone
from molgen.structure.metrics import backbone_metrics, ca_ca_stats
from molgen.structure.sampling import motif_residues, parse_contig

TS50 = list_structure_files(TS50_DIR)
FUZZ = settings(
    max_examples=int(os.environ.get("MOLGEN_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,  # nothing written into the tree; a failure prints its reproducing example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _atom_lines(path: Path) -> list[str]:
    return [ln for ln in gzip.decompress(path.read_bytes()).decode().splitlines() if ln.startswith("ATOM")]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def _resnum(line: str) -> int:
    return int(line[22:26])


# ------------------------------------------------------------------------------------------------ structures
def test_modified_residues_are_read_as_backbone(tmp_path: Path) -> None:
    bb = read_backbone(TS50[0])
    r5, r7 = bb.residue_numbers[5], bb.residue_numbers[7]
    lines = [
        "HETATM" + ln[6:17] + "MSE" + ln[20:] if _resnum(ln) == r5 else ln[:17] + "UNK" + ln[20:] if _resnum(ln) == r7
        else ln
        for ln in _atom_lines(TS50[0])
    ]
    got = read_backbone(_write(tmp_path / "modified.pdb", lines))
    assert got.sequence[5] == "M" and got.sequence[7] == "X" and not got.breaks
    np.testing.assert_allclose(got.coords, bb.coords)
    assert motif_residues(parse_contig(f"A{r5}-{r7}"), {"A": got}) == [[5, 6, 7]]
    cif = write_backbone(got, tmp_path / "modified.cif")  # unknown residues are written as UNK
    assert read_backbone(cif).sequence == got.sequence


def test_a_modified_residue_does_not_block_motif_scaffolding(tmp_path: Path) -> None:
    import torch

    from molgen.diffusion import get_schedule
    from molgen.structure.model import BackboneDenoiser, ModelConfig
    from molgen.structure.sampling import scaffold_from_file

    bb = read_backbone(TS50[0])
    r5 = bb.residue_numbers[5]
    lines = ["HETATM" + ln[6:17] + "MSE" + ln[20:] if _resnum(ln) == r5 else ln for ln in _atom_lines(TS50[0])]
    torch.manual_seed(0)
    model = BackboneDenoiser(ModelConfig(hidden=16, layers=2, rbf=8), get_schedule("edm", sigma_min=0.02,
                                                                                   sigma_max=80.0)).eval()
    out, res = scaffold_from_file(model, _write(tmp_path / "motif.pdb", lines), f"A{r5 - 2}-{r5 + 2},40", 1,
                                  solver="euler", steps=2)
    assert out[0].sequence[res.motif_positions[2]] == "M" and float(res.motif_rmsd[0]) >= 0


def test_reader_flagged_breaks_are_not_counted_as_bonds(tmp_path: Path) -> None:
    bb = read_backbone(TS50[0])
    r9 = bb.residue_numbers[9]
    cut = read_backbone(_write(tmp_path / "cut.pdb", [ln for ln in _atom_lines(TS50[0]) if _resnum(ln) != r9]))
    assert cut.gaps == [8] and len(cut.breaks) == 1
    d = np.linalg.norm(np.diff(bb.ca.astype(np.float64), axis=0), axis=-1)
    natural = float((np.abs(np.delete(d, [8, 9]) - 3.8) <= 0.1).mean())
    assert backbone_metrics(cut)["ca_ca_valid"] == pytest.approx(natural)
    assert ca_ca_stats(cut.ca.astype(np.float64))[0] < natural  # counting the break as a bond
    # a generated model's stretched bond between consecutive residues is flagged but still counted
    ca = bb.ca.astype(np.float64)[:30].copy()
    ca[15:] += 1.5 * (ca[15] - ca[14]) / np.linalg.norm(ca[15] - ca[14])
    generated = backbone_from_ca(ca)
    again = read_backbone(write_backbone(generated, tmp_path / "generated.pdb"))
    assert again.breaks and not again.gaps
    assert backbone_metrics(again)["ca_ca_valid"] == pytest.approx(backbone_metrics(generated)["ca_ca_valid"])


def test_structure_folder_evaluation_goes_on(tmp_path: Path, capsys) -> None:
    if find_spec("pydssp") is None:
        pytest.skip("needs molgen[dssp]")
    from molgen.cli import main

    folder = tmp_path / "designs"
    folder.mkdir()
    shutil.copy(TS50[0], folder / TS50[0].name)
    shutil.copy(TS50[1], folder / "X.PDB.GZ")
    lines = _atom_lines(TS50[2])
    r3 = _resnum([ln for ln in lines if ln[12:16] == " CA "][3])
    _write(folder / "noca.pdb", [ln for ln in lines if not (_resnum(ln) == r3 and ln[12:16] == " CA ")])
    _write(folder / "mse.pdb", ["HETATM" + ln[6:17] + "MSE" + ln[20:] if _resnum(ln) == r3 else ln for ln in lines])
    (folder / "truncated.pdb.gz").write_bytes(TS50[3].read_bytes()[:2000])
    _write(folder / "water.pdb", ["HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00  0.00           O"])
    (folder / "latin1.pdb").write_bytes(b"REMARK caf\xe9\n" + "\n".join(lines).encode())
    _write(folder / "bad.cif", ["data_x", "loop_", "_atom_site.id", "'open"])
    first3 = sorted({_resnum(ln) for ln in lines})[:3]
    _write(folder / "short.pdb", [ln for ln in lines if _resnum(ln) in first3])  # too short for the metrics
    report = tmp_path / "m.json"
    assert main(["evaluate", "backbones", str(folder), "--json", str(report), "--no-tm", "--no-mpnn"]) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 4 and 0 < result["ca_ca_valid"] <= 1
    reasons = {(Path(s["file"]).name, s["record"]): s["reason"] for s in result["skipped"]}
    assert "gzip" in reasons["truncated.pdb.gz", None]
    assert "no amino-acid residues" in reasons["water.pdb", None]
    assert "not UTF-8" in reasons["latin1.pdb", None] and "line 1" in reasons["latin1.pdb", None]
    assert "malformed mmCIF" in reasons["bad.cif", None]
    assert "3 residue(s); at least 6 are needed" in reasons["short.pdb", f"chain {lines[0][21]}"]
    assert "no CA atom" in next(r for (f, rec), r in reasons.items() if f == "noca.pdb" and rec)
    assert "evaluated 4 backbones; skipped 6" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ sequences
def test_fasta_records_are_evaluated_and_the_rest_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = ["".join(rng.choice(list("ACGT"), 150)) for _ in range(4)]
    path = tmp_path / "designs.fa"
    path.write_bytes(
        b"ACGT\n"  # text before the first header
        + b"".join(f">ok{i}\n{s}\n".encode() for i, s in enumerate(good[:2]))
        + b">ambiguous\nACGTNACGT\n>empty\n>latin1 caf\xe9\nACGT\n"
        + b">long\n" + b"ACGT" * 2500 + b"\n"
        + b"".join(f">ok{i}\n{s}\n".encode() for i, s in enumerate(good[2:], start=2))
    )
    result = evaluate_fasta(path, "dna")
    assert result["n"] == 5 and result["model_bits_per_token_n"] == 4
    assert "1 sequence(s) longer than the model's 200 nt" in result["model_bits_per_token_note"]
    assert np.isfinite(result["model_bits_per_token"])
    skipped = {s["record"]: s["reason"] for s in result["skipped"]}
    assert "text before the first '>'" in skipped[None] and "line 1" in skipped[None]
    assert skipped["3 (ambiguous)"] == "position 5: character 'N' is not in the DNA alphabet 'ACGT'"
    assert skipped["4 (empty)"] == "empty sequence"
    assert "byte 0xe9" in skipped["5 (latin1 caf\ufffd)"] and "line 9" in skipped["5 (latin1 caf\ufffd)"]
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.fa: no sequences to evaluate"):
        evaluate_fasta(empty, "dna", nll=False)
    with pytest.raises(InputError, match=r"headed.fa: record 4 \(latin1 .*\): position line 7: byte 0xe9"):
        read_sequences(_strict_copy(path, tmp_path))


def _strict_copy(path: Path, tmp_path: Path) -> Path:
    """The FASTA without its leading text, so that the first error ``read_sequences`` meets is the bad byte."""
    out = tmp_path / "headed.fa"
    out.write_bytes(path.read_bytes().split(b"\n", 1)[1].replace(b"ACGTNACGT", b"ACGT").replace(b">empty\n", b""))
    return out


def test_sequence_cli_prints_the_skipped_count(tmp_path: Path, capsys) -> None:
    from molgen.cli import main

    path = tmp_path / "x.fa"
    path.write_text(">a\nACGTACGTACGT\n>b\nACGTNNNN\n")
    out = tmp_path / "e.json"
    assert main(["evaluate", "dna", str(path), "--no-nll", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"][0]["record"] == "2 (b)"
    assert "evaluated 1 sequences; skipped 1" in capsys.readouterr().err
    (tmp_path / "none.fa").write_text(">b\nNNNN\n")
    assert main(["evaluate", "dna", str(tmp_path / "none.fa"), "--no-nll"]) == 2


# ------------------------------------------------------------------------------------------------ molecules
WATER = "3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"


def test_xyz_bad_count_lines_are_skipped_and_blame_their_own_record(tmp_path: Path) -> None:
    path = tmp_path / "mixed.xyz"
    path.write_text(
        WATER
        + "three\nbad count\nO 0 0 0\n"
        + "5\nshort\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"
        + WATER
        + "2\nlong\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"
        + WATER
    )
    mols, skipped = read_xyz(path)
    assert [m.name for m in mols] == ["water"] * 3
    assert [s.record for s in skipped] == [2, "3 (short)", "5 (long)"]
    assert "expected an atom count, got 'three'" in skipped[0].reason
    assert "says 5 atoms but 3 atom lines follow" in skipped[1].reason
    assert "says 2 atoms but more atom lines follow" in skipped[2].reason
    assert str(skipped[1]) == "mixed.xyz: record 3 (short): position line 9: the count line says 5 atoms but 3 atom " \
                              "lines follow"
    with pytest.raises(InputError, match="mixed.xyz: record 2: position line 6"):
        read_xyz(path, strict=True)


def _sdf(path: Path, smiles: list[str], hydrogens: bool = True, kekulize: bool = False) -> Path:
    """MMFF-optimised molecules as SDF records (aromatic bond flags kept unless ``kekulize``)."""
    with Chem.SDWriter(str(path)) as writer:
        writer.SetKekulize(kekulize)
        for smi in smiles:
            mol = Chem.AddHs(Chem.MolFromSmiles(smi))
            AllChem.EmbedMolecule(mol, randomSeed=0)
            AllChem.MMFFOptimizeMolecule(mol)
            mol.SetProp("_Name", smi)
            writer.write(mol if hydrogens else Chem.RemoveHs(mol))
    return path


def test_file_bonds_charges_and_aromaticity_are_evaluated(tmp_path: Path) -> None:
    mols, skipped = read_sdf(_sdf(tmp_path / "ions.sdf", ["c1ccccc1", "[NH4+]", "CC(=O)[O-]"]))
    assert not skipped and all(m.bonded is not None for m in mols)
    by_file = file_bond_metrics([m.bonded for m in mols])
    assert (by_file.validity, by_file.mol_stability, by_file.atom_stability, by_file.implicit_h) == (1, 1, 1, 0)
    edm = evaluate([(m.symbols, m.positions) for m in mols])
    assert edm.mol_stability < 1  # distance-inferred bonds cannot see the charges or the aromatic ring
    radical = Chem.MolFromSmiles("[CH3]")  # an unpaired electron is not stable
    assert file_bond_metrics([Chem.AddHs(radical)]).mol_stability == 0
    kekule, _ = read_sdf(_sdf(tmp_path / "kekule.sdf", ["c1ccccc1"], kekulize=True))
    assert file_bond_metrics([kekule[0].bonded]).mol_stability == 1


def test_molecule_cli_reports_both_metrics_and_warns_on_missing_hydrogens(tmp_path: Path, capsys) -> None:
    from molgen.cli import main

    path = _sdf(tmp_path / "ions.sdf", ["c1ccccc1", "[NH4+]", "CC(=O)[O-]"])
    out = tmp_path / "m.json"
    assert main(["evaluate", "molecules", str(path), "--reference", "none", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    mols, _ = read_sdf(path)
    assert {k: result[k] for k in edm_keys()} == {k: v for k, v in evaluate(
        [(m.symbols, m.positions) for m in mols]).as_dict().items() if k in edm_keys()}
    assert result["metric"].startswith("EDM") and result["file_bonds"]["mol_stability"] == 1
    assert result["warnings"] == [] and "EDM metrics" in capsys.readouterr().out
    bare = _sdf(tmp_path / "bare.sdf", ["c1ccccc1", "CC(=O)O"], hydrogens=False)
    assert main(["evaluate", "molecules", str(bare), "--reference", "none", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mol_stability"] == 0 and result["file_bonds"]["implicit_h"] == 2 and len(result["warnings"]) == 2
    assert "warning: no molecule has hydrogen atoms" in capsys.readouterr().err


def edm_keys() -> tuple[str, ...]:
    return ("n", "atom_stability", "mol_stability", "validity", "uniqueness", "novelty")


def test_skipped_reads_like_the_error_it_came_from() -> None:
    err = InputError("bad", "a.fa", "3 (x)", 12)
    assert str(Skipped.of(err)) == str(err) == "a.fa: record 3 (x): position 12: bad"
    assert Skipped.of(err).as_dict() == {"file": "a.fa", "record": "3 (x)", "reason": "position 12: bad"}


# ------------------------------------------------------------------------------------------------ fuzz
def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` cut short, with lines dropped or repeated and a few byte ranges replaced; or arbitrary bytes."""
    text = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\n\t-.0123456789"),
                   max_size=12).map(str.encode)
    edits = st.lists(st.tuples(st.integers(0, len(valid)), st.integers(0, 12), text | st.binary(max_size=12)),
                     max_size=6)
    n_lines = valid.count(b"\n") + 1
    lines = st.lists(st.tuples(st.integers(0, n_lines), st.integers(0, 2)), max_size=4)

    def apply(plan: tuple[int, list[tuple[int, int]], list[tuple[int, int, bytes]]]) -> bytes:
        cut, line_ops, changes = plan
        rows = valid.split(b"\n")
        for k, times in line_ops:  # 0: drop line k; 1, 2: repeat it
            rows[k:k + 1] = rows[k:k + 1] * times
        out = bytearray(b"\n".join(rows))
        out = out[: max(cut, len(out) // 2)] if cut % 3 == 0 else out
        for pos, n, new in changes:
            out[pos : pos + n] = new
        return bytes(out)

    return st.one_of(st.binary(max_size=400), st.tuples(st.integers(0, len(valid)), lines, edits).map(apply))


def _valid_files(tmp: Path) -> dict[str, bytes]:
    bb = read_backbone(TS50[0])
    short = backbone_from_ca(bb.ca[:8], bb.sequence[:8])
    pdb, cif = write_backbone(short, tmp / "v.pdb").read_bytes(), write_backbone(short, tmp / "v.cif").read_bytes()
    water = Molecule(("O", "H", "H"), np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.1]]), "w")
    from molgen.molecules.io import write_sdf

    sdf = write_sdf(tmp / "v.sdf", [water, water]).read_bytes()
    return {".pdb": pdb, ".cif": cif, ".sdf": sdf, ".xyz": (WATER * 2).encode(), ".fa": b">a\nACGT\n>b\nGGCC\n"}


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_files(fuzz_dir: Path) -> dict[str, bytes]:
    return _valid_files(fuzz_dir)


def _fuzz_path(fuzz_dir: Path, suffix: str, data: bytes, gz: bool) -> Path:
    path = fuzz_dir / f"input{suffix}{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
@FUZZ
@given(data=st.data())
def test_fuzz_structure_readers(fuzz_dir: Path, valid_files: dict[str, bytes], suffix: str, data) -> None:
    raw = data.draw(_mutated(valid_files[suffix]))
    path = _fuzz_path(fuzz_dir, suffix, raw, data.draw(st.booleans()))
    try:
        bb = read_backbone(path)
        ca_ca_stats(bb.ca, bb.gaps)
    except InputError:
        pass
    backbones, skipped = read_backbones([path])
    assert len(backbones) + any(s.record is None or "chain" in str(s.record) for s in skipped) == 1
    if backbones and find_spec("pydssp") is not None:
        backbone_metrics(backbones[0])  # what the reader returns, the metrics take


@FUZZ
@given(data=st.data())
def test_fuzz_sequence_readers(fuzz_dir: Path, valid_files: dict[str, bytes], data) -> None:
    raw = data.draw(_mutated(valid_files[".fa"]))
    path = _fuzz_path(fuzz_dir, data.draw(st.sampled_from([".fa", ".txt"])), raw, data.draw(st.booleans()))
    try:
        records, skipped = read_records(path)
        screen(records, DNA, max_length=data.draw(st.integers(1, 8)), file=str(path))
        read_sequences(path)
    except InputError:
        pass


@pytest.mark.parametrize("suffix", [".sdf", ".xyz"])
@FUZZ
@given(data=st.data())
def test_fuzz_molecule_readers(fuzz_dir: Path, valid_files: dict[str, bytes], suffix: str, data) -> None:
    raw = data.draw(_mutated(valid_files[suffix]))
    path = _fuzz_path(fuzz_dir, suffix, raw, data.draw(st.booleans()))
    reader = read_sdf if suffix == ".sdf" else read_xyz
    try:
        mols, skipped = reader(path, max_atoms=data.draw(st.sampled_from([None, 2])))
        if mols:
            evaluate([(m.symbols, m.positions) for m in mols])
            bonded = [m.bonded for m in mols if m.bonded is not None]
            if bonded:
                file_bond_metrics(bonded)
        reader(path, strict=True)
    except InputError:
        pass


@FUZZ
@given(spec=st.text(alphabet="AB0123456789-,. ()x=" + "é", max_size=30))
def test_fuzz_spec_parsers(spec: str) -> None:
    from molgen.molecules.cli import parse_conditions
    from molgen.sequences.structure import parse_dot_bracket

    for parse in (parse_contig, parse_dot_bracket, lambda s: parse_conditions(s.split(","))):
        try:
            parse(spec)
        except ValueError:  # the documented error of the spec parsers (InputError is one)
            pass


REWARD_WORDS = ["qed", "sa", "logp", "validity", "gc", "rna_mfe", "rna_target", "jaspar", "helix", "rg", "linear",
                "quadratic", "nope", "+", "*", ":", ",", "=", "0.5", "-1", "nan", "inf", "((..))", "MA0099.3", " "]


@FUZZ
@given(words=st.lists(st.sampled_from(REWARD_WORDS), max_size=8))
def test_fuzz_reward_specs(words: list[str]) -> None:
    """Reward specs built from reward names, operators and arguments: a parsed reward or a ValueError."""
    from molgen.guidance.rewards import parse_reward

    try:
        parse_reward("".join(words))
    except ValueError:
        pass


CAMPAIGN_KEYS = ["name", "modality", "rounds", "n_per_round", "length", "seed", "rewards", "guidance", "sampler",
                 "selection", "refine", "database", "checkpoint", "finetune", "bogus"]
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["rna", "dna", "molecules", "backbones", "svdd", "top_k", "pareto", "gc", "rna_mfe"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(
        ["name", "spec", "weight", "method", "rule", "k", "steps", "solver", "fraction", "t", "x"]), inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(CAMPAIGN_KEYS), YAML_VALUES, max_size=8) | YAML_VALUES,
       raw=st.text(max_size=40))
def test_fuzz_campaign_yaml(fuzz_dir: Path, doc, raw: str) -> None:
    """Campaign YAML, as documents of the right keys with any values and as raw text: a config or a ValueError."""
    import yaml

    from molgen.campaign import CampaignConfig

    for i, text in enumerate((yaml.safe_dump(doc), raw)):
        path = fuzz_dir / f"campaign_{i}.yaml"
        path.write_text(text)
        try:
            CampaignConfig.from_yaml(path)
        except ValueError:
            pass


def test_sdf_records_with_blank_titles_are_read(tmp_path: Path) -> None:
    """RDKit writes unnamed molecules with a blank title line; every record keeps its header of three lines."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from molgen.molecules.io import read_sdf

    path = tmp_path / "unnamed.sdf"
    with Chem.SDWriter(str(path)) as writer:
        for smiles in ("CCO", "C1CC1", "N"):
            mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
            AllChem.EmbedMolecule(mol, randomSeed=0)
            writer.write(mol)
    mols, skipped = read_sdf(path)
    assert not skipped and [len(m.symbols) for m in mols] == [9, 9, 4]
