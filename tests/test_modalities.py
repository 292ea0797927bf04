"""The modality registry: one set of presets that every entry point reads, and one error for bad names."""

from __future__ import annotations

import inspect

import pytest

from molgen.cli import main
from molgen.diffusion import SOLVERS
from molgen.diffusion.discrete import DISCRETE_SAMPLERS
from molgen.diffusion.step_scale import applies
from molgen.modalities import Preset, get_modality, names


def test_registry_lists_the_modalities_and_their_presets():
    assert names() == ("molecules", "rna", "dna", "backbones", "sequences")
    for name in names():
        mod = get_modality(name)
        assert {"default", "guided"} <= set(mod.presets)
        known = DISCRETE_SAMPLERS if mod.extension == "fasta" else SOLVERS
        for key, preset in mod.presets.items():
            assert preset.name == key and preset.solver in known and preset.steps >= 1
        guided = mod.presets["guided"].solver
        assert mod.extension == "fasta" or not applies(guided), f"{name}: guidance needs a stochastic sampler"
        if name == "sequences":  # any alphabet: the user's own prior, nothing shipped
            with pytest.raises(ValueError, match="molgen train sequences --fasta"):
                mod.default_checkpoint()
        else:
            assert mod.default_checkpoint().exists()


def test_preset_override_and_record():
    p = Preset("p", "unipc", 10, {"grid": "karras"})
    assert p.override(steps=5) == Preset("p", "unipc", 5, {"grid": "karras"})
    assert p.override(solver="heun").solver == "heun" and p.override().steps == 10
    assert p.as_dict() == {"preset": "p", "solver": "unipc", "steps": 10, "grid": "karras"}
    with pytest.raises(ValueError, match="steps must be >= 1"):
        p.override(steps=0)


@pytest.mark.parametrize("call, match", [
    (lambda: get_modality("protein"),
     "unknown modality 'protein'; choose one of: molecules, rna, dna, backbones, sequences"),
    (lambda: get_modality("rna").preset("fast"), "unknown rna preset 'fast'; choose one of: default, guided"),
])
def test_bad_names_list_the_registered_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_entry_point_refuses_unknown_names(tmp_path, capsys):
    from molgen.campaign.config import CampaignConfig
    from molgen.generation import GenerationConfig
    from molgen.guidance.tasks import get_problem

    with pytest.raises(ValueError, match="choose one of: molecules, rna, dna, backbones, sequences"):
        GenerationConfig(modality="protein", n=1)
    with pytest.raises(ValueError, match="unknown backbones preset 'fast'"):
        GenerationConfig(modality="backbones", n=1, preset="fast")
    with pytest.raises(ValueError, match="unknown guidance method 'magic'"):
        GenerationConfig(modality="rna", n=1, reward="rna_mfe", guide="magic")
    with pytest.raises(ValueError, match="choose one of: molecules, rna, dna, backbones, sequences"):
        CampaignConfig.from_mapping({"modality": "protein", "rewards": [{"name": "g", "spec": "gc"}]})
    with pytest.raises(ValueError, match="unknown dna preset 'fast'"):
        get_problem("dna", preset="fast")
    assert main(["guide", "rna", "--reward", "rna_mfe", "--preset", "fast", "--out", str(tmp_path / "g.fa")]) == 2
    assert "unknown rna preset 'fast'; choose one of: default, guided" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse lists the registered modalities
        main(["sample", "protein"])
    assert "choose from" in capsys.readouterr().err


def test_library_defaults_are_the_default_presets():
    """The sampling functions' own defaults cannot drift from the presets the commands use."""
    from molgen.molecules.sampling import sample_states  # sample_molecules takes its settings
    from molgen.sequences.sampling import generate
    from molgen.structure.sampling import FEW_STEPS, sample_ca

    for fn, name in ((sample_states, "molecules"), (generate, "rna"), (generate, "dna")):
        params = inspect.signature(fn).parameters
        preset = get_modality(name).presets["default"]
        assert (params["solver"].default, params["steps"].default) == (preset.solver, preset.steps)
    params = inspect.signature(sample_ca).parameters
    assert params["solver"].default is inspect.Parameter.empty  # the preset decides
    options = get_modality("backbones").presets["default"].options
    assert params["settings"].default == FEW_STEPS
    assert (options["rho"], options["sigma_last"], options["warm_start"]) == (FEW_STEPS.rho, FEW_STEPS.sigma_last,
                                                                            FEW_STEPS.warm_start)


def test_commands_resolve_the_same_presets(tmp_path):
    """`molgen sample`, `molgen generate` and `molgen guide` start from one preset per modality (the backbone
    solver and the guided step counts once differed between them)."""
    from molgen.cli import build_parser
    from molgen.generation import GenerationConfig, PlainAdapter
    from molgen.structure.cli import sample_preset

    for name in names():
        assert PlainAdapter(GenerationConfig(modality=name, n=1)).preset == get_modality(name).preset("default")
    args = build_parser().parse_args(["sample", "backbones", "--out", str(tmp_path)])
    assert sample_preset(args) == get_modality("backbones").preset("default")
    guided = build_parser().parse_args(["guide", "molecules", "--reward", "qed", "--out", str(tmp_path / "g.sdf")])
    assert guided.preset == "guided" and guided.steps is None  # the preset's steps, not one number for all
    assert GenerationConfig(modality="rna", n=1, reward="rna_mfe").preset == "guided"


def test_guided_problem_uses_the_guided_preset():
    from molgen.guidance.tasks import get_problem

    problem = get_problem("rna", length=12)
    preset = get_modality("rna").presets["guided"]
    assert (problem.sampler.solver, problem.sampler.steps) == (preset.solver, preset.steps)
    assert problem.settings["preset"] == "guided" and problem.settings["length"] == 12
    assert get_problem("rna", steps=3, length=12).sampler.steps == 3


def test_sample_outputs_record_their_preset(tmp_path):
    import json

    out = tmp_path / "r.fasta"
    assert main(["sample", "rna", "--n", "2", "--steps", "3", "--out", str(out)]) == 0
    record = json.loads(out.with_name("r.fasta.json").read_text())
    assert record["preset"] == "default" and record["steps"] == 3 and record["solver"] == "cached_ancestral"
    assert record["n"] == 2 and record["seed"] == 0
