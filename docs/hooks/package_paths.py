"""mkdocs hook: let mkdocstrings find molgen.structure and molgen.guidance.

Those two packages live in the repository folders structure/ and guidance/ and are installed under molgen by
setuptools' package_dir mapping, which griffe's static loader does not follow. Before the build this hook lays
out the installed package tree as symlinks in a temporary folder and puts that folder first on the Python
handler's search paths.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]
FALLBACK = {"molgen": "molgen", "molgen.structure": "structure", "molgen.guidance": "guidance"}


def package_dirs() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return FALLBACK
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    return setup.get("package-dir") or FALLBACK


@event_priority(100)
def on_config(config):
    stage = Path(tempfile.mkdtemp(prefix="molgen-docs-"))
    atexit.register(shutil.rmtree, stage, ignore_errors=True)
    for package, folder in sorted(package_dirs().items(), key=lambda kv: kv[0].count(".")):
        target = stage.joinpath(*package.split("."))
        if package.count(".") == 0:
            target.mkdir(parents=True)
            for entry in (ROOT / folder).iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry)
        else:
            if target.is_symlink():
                target.unlink()
            target.symlink_to(ROOT / folder)
    handlers = config.plugins["mkdocstrings"].config.handlers
    python = handlers.setdefault("python", {})
    python["paths"] = [str(stage), *python.get("paths", [])]
    return config
