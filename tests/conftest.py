"""Shared pytest fixtures: where the real chest X-ray sets live, the tiny settings every test
uses, and the tiny trained runs shared by every file (tests that train are marked slow)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from settings import TINY, TINY_ARGS  # noqa: F401 -- the settings every file imports

# Two pytest workers share two cores: OpenMP pools (scikit-learn's gradient boosting) sized to
# the machine oversubscribe them badly. Set before any test module imports scikit-learn.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test downloads ImageNet weights from the internet (CI may have no network); the download
# tests serve files from 127.0.0.1 and turn this off themselves.
os.environ.setdefault("CXR_ENSEMBLES_OFFLINE", "1")

# ../shared/data beside the checkout; CXR_SHARED_DATA overrides (a user's fresh clone has none).
SHARED_DATA = Path(os.environ.get(
    "CXR_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder, or a skip with the reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real chest X-ray data not found at {SHARED_DATA} (set CXR_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trains() -> None:
    """Named by every fixture that trains a model for more than a few steps: the tests that
    use such a fixture are marked slow (see `pytest_collection_modifyitems`)."""


def pytest_collection_modifyitems(items):
    for item in items:
        if "trains" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock shared by the pytest-xdist workers of one session."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, trains):
    """`tiny_run(strategy)`: the run folder of a TINY ensemble of that strategy, trained once
    per test session and shared by every file and worker. Tests must not change it (copy it
    first)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-runs"

    def get(strategy: str = "ova") -> Path:
        from ensembles import Ensemble
        out = root / strategy
        with _locked(root / f"{strategy}.lock"):
            config = out / "config.json"
            if not (config.is_file() and "bundle" in json.loads(config.read_text())):
                shutil.rmtree(out, ignore_errors=True)
                Ensemble(strategy, **TINY, cache_dir=str(root / "tfds")).fit(out=out)
        return out

    return get
