"""EDM's and GeoLDM's published QM9 checkpoints on molgen's engine (Hoogeboom, Satorras, Vignac & Welling 2022;
Xu, Powers, Dror, Ermon & Leskovec 2023).

A trained EDM folder holds ``args.pickle`` (a pickled ``argparse.Namespace``) and ``generative_model_ema.npy`` (a
``torch.save``d state dict of EDM's ``EnVariationalDiffusion``). ``load_edm(folder)`` reads both without running
code from them and returns an ``EDMDenoiser``: ``model(x_t, t, mask=...) -> eps`` (``prediction = "eps"``), which
every engine solver accepts. A GeoLDM folder has the same two files; ``load_geoldm(folder)`` returns a ``GeoLDM``:
the same denoiser on latent states [B, N, 3 + latent_nf], and a decoder (the same EGNN without time) from latents
to atoms.

State (EDM's normalised layout): x [B, N, 3 + K (+ 1)] = [zero-CoM positions / n_x, one-hot(types) / n_cat,
atomic number / n_int], n = ``normalize_factors`` (1, 4, 10 for QM9); padded atoms are zero. The network is EDM's
E(n)-equivariant GNN. With h^0 = W_in [features, t], r0_ij = |x_i - x_j|^2 at the input and, per block,
d_ij = x_i - x_j, r_ij = |d_ij|^2, e_ij = [r_ij, r0_ij] (or sinusoidal features of sqrt(r)), pair mask
p_ij = [i, j real, i != j] and normalisation Z:

    message    m_ij = phi_e(h_i, h_j, e_ij),  m_ij <- m_ij sigmoid(w . m_ij)  (attention),
    node       h_i <- h_i + phi_h(h_i, sum_j p_ij m_ij / Z),
    position   x_i <- x_i + sum_j p_ij d_ij / (sqrt(r_ij + 1e-8) + c) tanh(phi_x(h_i, h_j, e_ij)) R / Z,

with ``inv_sublayers`` message/node updates per block, then one position update (R = 15, EDM's coords_range).
The output is eps = [x_L - x_0 minus its centre of mass over real atoms, W_out h_L without the time channel].

Time runs on EDM's discrete grid t = i / T, T = ``diffusion_steps``: ``EDMPolynomial`` is its log-SNR table
(``polynomial_2`` with EDM's step clipping and precision s, stored in float32 as EDM stores it), linear in t between
the grid points, so few-step solvers may evaluate anywhere. ``EDMNoise`` draws noise in EDM's order (positions,
then features), so a seeded generator reproduces EDM's ancestral sampler draw for draw.

Layers are created in the order of EDM's constructor: after ``torch.manual_seed(k)`` an ``EDMDenoiser`` has the
initial weights EDM's code builds after the same seed, and the state-dict keys are the checkpoint's (less the
``dynamics.`` prefix).
"""

from __future__ import annotations

import argparse
import builtins
import functools
import io
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from molgen.diffusion.schedules import Schedule
from molgen.diffusion.spaces import ZeroCoM
from molgen.errors import InputError
from molgen.molecules.data import ATOM_TYPES

ARGS_FILE = "args.pickle"
WEIGHTS_FILE = "generative_model_ema.npy"
# The only globals an EDM args.pickle may name: the Namespace, builtin containers and complex (older pickle protocols
# name them to rebuild such values). None of them can act, or build more than the pickle itself holds.
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {("argparse", "Namespace")} | {("builtins", n) for n in ("list", "dict", "tuple", "set", "frozenset", "complex")}
)
COORDS_RANGE = 15.0  # EDM's EGNN default, which its QM9 dynamics never overrides
QM9_TYPES = {False: ATOM_TYPES, True: ATOM_TYPES[1:]}  # remove_h -> atom types, in EDM's one-hot order


class EDMCheckpointError(InputError):
    """An EDM folder that cannot be read as an architecture this module reproduces."""


class UnsafePickleError(EDMCheckpointError):
    """``args.pickle`` names a global outside ``SAFE_GLOBALS``; nothing it names was imported or called."""

    def __init__(self, global_name: str, file: str | None = None) -> None:
        super().__init__(f"refusing to unpickle {global_name!r}: only argparse.Namespace and builtin containers "
                         "are allowed", file)
        self.global_name = global_name


class ArchitectureMismatchError(EDMCheckpointError):
    """The state dict is not the one the arguments describe: missing, unexpected or mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], shapes: list[str], file: str | None = None) -> None:
        parts = [f"{label} {keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                 if keys]
        super().__init__("the weights are not those of the EDM architecture in args.pickle: " + "; ".join(parts),
                         file)
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes


# ------------------------------------------------------------------------------------------------ arguments
class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler whose ``find_class`` resolves only ``SAFE_GLOBALS``: a pickle naming anything else (a function
    to call through REDUCE, a class to build) fails before that global is looked up."""

    def __init__(self, data: bytes, file: str | None) -> None:
        super().__init__(io.BytesIO(data))
        self.file = file

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafePickleError(f"{module}.{name}", self.file)
        return argparse.Namespace if module == "argparse" else getattr(builtins, name)


def read_args(path: str | Path) -> dict[str, Any]:
    """The arguments in an EDM ``args.pickle`` as a dict, read with the allow-list unpickler."""
    path = Path(path)
    try:
        args = _AllowListUnpickler(path.read_bytes(), str(path)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError, ValueError) as err:
        raise EDMCheckpointError(f"not a readable pickle: {err}", str(path)) from None
    if not isinstance(args, argparse.Namespace):
        raise EDMCheckpointError(f"expected a pickled argparse.Namespace, got {type(args).__name__}", str(path))
    return vars(args)


@dataclass(frozen=True)
class EDMConfig:
    """The architecture and diffusion settings of an EDM QM9 model (defaults: the published QM9 model)."""

    atom_types: tuple[str, ...] = ATOM_TYPES
    include_charges: bool = True
    hidden: int = 256
    layers: int = 9
    sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    norm_constant: float = 1.0
    normalization_factor: float = 1.0
    sin_embedding: bool = False
    timesteps: int = 1000
    power: float = 2.0
    precision: float = 1e-5
    norm_values: tuple[float, float, float] = (1.0, 4.0, 10.0)
    latent_nf: int = 0  # GeoLDM: the width of the latent features the diffusion runs on (0: EDM, atom features)

    @property
    def atom_features(self) -> int:
        """K one-hot types and the charge when included."""
        return len(self.atom_types) + int(self.include_charges)

    @property
    def n_features(self) -> int:
        """Channels of the diffused state: 3 positions and the atom features (EDM) or the latent ones (GeoLDM)."""
        return 3 + (self.latent_nf or self.atom_features)


def _require(args: Mapping[str, Any], key: str, allowed: tuple[Any, ...], file: str | None) -> Any:
    value = args.get(key, allowed[0])
    if value not in allowed:
        raise EDMCheckpointError(f"{key}={value!r} is not supported (only {', '.join(map(repr, allowed))})", file)
    return value


def config_from_args(args: Mapping[str, Any], file: str | None = None) -> EDMConfig:
    """``EDMConfig`` from EDM's arguments; settings this module does not reproduce raise ``EDMCheckpointError``.
    A missing ``aggregation_method`` means "sum" (EDM's default for older pickles)."""
    _require(args, "model", ("egnn_dynamics",), file)
    _require(args, "probabilistic_model", ("diffusion",), file)
    _require(args, "dataset", ("qm9",), file)
    _require(args, "condition_time", (True,), file)
    _require(args, "aggregation_method", ("sum",), file)
    if args.get("context_node_nf", 0) or args.get("conditioning"):
        raise EDMCheckpointError("conditional models are not supported (context_node_nf="
                                 f"{args.get('context_node_nf')}, conditioning={args.get('conditioning')})", file)
    schedule = str(args.get("diffusion_noise_schedule"))
    kind, _, power = schedule.partition("_")
    if kind != "polynomial" or not power.replace(".", "", 1).isdigit():
        raise EDMCheckpointError(f"diffusion_noise_schedule={schedule!r} is not supported (only polynomial_<p>)",
                                 file)
    norm = tuple(float(v) for v in args.get("normalize_factors", (1, 4, 10)))
    if len(norm) != 3 or norm[0] != 1.0:
        raise EDMCheckpointError(f"normalize_factors={list(norm)} is not supported (positions must be unscaled: "
                                 "[1, n_cat, n_int])", file)
    try:
        return EDMConfig(
            atom_types=QM9_TYPES[bool(args.get("remove_h", False))],
            include_charges=bool(args["include_charges"]),
            hidden=int(args["nf"]),
            layers=int(args["n_layers"]),
            sublayers=int(args["inv_sublayers"]),
            attention=bool(args["attention"]),
            tanh=bool(args["tanh"]),
            norm_constant=float(args["norm_constant"]),
            normalization_factor=float(args.get("normalization_factor", 1.0)),
            sin_embedding=bool(args.get("sin_embedding", False)),
            timesteps=int(args["diffusion_steps"]),
            power=float(power),
            precision=float(args["diffusion_noise_precision"]),
            norm_values=norm,  # type: ignore[arg-type]
            latent_nf=latent_width(args, file),
        )
    except KeyError as err:
        raise EDMCheckpointError(f"args.pickle has no {err.args[0]!r}", file) from None


def latent_width(args: Mapping[str, Any], file: str | None) -> int:
    """GeoLDM's ``latent_nf`` for a latent diffusion model, 0 for EDM (whose arguments have no ``latent_nf``)."""
    if "latent_nf" not in args:
        return 0
    if not args.get("train_diffusion", False):
        raise EDMCheckpointError("a GeoLDM autoencoder without a diffusion model (train_diffusion is False)", file)
    return int(args["latent_nf"])


# ------------------------------------------------------------------------------------------------ schedule
@functools.lru_cache(maxsize=8)
def gamma_table(timesteps: int, power: float, precision: float) -> Tensor:
    """EDM's gamma_i = -log(alpha_i^2 / sigma_i^2) at t = i / T, i = 0..T, float64 holding float32 values.

    a_i = (1 - (i / T)^p)^2; the step ratios a_i / a_{i-1} (a_{-1} = 1) are clipped to [1e-3, 1] and multiplied
    back up (this only changes the last point, where a_T = 0), then alpha_i^2 = (1 - 2s) a_i + s, sigma^2 = 1 -
    alpha^2. EDM computes in float64 and stores float32; so does this."""
    steps = timesteps + 1
    x = torch.linspace(0.0, steps, steps, dtype=torch.float64) / steps
    a = (1.0 - x**power) ** 2
    ratios = (a / torch.cat([a.new_ones(1), a[:-1]])).clamp(1e-3, 1.0)
    alpha2 = (1.0 - 2.0 * precision) * torch.cumprod(ratios, 0) + precision
    return (torch.log1p(-alpha2) - torch.log(alpha2)).float().double()


@dataclass(frozen=True)
class EDMPolynomial(Schedule):
    """EDM's discrete ``polynomial_<power>`` schedule: lambda(t) = -gamma(t), gamma linear in t between EDM's
    table values at t = i / T (``gamma_table``); alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""

    name: str = "edm_polynomial"
    timesteps: int = 1000
    power: float = 2.0
    precision: float = 1e-5
    t_min: float = 0.0

    def _table(self, like: Tensor) -> Tensor:
        return gamma_table(self.timesteps, self.power, self.precision).to(like.device, like.dtype)

    def _segment(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(table, index i of the segment [i, i + 1] / T holding t, fraction within it)."""
        table = self._table(t)
        u = (t * self.timesteps).clamp(0.0, float(self.timesteps))
        i = u.floor().clamp(max=self.timesteps - 1)
        return table, i.long(), u - i

    def lam(self, t: Tensor) -> Tensor:
        table, i, w = self._segment(t)
        return -torch.lerp(table[i], table[i + 1], w)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * softplus(-self.lam(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return -0.5 * softplus(self.lam(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        gamma = -torch.as_tensor(lam, dtype=torch.float64)
        table = self._table(gamma)
        i = torch.searchsorted(table, gamma.contiguous()).clamp(1, self.timesteps)
        w = ((gamma - table[i - 1]) / (table[i] - table[i - 1])).clamp(0.0, 1.0)
        return (i - 1 + w) / self.timesteps

    def d_alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """d log alpha / d lambda = sigma^2 / 2, d log sigma / d lambda = -alpha^2 / 2, d lambda / dt the
        table's slope on t's segment."""
        table, i, _ = self._segment(t)
        slope = -(table[i + 1] - table[i]) * self.timesteps
        alpha, sigma = self.alpha(t), self.sigma(t)
        return 0.5 * alpha * sigma**2 * slope, -0.5 * sigma * alpha**2 * slope


def edm_grid(timesteps: int = 1000) -> Tensor:
    """EDM's own sampling grid t_i = (T - i) / T, i = 0..T, float64: ``steps = T + 1`` with ``ddpm_ancestral`` is
    EDM's T-step ancestral sampler (its final x0 estimate is EDM's mean at t = 0)."""
    return torch.arange(timesteps, -1, -1, dtype=torch.float64) / timesteps


class EDMNoise(ZeroCoM):
    """Zero-CoM positions and Gaussian features, drawn in EDM's order: all positions [B, N, 3], then all
    features [B, N, F - 3], each masked, positions centred over real atoms."""

    def noise_like(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        pos = torch.randn((*x.shape[:-1], self.n_dims), generator=generator, device=x.device, dtype=x.dtype)
        feat = torch.randn((*x.shape[:-1], x.shape[-1] - self.n_dims), generator=generator, device=x.device,
                           dtype=x.dtype)
        z = torch.cat([pos, feat], -1)
        if mask is not None:
            z = z * mask.unsqueeze(-1).to(x.dtype)
        return self.project(z, mask)


# ------------------------------------------------------------------------------------------------ network
def pair_geometry(x: Tensor, norm_constant: float) -> tuple[Tensor, Tensor]:
    """(r_ij = |x_i - x_j|^2 [B, N, N, 1], d_ij / (sqrt(r_ij + 1e-8) + c) [B, N, N, 3])."""
    diff = x.unsqueeze(2) - x.unsqueeze(1)
    r2 = diff.pow(2).sum(-1, keepdim=True)
    return r2, diff / ((r2 + 1e-8).sqrt() + norm_constant)


def sinusoid_frequencies(max_res: float = 15.0, min_res: float = 15.0 / 2000.0, base: int = 4) -> Tensor:
    """EDM's distance frequencies 2 pi base^k / max_res, k = 0 .. floor(log_base(max_res / min_res))."""
    n = int(math.log(max_res / min_res, base)) + 1
    return 2 * math.pi * base ** torch.arange(n) / max_res


def distance_features(r2: Tensor, frequencies: Tensor | None) -> Tensor:
    """r^2 itself, or [sin, cos](sqrt(r^2 + 1e-8) f_k) with ``frequencies`` (EDM's sin_embedding)."""
    if frequencies is None:
        return r2
    arg = (r2 + 1e-8).sqrt() * frequencies.to(r2)
    return torch.cat([arg.sin(), arg.cos()], -1)


def pairs(h: Tensor, edge: Tensor) -> Tensor:
    """[h_i, h_j, e_ij] for every ordered pair: [B, N, N, 2F + E]."""
    n = h.shape[1]
    return torch.cat([h.unsqueeze(2).expand(-1, -1, n, -1), h.unsqueeze(1).expand(-1, n, -1, -1), edge], -1)


class MessageUpdate(nn.Module):
    """h_i <- h_i + phi_h(h_i, sum_j pair_ij m_ij / Z), m_ij = phi_e(h_i, h_j, e_ij) (gated by attention)."""

    def __init__(self, hidden: int, edge_features: int, attention: bool, normalization_factor: float) -> None:
        super().__init__()
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + edge_features, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if attention:
            self.att_mlp = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.attention = attention
        self.normalization_factor = normalization_factor

    def forward(self, h: Tensor, edge: Tensor, pair: Tensor, node: Tensor) -> Tensor:
        m = self.edge_mlp(pairs(h, edge))
        if self.attention:
            m = m * self.att_mlp(m)
        agg = (m * pair).sum(2) / self.normalization_factor
        return (h + self.node_mlp(torch.cat([h, agg], -1))) * node


class PositionUpdate(nn.Module):
    """x_i <- x_i + sum_j pair_ij u_ij w_ij / Z, u_ij = d_ij / (|d_ij| + c), w_ij = tanh(phi_x(h_i, h_j, e_ij)) R
    (or phi_x itself without tanh); phi_x's last layer starts near zero (Xavier, gain 1e-3)."""

    def __init__(self, hidden: int, edge_features: int, tanh: bool, normalization_factor: float) -> None:
        super().__init__()
        last = nn.Linear(hidden, 1, bias=False)  # created first, as EDM does: a seed then gives EDM's weights
        nn.init.xavier_uniform_(last.weight, gain=0.001)
        self.coord_mlp = nn.Sequential(nn.Linear(2 * hidden + edge_features, hidden), nn.SiLU(),
                                       nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.tanh = tanh
        self.normalization_factor = normalization_factor

    def forward(self, h: Tensor, x: Tensor, unit: Tensor, edge: Tensor, pair: Tensor, node: Tensor) -> Tensor:
        w = self.coord_mlp(pairs(h, edge))
        if self.tanh:
            w = torch.tanh(w) * COORDS_RANGE
        return (x + (unit * w * pair).sum(2) / self.normalization_factor) * node


class EquivariantBlock(nn.Module):
    """``sublayers`` message updates then one position update, on edge features [f(r_ij), f(r0_ij)]."""

    def __init__(self, config: EDMConfig, edge_features: int) -> None:
        super().__init__()
        for k in range(config.sublayers):
            self.add_module(f"gcl_{k}", MessageUpdate(config.hidden, edge_features, config.attention,
                                                      config.normalization_factor))
        self.gcl_equiv = PositionUpdate(config.hidden, edge_features, config.tanh, config.normalization_factor)
        self.sublayers = config.sublayers
        self.norm_constant = config.norm_constant

    def forward(self, h: Tensor, x: Tensor, r0: Tensor, pair: Tensor, node: Tensor,
                frequencies: Tensor | None) -> tuple[Tensor, Tensor]:
        r2, unit = pair_geometry(x, self.norm_constant)
        edge = torch.cat([distance_features(r2, frequencies), r0], -1)
        for k in range(self.sublayers):
            h = getattr(self, f"gcl_{k}")(h, edge, pair, node)
        return h * node, self.gcl_equiv(h, x, unit, edge, pair, node)


class EDMEGNN(nn.Module):
    """EDM's EGNN on dense masked batches: h [B, N, F_in], x [B, N, 3] -> (h [B, N, F_out], x [B, N, 3])."""

    def __init__(self, config: EDMConfig, in_width: int, out_width: int) -> None:
        super().__init__()
        self.embedding = nn.Linear(in_width, config.hidden)
        self.embedding_out = nn.Linear(config.hidden, out_width)
        self.register_buffer("frequencies", sinusoid_frequencies() if config.sin_embedding else None,
                             persistent=False)
        edge_features = 2 * (2 * len(self.frequencies) if config.sin_embedding else 1)
        for k in range(config.layers):
            self.add_module(f"e_block_{k}", EquivariantBlock(config, edge_features))
        self.layers = config.layers

    def forward(self, h: Tensor, x: Tensor, pair: Tensor, node: Tensor) -> tuple[Tensor, Tensor]:
        r0 = distance_features(pair_geometry(x, 1.0)[0], self.frequencies)
        h = self.embedding(h)
        for k in range(self.layers):
            h, x = getattr(self, f"e_block_{k}")(h, x, r0, pair, node, self.frequencies)
        return self.embedding_out(h) * node, x


def masks(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(node mask [B, N, 1], pair mask [B, N, N, 1]: both atoms real and distinct), as ``dtype``."""
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    pair = mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye
    return mask.unsqueeze(-1).to(dtype), pair.unsqueeze(-1).to(dtype)


def masked_centre(v: Tensor, mask: Tensor) -> Tensor:
    """v minus its mean over real atoms, zero at padding (``mask`` [B, N, 1] float)."""
    mean = (v * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1.0)
    return (v - mean) * mask


class EDMDenoiser(nn.Module):
    """``model(x_t, t, mask=...) -> eps`` of an EDM QM9 model (layout and network in the module docstring).

    ``t`` [B] (or a scalar) in [0, 1] is fed to the network as EDM does (its time channel, t = i / T on EDM's grid);
    ``mask`` bool [B, N] marks real atoms (None: all). Padded atoms get eps = 0 and never influence real ones.
    ``schedule`` is EDM's (``EDMPolynomial``); ``n_features``, ``atom_types`` and ``decode_types`` follow
    ``MoleculeDenoiser``, so ``molgen.molecules.sampling.sample_molecules`` accepts this model."""

    prediction = "eps"

    def __init__(self, config: EDMConfig = EDMConfig()) -> None:
        super().__init__()
        self.config = config
        width = config.n_features - 3 + 1  # features and time
        self.egnn = EDMEGNN(config, width, width)
        self.schedule = EDMPolynomial(timesteps=config.timesteps, power=config.power, precision=config.precision)
        self.atom_types = config.atom_types
        self.n_features = config.n_features

    def forward(self, x_t: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, n, _ = x_t.shape
        if mask is None:
            mask = torch.ones(batch, n, dtype=torch.bool, device=x_t.device)
        node, pair = masks(mask, x_t.dtype)
        x_t = x_t * node
        time = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).reshape(-1, 1, 1).expand(batch, n, 1)
        h, x = self.egnn(torch.cat([x_t[..., 3:], time], -1), x_t[..., :3], pair, node)
        return torch.cat([masked_centre((x - x_t[..., :3]) * node, node), h[..., :-1]], -1)

    def decode_types(self, x: Tensor) -> Tensor:
        """Type indices from a state's one-hot channels (argmax)."""
        return x[..., 3 : 3 + len(self.atom_types)].argmax(-1)


class GeoLDMDecoder(nn.Module):
    """GeoLDM's decoder: latent z [B, N, 3 + L] -> atoms [B, N, 3 + K (+ 1)] in EDM's normalised layout, by an EGNN
    without a time channel; positions are its output positions x_L centred over real atoms, features W_out h_L."""

    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        self.egnn = EDMEGNN(config, config.latent_nf, config.atom_features)

    def forward(self, z: Tensor, mask: Tensor) -> Tensor:
        node, pair = masks(mask, z.dtype)
        z = z * node
        h, x = self.egnn(z[..., 3:], z[..., :3], pair, node)
        return torch.cat([masked_centre(x * node, node), h], -1)


class GeoLDM(nn.Module):
    """GeoLDM (Xu et al. 2023): ``denoiser``, an ``EDMDenoiser`` on the latent state [B, N, 3 + L], and its
    ``decoder`` to atoms. Sample latents with any engine solver, then ``decode`` them. The decoder is created first,
    as GeoLDM creates its autoencoder before its diffusion network."""

    def __init__(self, config: EDMConfig) -> None:
        super().__init__()
        if config.latent_nf < 1:
            raise ValueError(f"GeoLDM needs latent_nf >= 1, got {config.latent_nf}")
        self.decoder = GeoLDMDecoder(config)
        self.denoiser = EDMDenoiser(config)
        self.atom_types = config.atom_types

    def decode(self, z: Tensor, mask: Tensor) -> Tensor:
        """Atoms [B, N, 3 + K (+ 1)] of latent states [B, N, 3 + L] (e.g. the engine's final x0 estimate)."""
        return self.decoder(z, mask)

    def decode_types(self, atoms: Tensor) -> Tensor:
        """Type indices of decoded atoms (argmax of the one-hot channels)."""
        return atoms[..., 3 : 3 + len(self.atom_types)].argmax(-1)


# ------------------------------------------------------------------------------------------------ loading
def check_gamma(weights: Mapping[str, Tensor], schedule: EDMPolynomial, file: str | None) -> None:
    """The checkpoint's own gamma table (``gamma.gamma``) must be the schedule's, to float32 round-off."""
    stored = weights.get("gamma.gamma")
    if stored is None:
        raise ArchitectureMismatchError(["gamma.gamma"], [], [], file)
    ours = gamma_table(schedule.timesteps, schedule.power, schedule.precision)
    if stored.shape != ours.shape or not torch.allclose(stored.double(), ours, rtol=1e-6, atol=1e-5):
        raise EDMCheckpointError("the checkpoint's noise schedule (gamma.gamma) is not the one args.pickle names",
                                 file)


def split_weights(weights: Mapping[str, Tensor], parts: Mapping[str, nn.Module], ignored: tuple[str, ...],
                  file: str | None) -> dict[str, dict[str, Tensor]]:
    """Each part's tensors of a checkpoint state dict (its key prefix removed), checked key by key and shape by
    shape against its module. Keys outside the parts, ``gamma.gamma``, ``buffer`` and the ``ignored`` prefixes are
    unexpected; every name in the error is the checkpoint's."""
    found, missing, shapes = {}, [], []
    for prefix, module in parts.items():
        ours = module.state_dict()
        theirs = found[prefix] = {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        missing += [prefix + k for k in sorted(set(ours) - set(theirs))]
        shapes += [f"{prefix}{k}: {tuple(theirs[k].shape)} != {tuple(ours[k].shape)}"
                   for k in sorted(set(ours) & set(theirs)) if theirs[k].shape != ours[k].shape]
    known = {prefix + k for prefix, module in parts.items() for k in module.state_dict()}
    unexpected = sorted(k for k in weights if k not in known and k not in ("gamma.gamma", "buffer")
                        and not k.startswith(ignored))
    if missing or unexpected or shapes:
        raise ArchitectureMismatchError(missing, unexpected, shapes, file)
    return found


def read_folder(folder: str | Path, map_location: str | torch.device) -> tuple[EDMConfig, dict[str, Tensor], str]:
    """(config, state dict, weights path) of an EDM or GeoLDM folder, both read without running code."""
    folder = Path(folder)
    args_path, weights_path = folder / ARGS_FILE, folder / WEIGHTS_FILE
    for path in (args_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (an EDM folder holds {ARGS_FILE} and {WEIGHTS_FILE})")
    config = config_from_args(read_args(args_path), str(args_path))
    try:
        weights = torch.load(weights_path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise EDMCheckpointError(f"not a plain state dict: {err}", str(weights_path)) from None
    if not isinstance(weights, Mapping):
        raise EDMCheckpointError(f"expected a state dict, got {type(weights).__name__}", str(weights_path))
    return config, weights, str(weights_path)


def load_edm(folder: str | Path, map_location: str | torch.device = "cpu") -> EDMDenoiser:
    """The EDM model in ``folder`` (``args.pickle`` + ``generative_model_ema.npy``), in eval mode.

    The arguments are read with an allow-list unpickler (``UnsafePickleError`` names any other global; nothing is
    executed), the weights with ``torch.load(weights_only=True)``; unsupported settings raise
    ``EDMCheckpointError``, weights of another architecture ``ArchitectureMismatchError``."""
    config, weights, file = read_folder(folder, map_location)
    if config.latent_nf:
        raise EDMCheckpointError("a GeoLDM model (latent_nf in args.pickle): load it with load_geoldm", file)
    model = EDMDenoiser(config)
    check_gamma(weights, model.schedule, file)
    model.load_state_dict(split_weights(weights, {"dynamics.": model}, (), file)["dynamics."])
    return model.eval()


def load_geoldm(folder: str | Path, map_location: str | torch.device = "cpu") -> GeoLDM:
    """The GeoLDM model in ``folder`` (latent diffusion and decoder; the encoder is not needed to sample and is
    not loaded), in eval mode, read and checked as ``load_edm`` does."""
    config, weights, file = read_folder(folder, map_location)
    if not config.latent_nf:
        raise EDMCheckpointError("an EDM model (no latent_nf in args.pickle): load it with load_edm", file)
    model = GeoLDM(config)
    check_gamma(weights, model.denoiser.schedule, file)
    found = split_weights(weights, {"dynamics.": model.denoiser, "vae.decoder.": model.decoder},
                          ("vae.encoder.", "vae.buffer"), file)
    model.denoiser.load_state_dict(found["dynamics."])
    model.decoder.load_state_dict(found["vae.decoder."])
    return model.eval()
