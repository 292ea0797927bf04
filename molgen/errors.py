"""The errors molgen raises for bad input, and the exit codes the ``molgen`` command maps them to.

``InputError`` (a ``ValueError``) names where the input is wrong: the file, the record and the position in it,
so that a message reads ``designs.fasta: record 3 (seq_7): position 12: 'X' is not a DNA letter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXIT_INPUT = 2  # bad input: a file, a record, an option or a configuration value
EXIT_OS = 3  # the operating system refused: missing or read-only path, full disk, permissions
EXIT_DEPENDENCY = 4  # an optional dependency (an extra) is not installed


@dataclass
class InputError(ValueError):
    """Bad input, located: ``file``, ``record`` (a name or number) and ``position`` where known."""

    message: str
    file: str | None = None
    record: str | int | None = None
    position: str | int | None = None

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [str(self.file)] if self.file is not None else []
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.position is not None:
            where.append(f"position {self.position}")
        return ": ".join([*where, self.message])


class MissingDependency(ModuleNotFoundError):
    """An optional dependency is missing; the message says which extra installs it."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the {module} package: pip install 'molgen[{extra}]'", name=module)


def exit_code(err: BaseException) -> int | None:
    """The documented exit code of an error the command reports in one line (None: a bug, show the traceback)."""
    if isinstance(err, ModuleNotFoundError):
        return EXIT_DEPENDENCY
    if isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return EXIT_INPUT
    if isinstance(err, OSError):
        return EXIT_OS
    return None


@dataclass(frozen=True)
class Skipped:
    """A record a reader left out, and why; ``str`` reads like the ``InputError`` it came from."""

    file: str | None
    record: str | int | None
    reason: str

    @classmethod
    def of(cls, err: InputError) -> Skipped:
        """The record an ``InputError`` names, with its position folded into the reason."""
        reason = err.message if err.position is None else f"position {err.position}: {err.message}"
        return cls(err.file, err.record, reason)

    def as_dict(self) -> dict[str, str | int | None]:
        return {"file": self.file, "record": self.record, "reason": self.reason}

    def __str__(self) -> str:
        return str(InputError(self.reason, self.file, self.record))


def skipped_summary(skipped: Sequence[Skipped], evaluated: int, unit: str = "records") -> str:
    """One terminal line: how many ``unit`` were evaluated, how many records were skipped, the first reason."""
    if not skipped:
        return f"evaluated {evaluated} {unit}; skipped none"
    more = f" (and {len(skipped) - 1} more: 'skipped' in the JSON)" if len(skipped) > 1 else ""
    return f"evaluated {evaluated} {unit}; skipped {len(skipped)}: {skipped[0]}{more}"
