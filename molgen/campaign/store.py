"""The campaign's SQL store (SQLAlchemy Core): SQLite in the campaign folder by default, or any server URL.

Tables (one campaign per database):

    campaign    config JSON, identity hash, modality, checkpoint path and sha256, sampler, guidance, seed,
                molgen version, created
    rounds      round, status (running | done), seed, n, model calls, seconds (generate, score, select),
                started, finished
    samples     id (r{round:03d}-{index:05d}), round, idx, origin (sample | refine | recombine), parent, sequence,
                smiles, structure (MOL block / PDB text), naturalness, score (weighted reward sum)
    scores      sample id, reward name, value
    selections  round, sample id, rank (the portfolio selected after that round)

A round's samples, scores, selection and its ``done`` status are written in one transaction, so a round is
either complete or absent; a round left ``running`` by a crash holds no rows and is redone.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

metadata = MetaData()

campaign_table = Table(
    "campaign", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200)),
    Column("modality", String(20), nullable=False),
    Column("config", Text, nullable=False),
    Column("identity", String(64), nullable=False),
    Column("checkpoint", Text),
    Column("checkpoint_sha256", String(64)),
    Column("sampler", Text),
    Column("guidance", Text),
    Column("seed", Integer),
    Column("molgen_version", String(40)),
    Column("created", String(40)),
)
rounds_table = Table(
    "rounds", metadata,
    Column("round", Integer, primary_key=True),
    Column("status", String(10), nullable=False),
    Column("seed", Integer),
    Column("n", Integer),
    Column("model_calls", Integer),
    Column("seconds_generate", Float),
    Column("seconds_score", Float),
    Column("seconds_select", Float),
    Column("started", String(40)),
    Column("finished", String(40)),
)
samples_table = Table(
    "samples", metadata,
    Column("id", String(40), primary_key=True),
    Column("round", Integer, ForeignKey("rounds.round"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("origin", String(10), nullable=False),
    Column("parent", String(40)),
    Column("sequence", Text),
    Column("smiles", Text),
    Column("structure", Text),
    Column("naturalness", Float),
    Column("score", Float),
    UniqueConstraint("round", "idx"),
)
scores_table = Table(
    "scores", metadata,
    Column("sample_id", String(40), ForeignKey("samples.id"), primary_key=True),
    Column("reward", String(100), primary_key=True),
    Column("value", Float, nullable=False),
)
selections_table = Table(
    "selections", metadata,
    Column("round", Integer, ForeignKey("rounds.round"), primary_key=True),
    Column("sample_id", String(40), ForeignKey("samples.id"), primary_key=True),
    Column("rank", Integer, nullable=False),
)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


PASSWORD_VARIABLE = "MOLGEN_DATABASE_PASSWORD"
MASK = "***"


def mask_password(url: str | None) -> str | None:
    """The URL as stored and shown: its password replaced by ``***`` (the password never reaches disk)."""
    return None if url is None else make_url(url).render_as_string(hide_password=True)


def database_url(root: Path, url: str | None) -> str:
    """The URL to connect to: the configured one (a stored, masked URL takes its password from the environment
    variable ``MOLGEN_DATABASE_PASSWORD``), or ``DIR/campaign.sqlite``."""
    if url is None:
        return f"sqlite:///{(root / 'campaign.sqlite').resolve()}"
    parsed = make_url(url)
    if parsed.password != MASK:
        return url
    password = os.environ.get(PASSWORD_VARIABLE)
    if not password:
        raise ValueError(f"the database password of {url} is not stored; set {PASSWORD_VARIABLE} or give the URL "
                         "with its password in the campaign config")
    return parsed.set(password=password).render_as_string(hide_password=False)


def sample_id(round_: int, index: int) -> str:
    return f"r{round_:03d}-{index:05d}"


class DatabaseUnavailable(OSError):
    """The campaign database cannot be opened: an unreachable server, refused credentials, a bad URL."""


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = create_engine(url)
            metadata.create_all(self.engine)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(f"the campaign database {mask_password(url)} needs its Python driver "
                                      f"{err.name!r}: pip install {err.name}", name=err.name) from None
        except (SQLAlchemyError, ValueError) as err:
            reason = getattr(err, "orig", None) or err
            raise DatabaseUnavailable(f"cannot open the campaign database {mask_password(url)}: "
                                      f"{str(reason).strip().splitlines()[0]}") from None

    # ------------------------------------------------------------------------------------------ campaign
    def campaign(self) -> dict[str, Any] | None:
        with self.engine.connect() as con:
            row = con.execute(select(campaign_table)).mappings().first()
        return dict(row) if row else None

    def reset(self) -> None:
        """Drop every row (``--overwrite``)."""
        with self.engine.begin() as con:
            for table in (selections_table, scores_table, samples_table, rounds_table, campaign_table):
                con.execute(delete(table))

    def write_campaign(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as con:
            con.execute(delete(campaign_table))
            con.execute(insert(campaign_table).values(id=1, created=now(), **row))

    # ------------------------------------------------------------------------------------------ rounds
    def done_rounds(self) -> list[int]:
        with self.engine.connect() as con:
            q = select(rounds_table.c.round).where(rounds_table.c.status == "done").order_by(rounds_table.c.round)
            return [r for (r,) in con.execute(q)]

    def start_round(self, round_: int, seed: int) -> None:
        """Mark ``round_`` running (a leftover row of a crashed attempt is replaced; it holds no samples)."""
        with self.engine.begin() as con:
            con.execute(delete(rounds_table).where(rounds_table.c.round == round_))
            con.execute(insert(rounds_table).values(round=round_, status="running", seed=seed, started=now()))

    def commit_round(self, round_: int, samples: Sequence[dict[str, Any]], scores: Sequence[dict[str, Any]],
                     selection: Sequence[str], stats: dict[str, Any]) -> None:
        """Samples, scores, the selection and status ``done``, in one transaction."""
        with self.engine.begin() as con:
            if samples:
                con.execute(insert(samples_table), list(samples))
            if scores:
                con.execute(insert(scores_table), list(scores))
            if selection:
                con.execute(insert(selections_table),
                            [{"round": round_, "sample_id": s, "rank": k} for k, s in enumerate(selection)])
            con.execute(update(rounds_table).where(rounds_table.c.round == round_)
                        .values(status="done", finished=now(), n=len(samples), **stats))

    # ------------------------------------------------------------------------------------------ frames
    def rounds_frame(self) -> pd.DataFrame:
        return self._frame(select(rounds_table).order_by(rounds_table.c.round))

    def samples_frame(self, reward_names: Sequence[str] = ()) -> pd.DataFrame:
        """One row per sample of a finished round, with one column per reward (wide)."""
        samples = self._frame(select(samples_table).order_by(samples_table.c.round, samples_table.c.idx))
        scores = self.scores_frame()
        if len(scores):
            wide = scores.pivot(index="sample_id", columns="reward", values="value")
            samples = samples.join(wide, on="id")
        for name in reward_names:
            if name not in samples:
                samples[name] = pd.Series(dtype=float)
        return samples

    def scores_frame(self) -> pd.DataFrame:
        return self._frame(select(scores_table).order_by(scores_table.c.sample_id, scores_table.c.reward))

    def selections_frame(self) -> pd.DataFrame:
        return self._frame(select(selections_table).order_by(selections_table.c.round, selections_table.c.rank))

    def selection(self, round_: int) -> list[str]:
        with self.engine.connect() as con:
            q = (select(selections_table.c.sample_id).where(selections_table.c.round == round_)
                 .order_by(selections_table.c.rank))
            return [s for (s,) in con.execute(q)]

    def _frame(self, query: Any) -> pd.DataFrame:
        with self.engine.connect() as con:
            return pd.read_sql(query, con)

    def close(self) -> None:
        self.engine.dispose()


def json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
