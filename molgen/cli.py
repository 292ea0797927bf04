"""The `molgen` command.

Each registered modality (``molgen.modalities``) names a module that defines any of ``add_sample/run_sample``,
``add_evaluate/run_evaluate``, ``add_train/run_train`` (argparse hooks).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from molgen.errors import exit_code


def verb_modules() -> dict[str, dict[str, str]]:
    """verb -> modality -> module that defines add_<verb>/run_<verb>, from the modality registry."""
    from molgen.modalities import get_modality, names

    hooks = {m: get_modality(m).cli_module for m in names()}
    return {
        "sample": hooks,
        "evaluate": hooks,
        "train": hooks,
        "guide": dict.fromkeys(hooks, "molgen.guidance.cli"),
        "design": {"rna": "molgen.sequences.cli"},
        "tune": hooks,
    }


def _hooks(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # a modality that has not landed yet
        if err.name and module_name.startswith(err.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molgen", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb, modules in verb_modules().items():
        verb_parser = commands.add_parser(verb, help=f"{verb} for one modality")
        per_modality = verb_parser.add_subparsers(dest="modality", required=True, metavar="MODALITY")
        for modality, module_name in modules.items():
            module = _hooks(module_name)
            add = getattr(module, f"add_{verb}", None) if module else None
            if add is None:
                continue
            sub = per_modality.add_parser(modality, help=f"{verb} {modality}")
            add(sub, modality)
            sub.set_defaults(run=getattr(module, f"run_{verb}"))
    _add_generate(commands)
    _add_campaign(commands)
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


def _add_generate(commands: argparse._SubParsersAction) -> None:
    from molgen.modalities import names

    gen = commands.add_parser("generate", help="batch generation in resumable shards (Lightning, multi-GPU/node)")
    gen.add_argument("--config", help="YAML file with the keys below (command-line values win)")
    gen.add_argument("--modality", choices=names())
    gen.add_argument("--preset", help="the modality's sampler preset (default: default, or guided with --reward)")
    gen.add_argument("--n", type=int)
    gen.add_argument("--shard-size", dest="shard_size", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--solver")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--length", type=int, help="sequence / backbone length (default: drawn from the data)")
    gen.add_argument("--checkpoint", help="model checkpoint (default: the shipped one)")
    gen.add_argument("--reward", help="steer toward this reward, NAME[:ARGS] (guidance.rewards), e.g. rna_mfe")
    gen.add_argument("--guide", help="guidance method with --reward: svdd (default), fk, bon, dps, unguided")
    gen.add_argument("--candidates", type=int, help="SVDD's M / best-of-N's N (default 4)")
    gen.add_argument("--particles", type=int, help="FK particles per sample (default 4)")
    gen.add_argument("--out")
    gen.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")
    gen.add_argument("--devices", default="1", help="devices per node (an integer or 'auto')")
    gen.add_argument("--num-nodes", dest="num_nodes", type=int, default=1)
    gen.add_argument("--overwrite", action="store_true", help="reuse an --out written by another configuration")
    gen.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from molgen.generation import GenerationConfig, iter_config_file, run_generation

    values = dict(iter_config_file(args.config)) if args.config else {}
    where = args.config or "command line"
    for key in ("modality", "preset", "n", "shard_size", "seed", "solver", "steps", "length", "checkpoint", "reward",
                "guide", "candidates", "particles", "out"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    for key in ("modality", "n"):
        if key not in values:
            raise ValueError(f"generate needs --{key} (or '{key}:' in the config)")
    config = GenerationConfig.from_mapping(values, where)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    store = run_generation(config, accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes,
                           overwrite=args.overwrite)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(f"{config.n} {config.modality} samples in {config.n_shards} shards under {store.root}")
    return 0


def _add_campaign(commands: argparse._SubParsersAction) -> None:
    camp = commands.add_parser("campaign", help="design campaigns: rounds of generate -> score -> select")
    verbs = camp.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = verbs.add_parser("run", help="run (or resume) a campaign from a YAML config, then write its report")
    run.add_argument("config", help="campaign YAML (see examples/campaign_rna.yaml)")
    run.add_argument("--dir", help="campaign folder (default: runs/campaigns/<config file stem>)")
    run.add_argument("--overwrite", action="store_true", help="discard what the folder holds and start again")
    run.add_argument("--no-report", dest="report", action="store_false", help="do not write DIR/report.html")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.set_defaults(run=_run_campaign)
    status = verbs.add_parser("status", help="rounds, counts and best scores of a campaign folder")
    status.add_argument("dir")
    status.set_defaults(run=_run_campaign_status)
    report = commands.add_parser("report", help="write a campaign's self-contained HTML report")
    report.add_argument("dir", help="campaign folder")
    report.add_argument("--out", help="HTML file (default: DIR/report.html)")
    report.set_defaults(run=_run_report)


def _run_campaign(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from molgen.campaign import Campaign, CampaignConfig
    from molgen.campaign.report import write_report

    config = CampaignConfig.from_yaml(args.config)
    folder = Path(args.dir or Path("runs") / "campaigns" / Path(args.config).stem)
    if args.threads:
        torch.set_num_threads(args.threads)
    campaign = Campaign(config, folder, overwrite=args.overwrite)
    pending = campaign.pending_rounds()
    print(f"campaign {config.name!r}: {len(pending)} round(s) to run in {folder}", flush=True)
    campaign.run(verbose=True)
    if args.report:
        print(f"report: {write_report(campaign).resolve()}")
    return 0


def _run_campaign_status(args: argparse.Namespace) -> int:
    from molgen.campaign import Campaign
    from molgen.campaign.runner import status_text

    print(status_text(Campaign.open(args.dir)))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from molgen.campaign import Campaign
    from molgen.campaign.report import write_report

    print(f"report: {write_report(Campaign.open(args.dir), args.out).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input, refused paths and missing extras end in one line on stderr and the exit code
    of ``molgen.errors`` (2 input, 3 operating system, 4 missing extra); ``--debug`` shows the traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except Exception as err:  # noqa: BLE001 - classified below; anything else is re-raised as a bug
        code = exit_code(err)
        if code is None or args.debug:
            raise
        text = f"{err.filename}: {err.strerror}" if isinstance(err, OSError) and err.filename and err.strerror else err
        print(f"molgen {args.command}: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
