"""Build the real mini sets in ../shared/data and check their counts and patient ids."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from data_pipeline.datasets import load_dataset

pytestmark = pytest.mark.real_data


def _manifest(path) -> dict[str, str]:
    with path.open(newline="") as f:
        return {row["file"]: row["patient_id"] for row in csv.DictReader(f)}


def test_cxr_mini_kaggle_layout(shared_data, tmp_path):
    root = shared_data / "cxr-mini"
    ds = load_dataset("covid19_radiography", data_dir=root, cache_dir=tmp_path)
    assert ds.class_names == ("covid", "normal", "viral_pneumonia", "bacterial_pneumonia")
    assert np.bincount(ds.labels).tolist() == [120, 120, 120, 120]
    assert ds.skipped == [] and not ds.has_masks
    manifest = _manifest(root / "manifest.csv")
    assert dict(zip(ds.paths, ds.patient_ids)) == manifest
    first = ds.source[0]
    assert first["image"].shape == (256, 256, 1) and first["image"].dtype == np.uint8
    assert first["patient_id"] == manifest[first["path"]]


def test_cxr_mini_kermany_three_classes(shared_data, tmp_path):
    base = shared_data / "cxr-mini-kermany" / "chest_xray"
    ds = load_dataset("chest_xray_pneumonia", data_dir=base, cache_dir=tmp_path)
    assert ds.class_names == ("normal", "viral_pneumonia", "bacterial_pneumonia")
    counts = Counter(zip(ds.source_splits.tolist(), (ds.class_names[k] for k in ds.labels)))
    assert counts == {("train", "normal"): 84, ("train", "viral_pneumonia"): 97,
                      ("train", "bacterial_pneumonia"): 93, ("test", "normal"): 18,
                      ("test", "viral_pneumonia"): 23, ("test", "bacterial_pneumonia"): 27}
    assert Counter(ds.source_splits.tolist()) == {"train": 274, "test": 68}
    # Ids parsed from Kermany file names agree with the curated manifest one folder up.
    manifest = _manifest(base.parent / "manifest.csv")
    assert {f"chest_xray/{p}": pid for p, pid in zip(ds.paths, ds.patient_ids)} == manifest
    train = set(ds.patient_ids[ds.source_splits == "train"])
    assert not train & set(ds.patient_ids[ds.source_splits == "test"])  # patient-disjoint
