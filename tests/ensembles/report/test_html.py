"""report.html: self-contained (every image embedded, nothing fetched), every report.md
section present with its figure, the gallery split into wrong and right decisions, written
whole or not at all; and rendered by a real headless Chromium (skipped without one)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from ensembles.evaluate.metrics import evaluate_predictions
from ensembles.report import html as html_report
from ensembles.report.gallery import pick
from ensembles.report.html import Tile
from ensembles.report.write import write_report

NAMES = ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")


def _predictions(n: int = 120, seed: int = 7):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def _tiles(n_wrong: int = 3, n_right: int = 5) -> list[Tile]:
    rng = np.random.default_rng(0)
    return [Tile(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), f"tile {i}", i >= n_wrong)
            for i in range(n_wrong + n_right)]


@pytest.fixture
def report_dir(tmp_path):
    y, p = _predictions()
    m = evaluate_predictions(y, p, NAMES, n_bootstrap=50)
    out = tmp_path / "run"
    out.mkdir()
    Image.fromarray(np.full((50, 80, 3), 200, np.uint8)).save(out / "curves.png")
    write_report(m, out, y_true=y, proba=p, title="Test run <&>", tiles=_tiles(),
                 gallery_note="what the tiles show",
                 extra_sections={"Members": "4 member(s)", "Operating points": "| a |\n|---|\n| 1 |"})
    return out


def test_the_page_is_self_contained_and_has_every_section_and_figure(report_dir):
    page = (report_dir / "report.html").read_text()
    md = (report_dir / "report.md").read_text()
    for heading in re.findall(r"^## (.+)$", md, flags=re.M):
        assert f"<h2>{heading.replace('&', '&amp;')}</h2>" in page, heading
    sources = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//)', page)      # nothing fetched
    assert len(sources) == 4 + 8                                  # figures + tiles
    for name in ("confusion.png", "roc.png", "reliability.png", "curves.png"):
        assert page.count(f'alt="{name}"') == 1
    # each figure sits in its own section: after its heading, before the next one
    for name, heading in html_report.FIGURES.items():
        section = page.split(f"<h2>{heading}")[1].split("<h2>")[0]
        assert f'alt="{name}"' in section
    assert page.count("<table>") == len(re.findall(r"^\|(---\|)+$", md, flags=re.M)) == 4
    assert "<title>Test run &lt;&amp;&gt;</title>" in page
    assert "confounded with source" in page
    wrong = page.split("Wrongly classified (3 shown)")[1].split("Correctly classified")[0]
    assert wrong.count('class="tile wrong"') == 3
    assert "Correctly classified (5 shown)" in page


def test_a_failed_write_leaves_the_previous_page(report_dir, monkeypatch):
    before = (report_dir / "report.html").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(html_report.markdown, "markdown", boom)
    with pytest.raises(RuntimeError):
        html_report.write_html(report_dir, "# x", title="x")
    assert (report_dir / "report.html").read_text() == before
    assert not list(report_dir.glob(".report.html.*"))


def test_gallery_pick_takes_classes_in_turn_most_confident_first():
    y = np.array([0, 0, 0, 1, 1, 2, 0, 1])
    d = np.array([1, 2, 1, 0, 1, 2, 0, 2])
    p = np.full((8, 3), 0.1)
    p[np.arange(8), d] = [0.5, 0.9, 0.7, 0.6, 0.8, 0.8, 0.6, 0.4]
    wrong, right = pick(y, d, p, per_group=3)
    # wrong: class 0 rows 1 (0.9), 2 (0.7), 0 (0.5); class 1 rows 3 (0.6), 7 (0.4)
    assert wrong.tolist() == [1, 3, 2]
    assert right.tolist() == [6, 4, 5]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (Debian: apt-get "
                                                "install chromium)")
def test_a_real_browser_renders_the_page(report_dir, tmp_path):
    """Headless Chromium opens the file with the network off: every image decodes (complete,
    non-zero natural width), and the screenshot is not blank."""
    sync_api = pytest.importorskip("playwright.sync_api")
    shot = tmp_path / "shot.png"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
            page = context.new_page()
            page.goto((report_dir / "report.html").resolve().as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, "
                                   "i.naturalWidth])")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert len(images) == 12 and all(ok and w > 0 for ok, w in images)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 1500                       # the whole page, not one screen
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01   # text and figures drawn
