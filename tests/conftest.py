"""Shared pytest fixtures: where the real chest X-ray sets live, and tiny-size defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
