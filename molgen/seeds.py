"""Seeds derived from a user's seed, so that each unit of work (a generation shard, a campaign round) draws the
same numbers however the work is split, resumed or distributed."""

from __future__ import annotations

import hashlib


def derived_seed(namespace: str, seed: int, index: int, bits: int = 62) -> int:
    """A ``bits``-bit seed that depends on (namespace, seed, index) alone: the first 8 bytes of
    SHA-256("namespace:seed:index"), masked."""
    digest = hashlib.sha256(f"{namespace}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**bits - 1)
