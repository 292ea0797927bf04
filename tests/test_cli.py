"""The one error path of the ``molgen`` command: one line and a documented exit code, a traceback on --debug."""

from __future__ import annotations

import errno

import pytest

from molgen import cli
from molgen.errors import EXIT_DEPENDENCY, EXIT_INPUT, EXIT_OS, InputError, MissingDependency, exit_code


def test_input_error_names_file_record_and_position():
    err = InputError("'X' is not a DNA letter", file="d.fasta", record="3 (seq_7)", position=12)
    assert str(err) == "d.fasta: record 3 (seq_7): position 12: 'X' is not a DNA letter"
    assert isinstance(err, ValueError) and str(InputError("empty")) == "empty"


@pytest.mark.parametrize("err, code", [
    (InputError("bad"), EXIT_INPUT), (ValueError("bad"), EXIT_INPUT), (FileNotFoundError("x"), EXIT_INPUT),
    (OSError(errno.ENOSPC, "No space left on device"), EXIT_OS), (PermissionError("read-only"), EXIT_OS),
    (MissingDependency("pydssp", "dssp", "DSSP"), EXIT_DEPENDENCY), (RuntimeError("bug"), None),
])
def test_exit_codes(err, code):
    assert exit_code(err) == code


def test_main_prints_one_line_and_debug_raises(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(errno.ENOSPC, "No space left on device")

    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv):
        args = real(argv)
        args.run = full_disk
        return args

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", parse)
    assert cli.main(["report", "somewhere"]) == EXIT_OS
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "molgen report: error:" in err and "No space left" in err
    with pytest.raises(OSError, match="No space left"):
        cli.main(["--debug", "report", "somewhere"])


def test_guide_takes_the_target_length_and_refuses_another(tmp_path, capsys):
    from molgen.sequences.io import read_sequences

    target = "((((....))))"
    out = tmp_path / "g.fasta"
    base = ["guide", "rna", "--reward", f"rna_target:{target}", "--n", "2", "--steps", "2", "--candidates", "1"]
    assert cli.main([*base, "--length", "20", "--out", str(out)]) == EXIT_INPUT
    assert "--length 20, but reward 'rna_target' scores only samples of length 12" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main([*base, "--out", str(out)]) == 0
    assert {len(r.seq) for r in read_sequences(out)} == {len(target)}


def test_tune_molecules_writes_a_plan_that_sampling_uses_and_another_model_refuses(tmp_path, capsys):
    import json

    plan = tmp_path / "plan.json"
    assert cli.main(["tune", "molecules", "--nfe", "4", "--batch", "8", "--seconds", "2", "--out", str(plan)]) == 0
    fitted = json.loads(plan.read_text())
    assert fitted["nfe"] == 4 and len(fitted["times"]) >= 2 and fitted["fitted_on"]["state"][0] is None
    out = tmp_path / "mols.sdf"
    assert cli.main(["sample", "molecules", "--n", "3", "--plan", str(plan), "--out", str(out)]) == 0
    assert out.read_text().count("$$$$") == 3
    assert json.loads((tmp_path / "mols.sdf.json").read_text())["plan"]["file"] == str(plan)
    fitted["fitted_on"]["model"] = "0123456789abcdef"
    plan.write_text(json.dumps(fitted))
    capsys.readouterr()
    assert cli.main(["sample", "molecules", "--n", "3", "--plan", str(plan), "--out", str(out)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "fitted on something else (model" in err and str(plan) in err


def test_tune_backbones_fits_one_length_and_sampling_follows_it(tmp_path, capsys):
    import json

    plan = tmp_path / "plan.json"
    assert cli.main(["tune", "backbones", "--nfe", "4", "--length", "40", "--batch", "4", "--seconds", "2",
                     "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["fitted_on"]["warm_start"] is True
    out = tmp_path / "bb"
    assert cli.main(["sample", "backbones", "--n", "2", "--length", "40", "--plan", str(plan), "--out", str(out)]) == 0
    assert json.loads((out / "sampling.json").read_text())["plan"]["nfe"] == 4
    capsys.readouterr()
    assert cli.main(["sample", "backbones", "--n", "2", "--length", "48", "--plan", str(plan),
                     "--out", str(tmp_path / "other")]) == EXIT_INPUT
    assert "state: fitted on [40, 3]" in capsys.readouterr().err


def test_tune_rna_fits_the_unmasking_grid_and_sampling_uses_it(tmp_path, capsys):
    import json

    plan = tmp_path / "plan.json"
    assert cli.main(["tune", "rna", "--nfe", "3", "--length", "20", "--batch", "8", "--seconds", "1",
                     "--out", str(plan)]) == 0
    fitted = json.loads(plan.read_text())
    assert fitted["fitted_on"]["family"] == "masked" and len(fitted["times"]) == 4
    out = tmp_path / "rna.fasta"
    assert cli.main(["sample", "rna", "--n", "2", "--plan", str(plan), "--out", str(out)]) == 0
    assert json.loads((tmp_path / "rna.fasta.json").read_text())["plan"]["times"] == fitted["times"]
    capsys.readouterr()
    assert cli.main(["sample", "dna", "--n", "2", "--plan", str(plan), "--out", str(out)]) == EXIT_INPUT
    assert "fitted on something else (model" in capsys.readouterr().err
    assert cli.main(["sample", "molecules", "--n", "2", "--plan", str(plan), "--out", str(tmp_path / "m.sdf")]) \
        == EXIT_INPUT
    assert "a plan for masked models, not for this continuous one" in capsys.readouterr().err
