"""Small inline-SVG plots for the campaign report (no plotting library, no network): per-round distributions,
a scatter with a Pareto front, a CA trace and a contact map."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

PALETTE = ("#3b528b", "#21918c", "#5ec962", "#e1a600", "#d1495b", "#7b2d8b", "#2a9df4", "#8c564b")
W, H = 440, 280
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 26, 42


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _range(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 0.5)
    return lo - pad, hi + pad


class Frame:
    """Data -> pixel mapping with axes, ticks and labels."""

    def __init__(self, xr: tuple[float, float], yr: tuple[float, float], title: str, xlabel: str, ylabel: str):
        self.xr, self.yr = xr, yr
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
                      f'role="img" aria-label="{escape(title)}">',
                      f'<rect width="{W}" height="{H}" fill="#fff"/>',
                      f'<text x="{LEFT}" y="16" class="t">{escape(title)}</text>',
                      f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle" class="l">'
                      f'{escape(xlabel)}</text>',
                      f'<text transform="translate(14,{(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle" '
                      f'class="l">{escape(ylabel)}</text>',
                      f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
                      'fill="none" stroke="#888"/>']

    def x(self, v: float) -> float:
        lo, hi = self.xr
        return LEFT + (v - lo) / (hi - lo) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        lo, hi = self.yr
        return H - BOTTOM - (v - lo) / (hi - lo) * (H - TOP - BOTTOM)

    def yticks(self) -> None:
        for t in _ticks(*self.yr):
            y = self.y(t)
            self.parts.append(f'<line x1="{LEFT - 4}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="k">{t:.3g}</text>')

    def xticks(self, labels: dict[float, str] | None = None) -> None:
        for t, text in (labels or {t: f"{t:.3g}" for t in _ticks(*self.xr)}).items():
            x = self.x(t)
            self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - BOTTOM}" y2="{H - BOTTOM + 4}" '
                              f'stroke="#888"/><text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" '
                              f'class="k">{escape(text)}</text>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def distributions(groups: dict[int, np.ndarray], title: str, ylabel: str) -> str:
    """One box (quartiles, median, 1.5 IQR whiskers) plus jittered points per round."""
    allv = np.concatenate([np.asarray(v, float) for v in groups.values()]) if groups else np.zeros(0)
    rounds = sorted(groups)
    f = Frame((0.4, len(rounds) + 0.6), _range(allv), title, "round", ylabel)
    f.yticks()
    f.xticks({k + 1.0: str(r) for k, r in enumerate(rounds)})
    rng = np.random.default_rng(0)
    for k, r in enumerate(rounds):
        v = np.asarray(groups[r], float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        c, cx = colour(k), f.x(k + 1.0)
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        lo = v[v >= q1 - 1.5 * (q3 - q1)].min()
        hi = v[v <= q3 + 1.5 * (q3 - q1)].max()
        half = 0.28 * (f.x(2.0) - f.x(1.0))
        f.parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{f.y(lo):.1f}" y2="{f.y(hi):.1f}" stroke="{c}"/>'
                       f'<rect x="{cx - half:.1f}" y="{f.y(q3):.1f}" width="{2 * half:.1f}" '
                       f'height="{max(f.y(q1) - f.y(q3), 0.5):.1f}" fill="{c}" fill-opacity="0.18" stroke="{c}"/>'
                       f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{f.y(med):.1f}" y2="{f.y(med):.1f}" '
                       f'stroke="{c}" stroke-width="2"/>')
        jitter = rng.uniform(-0.8, 0.8, v.size) * half
        f.parts += [f'<circle cx="{cx + j:.1f}" cy="{f.y(y):.1f}" r="2" fill="{c}" fill-opacity="0.6"/>'
                    for j, y in zip(jitter, v)]
    return f.svg()


def scatter(x: np.ndarray, y: np.ndarray, groups: Sequence[int], front: np.ndarray, chosen: np.ndarray,
            title: str, xlabel: str, ylabel: str) -> str:
    """Points coloured by round; the Pareto front (maximising both) as a red staircase, selected designs ringed."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    f = Frame(_range(x), _range(y), title, xlabel, ylabel)
    f.yticks()
    f.xticks()
    order = sorted(set(groups))
    for xi, yi, g in zip(x, y, groups):
        if np.isfinite(xi) and np.isfinite(yi):
            f.parts.append(f'<circle cx="{f.x(xi):.1f}" cy="{f.y(yi):.1f}" r="2.6" fill="{colour(order.index(g))}" '
                           'fill-opacity="0.55"/>')
    for xi, yi in zip(x[chosen], y[chosen]):
        if np.isfinite(xi) and np.isfinite(yi):
            f.parts.append(f'<circle cx="{f.x(xi):.1f}" cy="{f.y(yi):.1f}" r="5" fill="none" stroke="#111"/>')
    fx, fy = x[front], y[front]
    keep = np.isfinite(fx) & np.isfinite(fy)
    fx, fy = fx[keep], fy[keep]
    if fx.size:
        idx = np.argsort(fx)
        pts = []
        for k, i in enumerate(idx):
            if k:
                pts.append(f"{f.x(fx[i]):.1f},{f.y(fy[idx[k - 1]]):.1f}")
            pts.append(f"{f.x(fx[i]):.1f},{f.y(fy[i]):.1f}")
        f.parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#d1495b" stroke-width="1.5"/>')
        f.parts += [f'<circle cx="{f.x(a):.1f}" cy="{f.y(b):.1f}" r="3.2" fill="#d1495b"/>' for a, b in zip(fx, fy)]
    shown = order[:6]
    x0 = W - RIGHT - 34 * len(shown)
    legend = "".join(f'<circle cx="{x0 + 34 * k + 4}" cy="12" r="4" fill="{colour(k)}"/>'
                     f'<text x="{x0 + 34 * k + 11}" y="16" class="k">r{g}</text>'
                     for k, g in enumerate(shown))
    f.parts.append(legend)
    return f.svg()


def _principal_plane(ca: np.ndarray) -> np.ndarray:
    c = ca - ca.mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    return c @ vt[:2].T


def ca_trace(ca: np.ndarray, size: int = 200) -> str:
    """The CA trace projected on its two principal axes, coloured N (blue) to C (red) terminus."""
    p = _principal_plane(np.asarray(ca, float))
    span = float(np.abs(p).max()) or 1.0
    q = size / 2 + p / span * (size / 2 - 8)
    n = len(q)
    segs = []
    for i in range(n - 1):
        u = i / max(n - 2, 1)
        col = f"rgb({int(40 + 200 * u)},{int(80 + 40 * (1 - abs(2 * u - 1)))},{int(240 - 200 * u)})"
        segs.append(f'<line x1="{q[i, 0]:.1f}" y1="{q[i, 1]:.1f}" x2="{q[i + 1, 0]:.1f}" y2="{q[i + 1, 1]:.1f}" '
                    f'stroke="{col}" stroke-width="2" stroke-linecap="round"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            f'role="img" aria-label="CA trace"><rect width="{size}" height="{size}" fill="#fff" stroke="#ccc"/>'
            + "".join(segs) + "</svg>")


def contact_map(ca: np.ndarray, cutoff: float = 8.0, size: int = 200) -> str:
    """Residue pairs with CA-CA distance below ``cutoff`` Angstrom as dark cells."""
    ca = np.asarray(ca, float)
    n = len(ca)
    d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    cell = size / max(n, 1)
    ii, jj = np.nonzero(d < cutoff)
    rects = "".join(f'<rect x="{j * cell:.2f}" y="{i * cell:.2f}" width="{cell:.2f}" height="{cell:.2f}"/>'
                    for i, j in zip(ii, jj))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
            f'role="img" aria-label="contact map"><rect width="{size}" height="{size}" fill="#fff" stroke="#ccc"/>'
            f'<g fill="#3b528b">{rects}</g></svg>')
