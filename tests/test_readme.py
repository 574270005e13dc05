"""README.md's Python API example runs as written: every ```python block that builds an
`Ensemble(` is executed in a fresh namespace (working directory and dataset cache inside
tmp_path), and what it leaves behind is checked: macro-F1, probabilities, classes, and the
saved-then-loaded ensemble predicting what the fitted one predicted."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def api_blocks() -> list[str]:
    return [b for b in BLOCK.findall(README.read_text()) if "Ensemble(" in b]


def test_readme_has_an_api_example():
    assert api_blocks(), "README.md has no ```python block that uses Ensemble("


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

