"""Campaign configuration: nested frozen dataclasses read from YAML, unknown keys and bad values refused.

    name: rna_demo                     # free text
    modality: rna                      # molecules | rna | dna | backbones | sequences (any alphabet)
    checkpoint: null                   # null = the shipped default model (sequences: required, a model of
                                       # `molgen train sequences --fasta FILE`)
    seed: 0
    rounds: 3
    n_per_round: 64
    length: 40                         # sequence / backbone length (null = drawn from the data; backbones: 100)
    sampler: {solver: ancestral, steps: 16}
    rewards:                           # guidance.rewards.parse_reward specs; score = sum_k weight_k r_k
      - {name: stability, spec: rna_mfe, weight: 0.1}
      - {name: hairpin, spec: "rna_target:((((((....))))))", weight: 1.0}
      # your own scorer: {name: oracle, spec: "python:oracle.py:score"} (list of designs -> numbers)
    guidance: {method: svdd, candidates: 4}        # unguided | bon | svdd | fk | dps | svdd_mc (+ alpha, ...);
                                       # svdd_mc: from round 2, a value net fitted on every design scored so
                                       # far steers SVDD (no reward calls while sampling); round 1 unguided
    selection: {rule: top_k, k: 16, min_distance: 0.3}   # top_k | pareto; objectives: rewards | rewards+naturalness
    refine: {fraction: 0.5, t: 0.5}    # rounds >= 2: this share of n refines the selection, re-noised to t
                                       # (a list of times, e.g. [0.05, 0.15, 0.4]: dealt over the levels;
                                       # recombine: 0.5 makes half of them rearranged parents, sequences)
    finetune: {}                       # before each round >= 2, fine-tune an adapter on every design scored
                                       # so far (molgen.finetune; {} = defaults, null/absent = off);
                                       # {method: grpo}: on-policy GRPO with fresh reward calls instead
    database: null                     # null = sqlite:///DIR/campaign.sqlite; or a SQLAlchemy URL

``identity()`` is what decides the designs: a folder holding a campaign of another identity is refused.
``rounds`` and ``database`` are left out, so raising ``rounds`` continues a finished campaign; ``finetune``
is left out when null and ``refine.recombine`` when 0, so campaigns without them keep their identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molgen.finetune import FinetuneSettings, GRPOSettings
from molgen.guidance.fk import POTENTIALS
from molgen.guidance.tasks import METHODS as GUIDANCE_METHODS
from molgen.modalities import choose, get_modality
from molgen.modalities import names as modality_names

METHODS = GUIDANCE_METHODS  # svdd_mc: its value net is fitted on the campaign's own scores (runner.surrogate)
RULES = ("top_k", "pareto")
OBJECTIVES = ("rewards", "rewards+naturalness")
FINETUNE_METHODS = ("weighted", "grpo")  # the first is the default


@dataclass(frozen=True)
class RewardSpec:
    """One reward: a column ``name`` in the scores table, a ``parse_reward`` spec and its weight in the score."""

    name: str
    spec: str
    weight: float = 1.0


@dataclass(frozen=True)
class SamplerSpec:
    """The model's sampler: null takes the modality's ``guided`` preset (``molgen.modalities``). SVDD and FK
    need a stochastic sampler."""

    solver: str | None = None
    steps: int | None = None


@dataclass(frozen=True)
class GuidanceSpec:
    """A guidance method of the ``guidance`` package steering toward the weighted score."""

    method: str = "unguided"
    candidates: int = 4  # SVDD's M, best-of-N's N
    particles: int = 4  # FK population per output
    alpha: float = 0.0  # SVDD temperature
    lam: float = 10.0  # FK tilt strength
    potential: str = "difference"
    scale: float = 1.0  # DPS guidance scale (a differentiable reward on a continuous state: backbones' rg)


@dataclass(frozen=True)
class SelectionSpec:
    """Which designs of the portfolio (all rounds so far) are selected after each round."""

    rule: str = "top_k"
    k: int = 16
    objectives: str = "rewards"  # Pareto objectives: the reward columns, optionally with naturalness
    min_distance: float | None = None  # diversity filter: keep a design only this far from every kept one


@dataclass(frozen=True)
class RefineSpec:
    """SDEdit-style refinement: in rounds >= 2, ``fraction`` of ``n_per_round`` designs start from the
    previous selection noised to time ``t`` (masked diffusion: each token masked with probability 1 - alpha(t);
    continuous: x_t = alpha(t) x0 + sigma(t) eps) and are denoised from there. A list of times is a ladder:
    the refinements are dealt over its levels in turn, small moves and large ones in every round.
    ``recombine`` (sequences): this share of the refinements are their parent rearranged instead, not re-noised
    (``Modality.recombine``: a segment of another selected design written over it at any offset, or a stretch
    of it shifted by one place), so motifs found in different designs meet and one moves out of another's way."""

    fraction: float = 0.0
    t: float | tuple[float, ...] = 0.5
    recombine: float = 0.0

    @property
    def levels(self) -> tuple[float, ...]:
        return self.t if isinstance(self.t, tuple) else (self.t,)


@dataclass(frozen=True)
class FinetuneSpec:
    """Reward fine-tuning between rounds (``molgen.finetune``): before round r >= 2 a rank-``rank`` adapter
    on the campaign's model (round 2: from zero; later rounds: continuing the previous one) is trained.

    ``method: weighted`` (default): ``steps`` steps (``batch`` designs each, Adam at ``lr``) on every design
    scored so far, weighted softmax(beta * standardised score), with KL weight ``kl_weight`` to the pretrained
    model; a step pushing the KL above ``kl_bound`` is rolled back. It asks the reward nothing new.
    ``method: grpo``: ``iterations`` rounds of on-policy GRPO on the campaign's sampler (MixGRPO's sliding
    window for molecules and backbones), each scoring ``batch`` fresh samples in groups of ``group_size``, so
    the reward is called ``iterations x batch`` more times per round; ``beta`` and ``steps`` are not used."""

    steps: int = FinetuneSettings.steps
    lr: float = FinetuneSettings.lr
    beta: float = FinetuneSettings.beta
    kl_weight: float = FinetuneSettings.kl_weight
    kl_bound: float = FinetuneSettings.kl_bound
    rank: int = FinetuneSettings.rank
    batch: int = FinetuneSettings.batch
    method: str = FINETUNE_METHODS[0]
    iterations: int = GRPOSettings.iterations
    group_size: int = GRPOSettings.group_size

    def settings(self, seed: int) -> FinetuneSettings:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneSettings) if f.name != "seed"}
        return FinetuneSettings(**shared, seed=seed)

    def grpo_settings(self, seed: int) -> GRPOSettings:
        return GRPOSettings(iterations=self.iterations, groups=self.batch // self.group_size,
                            group_size=self.group_size, kl_weight=self.kl_weight,
                            kl_bound=self.kl_bound, lr=self.lr, rank=self.rank, seed=seed)


GRPO_KEYS = ("method", "iterations", "group_size")  # not part of a weighted fine-tuning's identity


@dataclass(frozen=True)
class CampaignConfig:
    modality: str
    rewards: tuple[RewardSpec, ...]
    name: str = "campaign"
    checkpoint: str | None = None
    seed: int = 0
    rounds: int = 3
    n_per_round: int = 32
    length: int | None = None
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    selection: SelectionSpec = field(default_factory=SelectionSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    finetune: FinetuneSpec | None = None
    database: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_mapping(cls, values: Any, where: str = "config") -> CampaignConfig:
        """Build from a nested mapping; an unknown key or a bad value raises ValueError naming it and ``where``."""
        try:
            return _build(cls, values, where, "")
        except ValueError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> CampaignConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no campaign config at {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        return cls.from_mapping(data, str(path))

    # ------------------------------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The configuration as stored and shown: the database password masked (``store.mask_password``)."""
        from molgen.campaign.store import mask_password

        return {**dataclasses.asdict(self), "database": mask_password(self.database)}

    def identity(self) -> dict[str, Any]:
        d = self.to_dict()
        d.pop("rounds")
        d.pop("database")
        if d["finetune"] is None:
            d.pop("finetune")
        elif d["finetune"]["method"] == FINETUNE_METHODS[0]:
            d["finetune"] = {k: v for k, v in d["finetune"].items() if k not in GRPO_KEYS}
        if not d["refine"]["recombine"]:
            d["refine"].pop("recombine")
        return d

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()

    def sample_length(self) -> int | None:
        """``length``, or the length the rewards need (``rna_target``'s target) when it is null."""
        from molgen.guidance.rewards import parse_reward, resolve_length

        length = self.length
        for r in self.rewards:
            length = resolve_length(parse_reward(r.spec), length, "length")
        return length

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]


_NESTED = {"sampler": SamplerSpec, "guidance": GuidanceSpec, "selection": SelectionSpec, "refine": RefineSpec}


def _build(cls: type, values: Any, where: str, prefix: str) -> Any:
    label = prefix.rstrip(".") or "the top level"
    if not isinstance(values, dict):
        raise ValueError(f"{where}: {label} must be a mapping of keys to values, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; known keys at {label}: "
                         f"{sorted(known)}")
    missing = [k for k, f in known.items() if k not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing key(s) {[prefix + k for k in missing]}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if cls is CampaignConfig and key in _NESTED:
            kwargs[key] = _build(_NESTED[key], value or {}, where, f"{key}.")
        elif cls is CampaignConfig and key == "finetune":
            kwargs[key] = None if value is None else _build(FinetuneSpec, value, where, "finetune.")
        elif cls is CampaignConfig and key == "rewards":
            if not isinstance(value, list) or not value:
                raise ValueError(f"{where}: rewards must be a non-empty list of {{name, spec, weight}}")
            kwargs[key] = tuple(_build(RewardSpec, v, where, f"rewards[{i}].") for i, v in enumerate(value))
        else:
            kwargs[key] = _typed(known[key], value, where, prefix + key)
    return cls(**kwargs)


def _typed(f: dataclasses.Field, value: Any, where: str, key: str) -> Any:
    """Check a value against the field's annotation (str, int, float, a list of floats, or one of them | None)."""
    kinds = str(f.type).replace(" ", "").split("|")
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{where}: {key} may not be null")
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "float" in kinds and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if "str" in kinds and isinstance(value, str):
        return value
    if "tuple[float,...]" in kinds and isinstance(value, list) and value and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)
    want = " or ".join(k for k in kinds if k != "None")
    raise ValueError(f"{where}: {key} must be {want}, got {value!r}")


def validate(cfg: CampaignConfig) -> None:
    """Value checks; the error names the key."""
    choose("modality", cfg.modality, modality_names())
    if cfg.checkpoint is None:
        get_modality(cfg.modality).default_checkpoint()  # sequences has none: the error says how to train one
    for key in ("rounds", "n_per_round"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.length is not None and cfg.length < 1:
        raise ValueError(f"length must be >= 1, got {cfg.length}")
    rewards = cfg.rewards
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards: names must be unique, got {names}")
    for i, r in enumerate(rewards):
        _check_reward(r, i, cfg.modality)
    cfg.sample_length()  # a length some reward cannot score fails here
    s = cfg.sampler
    if s.steps is not None and s.steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {s.steps}")
    g = cfg.guidance
    choose("guidance.method", g.method, METHODS)
    choose("guidance.potential", g.potential, POTENTIALS)
    for key in ("candidates", "particles"):
        if getattr(g, key) < 1:
            raise ValueError(f"guidance.{key} must be >= 1, got {getattr(g, key)}")
    if not (g.alpha >= 0 and math.isfinite(g.alpha)):
        raise ValueError(f"guidance.alpha must be a finite number >= 0, got {g.alpha}")
    if not (math.isfinite(g.lam) and math.isfinite(g.scale)):
        raise ValueError(f"guidance.lam and guidance.scale must be finite, got {g.lam} and {g.scale}")
    sel = cfg.selection
    choose("selection.rule", sel.rule, RULES)
    choose("selection.objectives", sel.objectives, OBJECTIVES)
    if sel.k < 1:
        raise ValueError(f"selection.k must be >= 1, got {sel.k}")
    if sel.min_distance is not None and not 0 <= sel.min_distance <= 1:
        raise ValueError(f"selection.min_distance must be in [0, 1], got {sel.min_distance}")
    ref = cfg.refine
    if not 0 <= ref.fraction <= 1:
        raise ValueError(f"refine.fraction must be in [0, 1], got {ref.fraction}")
    if not all(0 < t <= 1 for t in ref.levels):
        raise ValueError(f"refine.t must be in (0, 1] (or a list of such times), got {ref.t}")
    if not 0 <= ref.recombine <= 1:
        raise ValueError(f"refine.recombine must be in [0, 1], got {ref.recombine}")
    if ref.recombine and get_modality(cfg.modality).payload != "sequence":
        raise ValueError(f"refine.recombine rearranges sequences; {cfg.modality} designs cannot be recombined")
    if cfg.finetune is not None:
        _check_finetune(cfg.finetune)


def _check_finetune(ft: FinetuneSpec) -> None:
    if ft.method not in FINETUNE_METHODS:
        raise ValueError(f"finetune.method must be {' or '.join(FINETUNE_METHODS)}, got {ft.method!r}")
    if ft.method == "grpo" and (ft.group_size < 2 or ft.batch % ft.group_size):
        raise ValueError(f"finetune.batch ({ft.batch}) must be a multiple of finetune.group_size "
                         f"({ft.group_size}), which must be >= 2")
    for key in ("steps", "rank", "batch", "iterations"):
        if getattr(ft, key) < 1:
            raise ValueError(f"finetune.{key} must be >= 1, got {getattr(ft, key)}")
    for key in ("lr", "kl_bound"):
        if not (getattr(ft, key) > 0 and math.isfinite(getattr(ft, key))):
            raise ValueError(f"finetune.{key} must be a finite number > 0, got {getattr(ft, key)}")
    for key in ("beta", "kl_weight"):
        if not (getattr(ft, key) >= 0 and math.isfinite(getattr(ft, key))):
            raise ValueError(f"finetune.{key} must be a finite number >= 0, got {getattr(ft, key)}")


def _check_reward(r: RewardSpec, i: int, modality: str) -> None:
    """A parseable spec whose every term scores this modality's designs (``guidance.rewards.check_modality``)."""
    from molgen.guidance.rewards import check_modality, parse_reward

    if not r.name or not r.name.replace("_", "").isalnum():
        raise ValueError(f"rewards[{i}].name must be a non-empty identifier, got {r.name!r}")
    if r.name in ("score", "naturalness"):
        raise ValueError(f"rewards[{i}].name {r.name!r} is reserved")
    if not math.isfinite(r.weight):
        raise ValueError(f"rewards[{i}].weight must be finite, got {r.weight}")
    try:
        parse_reward(r.spec)
        check_modality(r.spec, modality)
    except ValueError as err:
        raise ValueError(f"rewards[{i}].spec {r.spec!r}: {err}") from None
