"""Progress bars (tqdm) for work a user waits on: evaluations over many samples, fitting loops, batched sampling,
training.

Bars are drawn on stderr only when stderr is a terminal and ``TQDM_DISABLE`` is not set in the environment;
``enabled=True`` / ``False`` decides for one call.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def bars_enabled() -> bool:
    """True when stderr is a terminal and ``TQDM_DISABLE`` is unset (or 0 / false): the default for every bar,
    Lightning's included."""
    off = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return not off and bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(items: Iterable[T], desc: str | None = None, total: int | None = None,
             enabled: bool | None = None) -> Iterable[T]:
    """``items`` wrapped in a transient tqdm bar (cleared when done); ``enabled=None``: ``bars_enabled()``."""
    show = bars_enabled() if enabled is None else enabled
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=not show)
