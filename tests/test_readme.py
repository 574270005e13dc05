"""README.md's Python API example runs as written: every ```python block that builds an
`Ensemble(` is executed in a fresh namespace (working directory and dataset cache inside
tmp_path), and what it leaves behind is checked: macro-F1, probabilities, classes, and the
saved-then-loaded ensemble predicting what the fitted one predicted.

Fast checks keep the README a front door: at most 250 lines, its install and test commands
exactly those .ci/run runs, and every relative link of README.md and docs/*.md pointing at a
file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAX_LINES = 250


def api_blocks() -> list[str]:
    return [b for b in BLOCK.findall(README.read_text()) if "Ensemble(" in b]


def test_readme_has_an_api_example():
    assert api_blocks(), "README.md has no ```python block that uses Ensemble("


def test_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_install_and_test_commands_are_those_ci_runs():
    """.ci/run copies the README's install and test commands: each of its lines after the
    '# --- README:' marker is in a README command line, character for character."""
    ci = (ROOT / ".ci" / "run").read_text().split("# --- README:", 1)
    assert len(ci) == 2, ".ci/run lost its '# --- README:' marker"
    commands = [ln.strip() for ln in ci[1].splitlines()[1:]
                if ln.strip() and not ln.strip().startswith("#")]
    assert commands, ".ci/run has no command after its README marker"
    readme_commands = {part.strip() for line in README.read_text().splitlines()
                       for part in line.split(" && ")}
    for command in commands:
        assert command in readme_commands, f"README.md lacks .ci/run's {command!r}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def test_relative_links_resolve():
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue                                   # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path) if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(api_blocks())))
def test_readme_api_example_runs_as_written(index, tmp_path, monkeypatch):
    code = api_blocks()[index]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CXR_ENSEMBLES_CACHE", str(tmp_path / "cache"))
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    for name in ("data", "ens", "images", "proba"):
        assert name in ns, f"the README example no longer defines {name!r}"
    ens, data, images, proba = ns["ens"], ns["data"], ns["images"], ns["proba"]
    assert (tmp_path / "cache").is_dir()          # the dataset was built inside tmp_path
    assert ens.classes_ == data.class_names
    assert 0.0 <= ens.metrics_["macro_f1"] <= 1.0
    assert (tmp_path / ens.run_dir_ / "metrics.json").is_file()

    # probabilities of the fitted ensemble: one row per image over the dataset's classes
    assert images.dtype == np.uint8 and images.ndim in (3, 4)
    assert proba.shape == (len(images), len(data.class_names))
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)

    # the saved-then-loaded ensemble predicts the same probabilities as before saving
    runs = {p.parent.resolve() for p in tmp_path.rglob("config.json")
            if "cache" not in p.relative_to(tmp_path).parts}
    assert (tmp_path / ens.run_dir_).resolve() in runs and len(runs) >= 2, runs  # fit, save
    np.testing.assert_allclose(ens.predict_proba(images), proba, atol=1e-6)
    decisions = ens.predict(images)
    assert decisions.shape == (len(images),)
    if "names" in ns:   # the example's class names of predict, before saving
        assert [ens.classes_[k] for k in decisions] == list(ns["names"])

    # the loaded ensemble evaluates the test split as the fitted one did
    metrics = ens.evaluate(data, split="test")
    assert metrics["macro_f1"] == pytest.approx(ens.metrics_["macro_f1"], abs=1e-6)

