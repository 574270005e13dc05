"""Splits: ratios per class, no patient in two splits, determinism, k-fold coverage, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from data_pipeline.splits import (
    RECIPES,
    SOURCE_VAL_SHARE,
    kfold_indices,
    source_split_indices,
    split_indices,
)


def _no_overlap_and_complete(split: dict[str, np.ndarray], n: int) -> None:
    all_idx = np.concatenate([split["train"], split["val"], split["test"]])
    assert len(all_idx) == n
    assert np.array_equal(np.sort(all_idx), np.arange(n))


def _patient_data(seed: int = 0, n_patients: int = 300):
    """Patients with 1-4 images each (some patients carry two labels), plus 60 anonymous."""
    rng = np.random.default_rng(seed)
    labels, pids = [], []
    for p in range(n_patients):
        base = rng.integers(0, 4)
        for _ in range(rng.integers(1, 5)):
            labels.append(base if rng.random() > 0.1 else (base + 1) % 4)
            pids.append(f"p{p}")
    labels += list(rng.integers(0, 4, size=60))
    pids += [""] * 60
    return np.array(labels), np.array(pids, dtype=object)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_ungrouped_split_hits_per_class_targets(recipe):
    labels = np.repeat(np.arange(4), [100, 37, 250, 13])
    split = split_indices(labels, None, recipe=recipe, seed=3)
    _no_overlap_and_complete(split, len(labels))
    ratios = RECIPES[recipe]
    for s, name in enumerate(("train", "val", "test")):
        counts = np.bincount(labels[split[name]], minlength=4)
        target = np.bincount(labels, minlength=4) * ratios[s]
        assert np.all(np.abs(counts - target) <= 1.0), (name, counts, target)


def test_recipe_80_20_70_30_is_two_stage():
    labels = np.zeros(100, dtype=int)
    labels[50:] = 1
    split = split_indices(labels, None, recipe="80/20-70/30")
    # per class of 50: 10 test, then 40 -> 28 train / 12 val
    assert [len(split[n]) for n in ("train", "val", "test")] == [56, 24, 20]


def test_grouped_split_keeps_patients_together_and_is_near_target():
    labels, pids = _patient_data()
    split = split_indices(labels, pids, ratios=(0.7, 0.15, 0.15), seed=0)
    _no_overlap_and_complete(split, len(labels))
    named = [set(pids[idx]) - {""} for idx in split.values()]
    assert not (named[0] & named[1] or named[0] & named[2] or named[1] & named[2])
    n_per_class = np.bincount(labels, minlength=4)
    for s, name in enumerate(("train", "val", "test")):
        counts = np.bincount(labels[split[name]], minlength=4)
        target = n_per_class * (0.7, 0.15, 0.15)[s]
        # groups hold up to 4 images; anonymous singletons fill most of the gap
        assert np.all(np.abs(counts - target) <= 2.0), (name, counts, target)


def test_split_is_deterministic_and_seed_dependent():
    labels, pids = _patient_data(1)
    a = split_indices(labels, pids, seed=5)
    b = split_indices(labels, pids, seed=5)
    c = split_indices(labels, pids, seed=6)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_split_zero_test_ratio_gives_empty_test():
    labels = np.repeat(np.arange(3), 10)
    split = split_indices(labels, None, ratios=(0.8, 0.2, 0.0))
    assert len(split["test"]) == 0 and len(split["train"]) == 24


def test_small_class_still_gets_one_example_per_split():
    labels = np.array([0] * 40 + [1] * 3)
    split = split_indices(labels, None)
    for name in ("train", "val", "test"):
        assert (labels[split[name]] == 1).sum() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"ratios": (0.7, 0.2, 0.2)}, "sum to 1"),
    ({"ratios": (0.5, 0.5)}, "three"),
    ({"recipe": "60/40"}, "unknown split recipe"),
])
def test_split_rejects_bad_ratios(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_indices(np.arange(30) % 3, None, **kwargs)


def test_split_rejects_class_with_too_few_patients():
    labels = np.array([0] * 30 + [1] * 6)
    pids = np.array([f"a{i}" for i in range(30)] + ["x", "x", "x", "y", "y", "y"])
    with pytest.raises(ValueError, match=r"class 1 has 6 example\(s\) from 2 patient"):
        split_indices(labels, pids)


def test_kfold_covers_each_index_once_and_groups_patients():
    labels, pids = _patient_data(2)
    folds = kfold_indices(labels, pids, k=5, seed=0)
    assert len(folds) == 5
    vals = np.concatenate([va for _, va in folds])
    assert np.array_equal(np.sort(vals), np.arange(len(labels)))
    for tr, va in folds:
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
        assert not (set(pids[tr]) & set(pids[va])) - {""}
        # stratified: each class is 1/5 of its size in every fold, give or take a group
        frac = np.bincount(labels[va], minlength=4) / np.bincount(labels, minlength=4)
        assert np.all(np.abs(frac - 0.2) < 0.05), frac


def test_kfold_errors():
    labels = np.array([0] * 20 + [1] * 3)
    with pytest.raises(ValueError, match="k must be"):
        kfold_indices(labels, None, k=1)
    with pytest.raises(ValueError, match="fewer than k=5"):
        kfold_indices(labels, None, k=5)


@pytest.mark.real_data
def test_real_manifest_split_is_patient_disjoint(shared_data):
    with open(shared_data / "cxr-mini" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    labels = np.array([names.index(r["label"]) for r in rows])
    pids = np.array([r["patient_id"] for r in rows], dtype=object)
    split = split_indices(labels, pids, recipe="80/20-70/30", seed=0)
    _no_overlap_and_complete(split, len(rows))
    sets = [set(pids[idx]) for idx in split.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for name, want in (("train", 67), ("val", 29), ("test", 24)):
        counts = np.bincount(labels[split[name]], minlength=len(names))
        assert np.all(np.abs(counts - want) <= 1), (name, counts)


def _source_data():
    """Patient data with a test folder (every 5th patient's images) and a train folder; two
    patients of the test folder also have images in the train folder (returned)."""
    labels, pids = _patient_data(seed=1)
    patient_no = np.array([int(p[1:]) if p else -1 for p in pids])
    source = np.where((patient_no >= 0) & (patient_no % 5 == 0), "test", "train").astype(object)
    source[np.flatnonzero(pids == "")[:20]] = "test"
    twice = [p for p in ("p0", "p5", "p10", "p15", "p20") if (pids == p).sum() >= 2][:2]
    for p in twice:           # one image of each in the train folder, the others in test
        source[np.flatnonzero(pids == p)[:1]] = "train"
    return labels, pids, source.astype(str), set(twice)


def test_source_split_keeps_the_test_folder_and_splits_the_rest_by_patient():
    labels, pids, source, twice = _source_data()
    with pytest.warns(UserWarning, match=r"2 image\(s\) outside the test folder"):
        split = source_split_indices(labels, pids, source, seed=0)
    assert np.array_equal(split["test"], np.flatnonzero(source == "test"))
    shared = [i for i in np.flatnonzero(source == "train") if pids[i] in twice]
    assert len(shared) == 2 and not set(shared) & set(np.concatenate(list(split.values())))
    rest = np.concatenate([split["train"], split["val"]])
    assert sorted(rest.tolist()) == sorted(set(np.flatnonzero(source == "train")) - set(shared))
    sets = [set(pids[idx]) - {""} for idx in split.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for c in range(4):
        n_val = (labels[split["val"]] == c).sum()
        n_rest = (labels[rest] == c).sum()
        assert abs(n_val - SOURCE_VAL_SHARE * n_rest) <= 3, (c, n_val, n_rest)
    again = source_split_indices(labels, pids, source, seed=0)
    other = source_split_indices(labels, pids, source, seed=1)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert np.array_equal(other["test"], split["test"])
    assert not np.array_equal(other["val"], split["val"])


def test_source_split_needs_a_test_folder():
    labels, pids, source, _ = _source_data()
    with pytest.raises(ValueError, match="no test folder of its own"):
        source_split_indices(labels, pids, np.full(len(labels), ""), seed=0)
    with pytest.raises(ValueError, match="source_splits has 3 entries"):
        source_split_indices(labels, pids, source[:3], seed=0)


@pytest.mark.real_data
def test_kermany_source_split_is_the_published_test_folder(shared_data):
    """cxr-kermany's own split: 495 test images, the 1,905 others split 85/15 by patient."""
    with open(shared_data / "cxr-kermany" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})
    labels = np.array([names.index(r["label"]) for r in rows])
    pids = np.array([r["patient_id"] for r in rows], dtype=object)
    source = np.array([r["split"] for r in rows])
    split = source_split_indices(labels, pids, source, seed=0)
    assert len(split["test"]) == 495
    assert len(split["train"]) + len(split["val"]) == 1905
    assert abs(len(split["val"]) - SOURCE_VAL_SHARE * 1905) <= 10
