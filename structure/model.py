"""SE(3)-equivariant EGNN denoiser over CA coordinates with EDM preconditioning.

The state is the CA trace ``x`` [B, N, 3] in Angstrom with zero centre of mass over the unmasked residues.
Given the noise level sigma (from the engine's schedule: ``sigma = schedule.sigma(t) / schedule.alpha(t)``
after dividing ``x`` by alpha), the denoiser is EDM-preconditioned:

    D(x; sigma) = c_skip x + c_out Delta(s_d c_in x; c_noise),   c_skip = s_d^2 / (sigma^2 + s_d^2),
    c_out = sigma / sqrt(sigma^2 + 1 A^2),  c_in = 1 / sqrt(sigma^2 + s_d^2),  c_noise = ln(sigma) / 4,

with ``Delta`` the displacement (Angstrom) an EGNN (Satorras et al. 2021) applies to the points
``s_d c_in x``, which are Angstrom at low noise and shrunk to the data scale s_d at high noise. c_out is EDM's
with a 1 A scale: corrections vanish as sigma -> 0 (so a sloppy network cannot spoil an almost clean chain),
and at sigma >> 1 A the EGNN moves points by the Angstrom amounts it needs. (EDM's s_d-scaled c_out with a
unit F would ask the EGNN for s_d-times larger moves than the corrections it makes, which its
distance-weighted updates learn slowly.) Messages see both nodes' features,
radial basis functions of their distance and an embedding of the residue-index offset j - i (clipped to
+-32), and (``bond_feature``) for sequence neighbours the bond's deviation in noise units,
z = (d - 3.80 A) / sqrt(sigma^2 + (0.05 A)^2), so that a correction proportional to it is easy to learn.
Node features include cos/sin of the virtual CA dihedral (i-1, i, i+1, i+2), a pseudo-scalar: the
network is equivariant to rotations and translations but not to reflections, so it can learn right-handed
helices.

Secondary-structure conditioning (``ss_condition``): a per-residue label (coil, helix, strand, or not given)
and the chain's composition (fractions of coil, helix, strand, and whether it is given) are embedded and
added to the node features; both embeddings start at zero, so a warm start computes the unconditional
function at step 0. Training drops them at random (classifier-free), so one network serves unconditional,
composition-only and per-residue requests.

Self-conditioning (``self_condition``, Chen et al. 2022): the denoiser may be given its own previous estimate
x0' (``self_cond``; the sampler passes it, ``molgen.diffusion.sampling.SELF_COND``). Radial basis functions of
its CA distances enter every layer's messages (and the pair track's input), its virtual dihedrals the node
features, all through zero-initialised projections; without an estimate these terms are zero, which is also
how training (half its batches without one) teaches the unconditioned function.

Pair track (``pair_dim`` > 0): relative-position and distance features of the noisy CA positions refined by
``pair_blocks`` pairs of triangle multiplicative updates (``structure.pair``), read by every layer's messages
through zero-initialised projections (a warm start keeps its function).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from molgen.geometry import centre
from molgen.structure.pair import PAIR_RBF_RANGE, PairTrack, radial_basis
from molgen.structure.sse import SS_STATES, UNKNOWN_SS

FINE_RANGE = (2.0, 8.0)  # Angstrom: consecutive CA-CA 3.8, i..i+2 5-7.2, helix i..i+3 5.0
CA_CA = 3.80  # Angstrom, the trans peptide's CA-CA distance
SC_RBF = 24  # radial basis functions of the self-conditioning estimate's distances, over PAIR_RBF_RANGE
BOND_NOISE_FLOOR = 0.05  # Angstrom: the bond feature (d - 3.8) / sqrt(sigma^2 + floor^2) stays finite at sigma 0


@dataclass(frozen=True)
class ModelConfig:
    hidden: int = 64
    layers: int = 4
    rbf: int = 12
    rbf_max: float = 20.0
    max_offset: int = 32
    sigma_data: float = 10.0
    fine_rbf: int = 0
    local_coord: int = 0
    bond_feature: bool = False
    ss_condition: bool = False
    pair_dim: int = 0
    pair_blocks: int = 2
    self_condition: bool = False
    min_length: int = 40
    max_length: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


def safe_norm(v: Tensor, eps: float = 1e-8) -> Tensor:
    """|v| over the last axis with a finite gradient at v = 0: sqrt(|v|^2 + eps)."""
    return torch.sqrt((v**2).sum(-1) + eps)


def ca_dihedral_features(x: Tensor, mask: Tensor) -> Tensor:
    """[B, N, 2] cos and sin of the virtual dihedral (i-1, i, i+1, i+2) at residue i (0 where undefined)."""
    b1, b2, b3 = x[:, 1:-2] - x[:, :-3], x[:, 2:-1] - x[:, 1:-2], x[:, 3:] - x[:, 2:-1]
    n1, n2 = torch.cross(b1, b2, dim=-1), torch.cross(b2, b3, dim=-1)
    y = (b1 * n2).sum(-1) * safe_norm(b2)  # atan2(|b2| b1.(b2 x b3), (b1 x b2).(b2 x b3))
    xx = (n1 * n2).sum(-1)
    r = torch.sqrt(xx**2 + y**2 + 1e-8)
    feats = torch.stack([xx / r, y / r], dim=-1)  # [B, N-3, 2]
    valid = (mask[:, :-3] & mask[:, 1:-2] & mask[:, 2:-1] & mask[:, 3:]).to(x.dtype)[..., None]
    out = torch.zeros(*x.shape[:2], 2, dtype=x.dtype, device=x.device)
    out[:, 1:-2] = feats * valid
    return out


class EGNNLayer(nn.Module):
    """Dense masked EGNN layer: m_ij = phi_m(h_i, h_j, rbf(d_ij), e_ij); x_i += sum_j (x_i - x_j)/(d_ij + 1)
    phi_x(m_ij) / sqrt(n);  h_i += phi_h(h_i, sum_j m_ij / n, dihedral_i)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.src, self.dst = nn.Linear(h, h), nn.Linear(h, h, bias=False)
        self.offset = nn.Embedding(2 * cfg.max_offset + 1, h)  # residue-index offset j - i, clipped
        self.rbf = nn.Linear(cfg.rbf, h, bias=False)
        self.fine = None
        if cfg.fine_rbf:  # narrow radial basis over 2-8 A, zero-initialised (warm starts keep their function)
            self.fine = nn.Linear(cfg.fine_rbf, h, bias=False)
            nn.init.zeros_(self.fine.weight)
            self.register_buffer("fine_centers", torch.linspace(*FINE_RANGE, cfg.fine_rbf), persistent=False)
            self.fine_width = (FINE_RANGE[1] - FINE_RANGE[0]) / (cfg.fine_rbf - 1)
        self.msg = nn.Sequential(nn.SiLU(), nn.Linear(h, h), nn.SiLU())
        self.coord = nn.Linear(h, 1, bias=False)
        nn.init.xavier_uniform_(self.coord.weight, gain=1e-3)
        self.local_coord = cfg.local_coord
        if cfg.local_coord:  # un-normalised updates from sequence neighbours |i - j| <= local_coord, zero-initialised
            self.coord_local = nn.Linear(h, 1, bias=False)
            nn.init.zeros_(self.coord_local.weight)
        self.bond = None
        if cfg.bond_feature:  # noise-scaled CA-CA bond deviation of sequence neighbours, zero-initialised
            self.bond = nn.Linear(1, h, bias=False)
            nn.init.zeros_(self.bond.weight)
        self.node = nn.Sequential(nn.Linear(2 * h + 2, h), nn.SiLU(), nn.Linear(h, h))
        self.norm = nn.LayerNorm(h)
        self.register_buffer("centers", torch.linspace(0.0, cfg.rbf_max, cfg.rbf), persistent=False)
        self.width = cfg.rbf_max / cfg.rbf

    def forward(self, h: Tensor, x: Tensor, offset: Tensor, mask: Tensor, pair: Tensor,
                near: Tensor | None, bonded: Tensor | None = None,
                pair_term: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``pair`` [B, N, N]: real pairs i != j; ``near`` [B, N, N, 1]: those with |i - j| <= local_coord (or
        None); ``bonded`` [B, N, N, 1]: 1 / sqrt(sigma^2 + floor^2) on sequence neighbours |i - j| = 1, else 0
        (or None); ``pair_term`` [B, N, N, H]: the pair track's term for this layer (or None). All but
        ``pair_term`` are the same for every layer and built once by the model."""
        diff = x[:, :, None] - x[:, None, :]  # [B, N, N, 3]
        d = safe_norm(diff)
        rbf = torch.exp(-(((d[..., None] - self.centers) / self.width) ** 2))
        pre = self.src(h)[:, :, None] + self.dst(h)[:, None, :] + self.offset(offset) + self.rbf(rbf)
        if self.fine is not None:
            pre = pre + self.fine(torch.exp(-(((d[..., None] - self.fine_centers) / self.fine_width) ** 2)))
        if self.bond is not None:  # z = (d - 3.8) / sqrt(sigma^2 + floor^2): how far a bond is off, in noise units
            pre = pre + self.bond(((d[..., None] - CA_CA) * bonded).clamp(-5.0, 5.0))
        if pair_term is not None:
            pre = pre + pair_term
        m = self.msg(pre)
        m = m * pair[..., None]
        count = pair.sum(-1, keepdim=True).clamp_min(1.0)  # [B, N, 1]
        direction = diff / (d[..., None] + 1.0)
        update = (direction * self.coord(m)).sum(2) / torch.sqrt(count)
        if near is not None:
            update = update + (direction * self.coord_local(m) * near).sum(2)
        x = x + update
        agg = m.sum(2) / count
        h = h + self.node(torch.cat([self.norm(h), agg, ca_dihedral_features(x, mask)], dim=-1))
        return h, x


class BackboneDenoiser(nn.Module):
    """x0-predicting denoiser ``model(x_t, t, mask=None, residue_index=None) -> x0`` for the engine.

    ``schedule`` maps engine times t to (alpha, sigma); without one, call ``denoise(x, sigma, ...)`` directly.
    """

    prediction = "x0"

    @property
    def self_conditioning(self) -> bool:
        """The sampler passes the previous denoised estimate as ``self_cond``."""
        return self.cfg.self_condition

    def __init__(self, cfg: ModelConfig = ModelConfig(), schedule=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.schedule = schedule
        h = cfg.hidden
        self.time = nn.Sequential(nn.Linear(16, h), nn.SiLU(), nn.Linear(h, h))
        self.embed = nn.Linear(h + 3, h)
        self.layers = nn.ModuleList(EGNNLayer(cfg) for _ in range(cfg.layers))
        if cfg.ss_condition:  # zero-initialised: a warm start keeps its unconditional function
            self.ss_residue = nn.Embedding(UNKNOWN_SS + 1, h)
            self.ss_chain = nn.Linear(len(SS_STATES) + 1, h, bias=False)
            nn.init.zeros_(self.ss_residue.weight)
            nn.init.zeros_(self.ss_chain.weight)
        self.pair = None
        if cfg.pair_dim:
            self.pair = PairTrack(cfg.pair_dim, cfg.pair_blocks, h, cfg.layers, cfg.max_offset)
        if cfg.self_condition:  # zero-initialised: a warm start keeps its function
            self.sc_message = nn.Linear(SC_RBF, h, bias=False)
            self.sc_node = nn.Linear(2, h, bias=False)
            nn.init.zeros_(self.sc_message.weight)
            nn.init.zeros_(self.sc_node.weight)
            if self.pair is not None:
                self.sc_pair = nn.Linear(SC_RBF, cfg.pair_dim, bias=False)
                nn.init.zeros_(self.sc_pair.weight)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), 8)), persistent=False)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        mask: Tensor | None = None,
        residue_index: Tensor | None = None,
        ss: Tensor | None = None,
        composition: Tensor | None = None,
        self_cond: Tensor | None = None,
        **_: object,
    ) -> Tensor:
        if self.schedule is None:
            raise ValueError("BackboneDenoiser needs a schedule to map times t to noise levels; use denoise()")
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        return self.denoise(x_t / alpha[:, None, None], sigma / alpha, mask, residue_index, ss, composition, self_cond)

    def denoise(
        self,
        x: Tensor,
        sigma: Tensor,
        mask: Tensor | None = None,
        residue_index: Tensor | None = None,
        ss: Tensor | None = None,
        composition: Tensor | None = None,
        self_cond: Tensor | None = None,
    ) -> Tensor:
        """EDM denoiser D(x; sigma) for a VE state x = x0 + sigma eps; x [B, N, 3], sigma [B].

        ``ss`` [B, N] labels (0 coil, 1 helix, 2 strand, ``UNKNOWN_SS`` not given) and ``composition``
        [B, 3] fractions (coil, helix, strand; a NaN row is not given) condition a model with
        ``ss_condition``; None means not given. ``self_cond`` [B, N, 3]: the previous estimate of x0 (Angstrom)
        for a model with ``self_condition``, or None."""
        b, n, _ = x.shape
        mask = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if residue_index is None:
            residue_index = torch.arange(n, device=x.device).expand(b, n)
        sd = self.cfg.sigma_data
        sigma = sigma.to(x.dtype).reshape(b, 1, 1)
        c_in = 1.0 / torch.sqrt(sigma**2 + sd**2)
        c_skip, c_out = sd**2 * c_in**2, sigma / torch.sqrt(sigma**2 + 1.0)
        x = centre(x, mask)
        pos = x * c_in * sd
        noise = torch.log(sigma.reshape(b, 1)) / 4.0
        ang = noise * self.freqs
        temb = self.time(torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1))  # [B, H]
        length = mask.sum(1, keepdim=True).to(x.dtype)
        node = torch.cat(
            [
                temb[:, None].expand(b, n, -1),
                ca_dihedral_features(pos, mask),
                (torch.log(length) / 5.0)[:, :, None].expand(b, n, 1),
            ],
            dim=-1,
        )
        h = self.embed(node)
        if self.cfg.ss_condition:
            h = h + self.ss_features(ss, composition, b, n, x)
        elif ss is not None or composition is not None:
            raise ValueError("this backbone model has no secondary-structure conditioning (ss_condition)")
        rel = residue_index[:, None, :] - residue_index[:, :, None]
        off = self.cfg.max_offset
        offset = rel.clamp(-off, off) + off
        pair = (mask[:, :, None] & mask[:, None, :]).to(x.dtype)
        pair = pair * (1 - torch.eye(n, dtype=x.dtype, device=x.device))
        near = None
        if self.cfg.local_coord:
            near = ((rel.abs() <= self.cfg.local_coord).to(x.dtype) * pair)[..., None]
        bonded = None
        if self.cfg.bond_feature:
            bonded = ((rel.abs() == 1).to(x.dtype) * pair)[..., None] / torch.sqrt(
                sigma**2 + BOND_NOISE_FLOOR**2)[..., None]
        sc_rbf = None
        if self_cond is not None:
            if not self.cfg.self_condition:
                raise ValueError("this backbone model has no self-conditioning (self_condition)")
            self_cond = centre(self_cond.to(x.dtype), mask)
            sc_rbf = radial_basis(self_cond, SC_RBF, *PAIR_RBF_RANGE)
            h = h + self.sc_node(ca_dihedral_features(self_cond, mask))
        if self.pair is None:
            terms = [None] * len(self.layers)
        else:
            extra = None if sc_rbf is None else self.sc_pair(sc_rbf)
            terms = self.pair(pos, temb, offset, pair, extra)
        if sc_rbf is not None:
            sc_term = self.sc_message(sc_rbf)
            terms = [sc_term if term is None else term + sc_term for term in terms]
        out = pos
        for layer, term in zip(self.layers, terms):
            h, out = layer(h, out, offset, mask, pair, near, bonded, term)
        return centre(c_skip * x + c_out * (out - pos), mask)

    def ss_features(self, ss: Tensor | None, composition: Tensor | None, b: int, n: int, x: Tensor) -> Tensor:
        """[B, N, H] embedding of per-residue labels plus [B, 1, H] of the composition (see ``denoise``)."""
        if ss is None:
            ss = torch.full((b, n), UNKNOWN_SS, dtype=torch.long, device=x.device)
        if composition is None:
            composition = torch.full((b, len(SS_STATES)), math.nan, dtype=x.dtype, device=x.device)
        given = torch.isfinite(composition).all(-1, keepdim=True)
        chain = torch.cat([torch.where(given, composition, 0.0).to(x.dtype), given.to(x.dtype)], dim=-1)
        return self.ss_residue(ss.long()) + self.ss_chain(chain)[:, None]
