"""The `molgen` command.

Each modality plugs its sub-commands in through a module ``<package>.cli`` that defines any of
``add_sample/run_sample``, ``add_evaluate/run_evaluate``, ``add_train/run_train`` (argparse hooks).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# modality name -> module that holds its command hooks
MODALITIES: dict[str, str] = {
    "molecules": "molgen.molecules.cli",
    "rna": "molgen.sequences.cli",
    "dna": "molgen.sequences.cli",
    "backbones": "structure.cli",
}
VERBS = ("sample", "evaluate", "train")


def _hooks(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # a modality that has not landed yet
        if err.name and module_name.startswith(err.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molgen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb_parser = commands.add_parser(verb, help=f"{verb} for one modality")
        per_modality = verb_parser.add_subparsers(dest="modality", required=True, metavar="MODALITY")
        for modality, module_name in MODALITIES.items():
            module = _hooks(module_name)
            add = getattr(module, f"add_{verb}", None) if module else None
            if add is None:
                continue
            sub = per_modality.add_parser(modality, help=f"{verb} {modality}")
            add(sub, modality)
            sub.set_defaults(run=getattr(module, f"run_{verb}"))
    bench = commands.add_parser("bench", help="run a benchmark script from benchmarks/")
    bench.add_argument("name", help="samplers, molecules, sequences, structure, guidance, generation, gpu")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_run_bench)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.exists():
        raise SystemExit(f"molgen bench: no benchmark named {args.name!r} ({script} does not exist)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"molgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
