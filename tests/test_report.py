"""The campaign report: self-contained HTML that renders in headless Chromium (screenshot, no console messages)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from molgen.campaign import Campaign, CampaignConfig
from molgen.campaign.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> Campaign:
    root = tmp_path_factory.mktemp("campaign")
    cfg = CampaignConfig.from_mapping({
        "name": "report test", "modality": "rna", "rounds": 2, "n_per_round": 6, "length": 12,
        "sampler": {"steps": 4},
        "rewards": [{"name": "target", "spec": "rna_target:((((....))))"}, {"name": "mfe", "spec": "rna_mfe"}],
        "guidance": {"method": "bon", "candidates": 2}, "selection": {"rule": "pareto", "k": 4},
        "refine": {"fraction": 0.5, "t": 0.5}})
    return Campaign(cfg, root).run()


def render_in_chromium(html: Path, png: Path) -> list[str]:
    """Screenshot ``html``; return Chromium's console-message lines (page errors, failed loads, logs)."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--window-size=1280,2000", f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def non_blank(png: Path) -> float:
    """Fraction of pixels that differ from the most common colour."""
    from PIL import Image

    a = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    _, counts = np.unique(a, axis=0, return_counts=True)
    return 1.0 - counts.max() / len(a)


def test_report_is_self_contained(campaign, tmp_path):
    c = campaign
    html = write_report(c, tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script|<link|@import|(src|href)=\"(https?:)?//", html, re.I)
    for section in ("Rounds", "Reward distributions per round", "Reward versus naturalness", "Best designs",
                    "Configuration", "checkpoint_sha256"):
        assert section in html
    assert html.count("<svg") == 5  # score, target, mfe, naturalness distributions + the scatter
    assert "mean naturalness" in html and "fine-tuning" in html
    best = c.selected().head(12)
    for seq in best["sequence"]:  # every selected design is shown with its MFE structure
        assert re.search(seq + r"\n[().]{12}</td>", html)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(campaign, tmp_path):
    # the console check can fail: a page that logs an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><script>console.error('broken')</script></body></html>")
    assert any("broken" in line for line in render_in_chromium(bad, tmp_path / "bad.png"))

    png = tmp_path / "report.png"
    assert render_in_chromium(write_report(campaign, tmp_path / "r.html"), png) == []
    assert non_blank(png) > 0.05
