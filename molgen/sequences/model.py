"""Bidirectional transformer denoiser for masked diffusion: ``model(x_t, t, labels=None, partners=None) -> logits``.

With ``pair_conditioning`` the denoiser reads a target secondary structure: ``partners[b, i] = j`` when i pairs
with j, ``UNPAIRED`` (-1) when i is unpaired, ``UNSPECIFIED`` (-2) when the structure says nothing about i
(classifier-free dropout, or a partial constraint). Each position's structural state is embedded, and after
every block a position adds a learned map of its partner's features, ``h_i += W_k LN(h_{p(i)})``, so that the
two ends of a pair see each other from the first layer whatever their distance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class DenoiserConfig:
    """Sizes of the denoiser; ``n_classes`` > 0 adds label conditioning with a null label ``n_classes``."""

    n_tokens: int
    vocab_size: int
    pad_id: int
    max_length: int
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 256
    conv_dilations: tuple[int, ...] = ()
    kernel_size: int = 5
    dropout: float = 0.0
    n_classes: int = 0
    time_conditioning: bool = False
    pair_conditioning: bool = False

    def __post_init__(self):
        self.conv_dilations = tuple(self.conv_dilations)

    def to_dict(self) -> dict:
        return {**asdict(self), "conv_dilations": list(self.conv_dilations)}


UNPAIRED, UNSPECIFIED = -1, -2  # the non-partner values of ``partners``


def structure_states(partners: torch.Tensor) -> torch.Tensor:
    """States 0 unpaired, 1 opens a pair (partner to the right), 2 closes one, 3 unspecified, [B, L]."""
    pos = torch.arange(partners.shape[1], device=partners.device)[None, :]
    opens = torch.where(partners > pos, 1, 2)
    return torch.where(partners == UNPAIRED, 0, torch.where(partners == UNSPECIFIED, 3, opens))


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Features of t in [0, 1]: ``[sin(1000 t w_k), cos(1000 t w_k)]``, ``w_k = 1e4^(-k/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(1e4) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class DilatedConvBlock(nn.Module):
    """Pre-norm residual block ``h + W2 gelu(conv_d(LN(h)))``; padded positions are zeroed before the conv,
    so outputs at real positions do not depend on how much padding follows."""

    def __init__(self, d_model: int, kernel_size: int, dilation: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, dilation=dilation, padding="same")
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        z = self.norm(h) * keep[..., None]
        z = self.conv(z.transpose(1, 2)).transpose(1, 2)
        return h + self.out(nn.functional.gelu(z))


class SequenceDenoiser(nn.Module):
    """Token + position (+ label, + time) embeddings -> dilated conv blocks (local context from the first
    step) -> pre-norm transformer layers (long range, e.g. RNA pairing) -> logits over K letters.

    Padding tokens are zeroed for the convolutions and excluded as attention keys, so outputs at real
    positions do not depend on how much padding follows. Without time conditioning (the default) the
    denoiser is time-agnostic, which MDLM shows suffices for masked diffusion; cached sampling is then exact.
    """

    prediction = "x0_logits"

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        c = self.config = config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_length, c.d_model)
        self.label = nn.Embedding(c.n_classes + 1, c.d_model) if c.n_classes > 0 else None
        self.time = (
            nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
            if c.time_conditioning
            else None
        )
        self.convs = nn.ModuleList(DilatedConvBlock(c.d_model, c.kernel_size, d) for d in c.conv_dilations)
        n_blocks = len(c.conv_dilations) + c.n_layers
        self.state = nn.Embedding(4, c.d_model) if c.pair_conditioning else None
        self.pair_norms = nn.ModuleList(nn.LayerNorm(c.d_model) for _ in range(n_blocks if c.pair_conditioning else 0))
        self.pair_maps = nn.ModuleList(nn.Linear(c.d_model, c.d_model) for _ in range(len(self.pair_norms)))
        layer = nn.TransformerEncoderLayer(
            c.d_model, c.n_heads, c.d_ff, c.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = (
            nn.TransformerEncoder(layer, c.n_layers, enable_nested_tensor=False) if c.n_layers > 0 else None
        )
        self.norm = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.n_tokens)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        partners: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, K]; ``partners`` is read by a pair-conditioned denoiser and ignored by others."""
        c = self.config
        if x_t.shape[1] > c.max_length:
            raise ValueError(f"sequence length {x_t.shape[1]} exceeds the model's maximum {c.max_length}")
        h = self.tok(x_t) + self.pos(torch.arange(x_t.shape[1], device=x_t.device))[None]
        if self.label is not None:
            if labels is None:
                labels = torch.full((len(x_t),), c.n_classes, dtype=torch.long, device=x_t.device)
            if int(labels.min()) < 0 or int(labels.max()) > c.n_classes:
                raise ValueError(f"labels must lie in [0, {c.n_classes}] ({c.n_classes} = unconditional)")
            h = h + self.label(labels)[:, None, :]
        if self.time is not None:
            h = h + self.time(time_features(t, c.d_model))[:, None, :]
        pad = x_t == c.pad_id
        if self.state is not None:
            if partners is None:
                partners = torch.full_like(x_t, UNSPECIFIED)
            if partners.shape != x_t.shape or int(partners.max()) >= x_t.shape[1]:
                raise ValueError(f"partners {tuple(partners.shape)} must match the tokens {tuple(x_t.shape)}")
            h = h + self.state(structure_states(partners))
        blocks = [*self.convs, *(self.encoder.layers if self.encoder is not None else [])]
        for k, block in enumerate(blocks):
            h = block(h, (~pad).float()) if k < len(self.convs) else block(h, src_key_padding_mask=pad)
            if self.state is not None:
                h = self._exchange(h, partners, k)
        return self.head(self.norm(h))

    def _exchange(self, h: torch.Tensor, partners: torch.Tensor, k: int) -> torch.Tensor:
        """``h_i + W_k LN(h_{p(i)})`` at paired positions."""
        idx = partners.clamp(min=0)[..., None].expand_as(h)
        mate = self.pair_maps[k](self.pair_norms[k](h.gather(1, idx)))
        return h + mate * (partners >= 0)[..., None]


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
