"""Train/val/test splits: stratified by label, grouped by patient, deterministic by seed.

A patient's images never land in two splits (that would leak the patient, not the disease,
into the test score). Examples with an empty patient id are their own group.

Why a greedy assignment rather than scikit-learn for the 3-way split: `StratifiedGroupKFold`
only makes 1/k folds, `GroupShuffleSplit` ignores labels and `StratifiedShuffleSplit` ignores
groups, so none of them hits arbitrary ratios per class *and* keeps patients together. The
greedy assignment below does: per-class targets come from the ratios by largest remainder;
patient groups (largest first, equal sizes in seeded random order) go to the split they
overshoot least, ties to the split that is proportionally least filled. Without patient ids
every group is one example and each class hits its target exactly. `kfold_indices` uses
scikit-learn's `StratifiedGroupKFold`, which fits that job.

The recipe "source" keeps a dataset's own test folder (Kermany's `test/`) as the test split,
as the papers on that data report, and splits the rest 85/15 into train/val the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from data_pipeline.image_source import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Recipes from the reports: "a/b-c/d" splits a/b into (train+val)/test, then the first part
# c/d into train/val.
RECIPES: dict[str, tuple[float, float, float]] = {
    "70/15/15": (0.70, 0.15, 0.15),
    "80/20-70/30": (0.80 * 0.70, 0.80 * 0.30, 0.20),
    "70/30-75/25": (0.70 * 0.75, 0.70 * 0.25, 0.30),
}
SOURCE = "source"   # the dataset's own test folder; the rest split train/val
SPLIT_RECIPES: tuple[str, ...] = (*RECIPES, SOURCE)
SOURCE_VAL_SHARE = 0.15   # of the images outside the source's test folder


def _as_arrays(labels, patient_ids) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if patient_ids is None:
        patient_ids = np.full(len(labels), "", dtype=object)
    patient_ids = np.asarray(patient_ids, dtype=object)
    if patient_ids.shape != labels.shape:
        raise ValueError(
            f"patient_ids has {len(patient_ids)} entries but labels has {len(labels)}")
    return labels, patient_ids


def _groups(patient_ids: np.ndarray) -> np.ndarray:
    """Group id per example: one per distinct non-empty patient id, one per example otherwise."""
    ids = np.array(["" if p is None else str(p) for p in patient_ids], dtype=object)
    empty = ids == ""
    groups = np.empty(len(ids), dtype=np.int64)
    _, groups[~empty] = np.unique(ids[~empty].astype(str), return_inverse=True)
    n_named = groups[~empty].max() + 1 if (~empty).any() else 0
    groups[empty] = n_named + np.arange(empty.sum())
    return groups


def _check_ratios(ratios: Sequence[float]) -> np.ndarray:
    r = np.asarray(ratios, dtype=np.float64)
    if r.shape != (3,) or (r < 0).any():
        raise DataError(
            f"ratios must be three non-negative numbers (train, val, test), got {ratios}")
    if not np.isclose(r.sum(), 1.0, atol=1e-6):
        raise DataError(f"ratios must sum to 1, got {tuple(ratios)} (sum {r.sum():.6g})")
    if r[0] == 0:
        raise DataError("the train ratio must be positive")
    return r


def resolve_ratios(ratios: Sequence[float] | None = None, recipe: str | None = None) -> np.ndarray:
    """(train, val, test) fractions from `ratios` or a named `recipe` (default 70/15/15)."""
    if ratios is not None and recipe is not None:
        raise ValueError("give either ratios or recipe, not both")
    if recipe is not None:
        if recipe not in RECIPES:
            raise DataError(f"unknown split recipe {recipe!r}; known: {', '.join(RECIPES)}")
        ratios = RECIPES[recipe]
    return _check_ratios(RECIPES["70/15/15"] if ratios is None else ratios)


def _class_targets(count: int, ratios: np.ndarray) -> np.ndarray:
    """Per-split target counts for one class: largest remainder, at least 1 per used split."""
    exact = count * ratios
    target = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - target), kind="stable")
    target[order[: count - target.sum()]] += 1
    for s in np.flatnonzero((ratios > 0) & (target == 0)):
        target[np.argmax(target)] -= 1
        target[s] += 1
    return target


def split_indices(labels, patient_ids, *, ratios: Sequence[float] | None = None,
                  recipe: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Split example indices into {"train", "val", "test"} (sorted int64 arrays).

    Stratified by label, patient-grouped, deterministic by `seed`; see the module docstring.
    Raises DataError for bad ratios or a class with fewer examples (or patients) than splits.
    """
    labels, patient_ids = _as_arrays(labels, patient_ids)
    r = resolve_ratios(ratios, recipe)
    used = int((r > 0).sum())
    groups = _groups(patient_ids)
    classes = np.unique(labels)
    k = len(classes)
    label_col = np.searchsorted(classes, labels)

    n_groups = groups.max() + 1 if len(groups) else 0
    counts = np.zeros((n_groups, k), dtype=np.int64)  # examples of each class per group
    np.add.at(counts, (groups, label_col), 1)
    for c in range(k):
        n_c, g_c = int(counts[:, c].sum()), int((counts[:, c] > 0).sum())
        if g_c < used:
            raise DataError(
                f"class {classes[c]} has {n_c} example(s) from {g_c} patient group(s), "
                f"fewer than the {used} splits asked for")
    targets = np.stack([_class_targets(int(counts[:, c].sum()), r) for c in range(k)], axis=1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    filled = np.zeros((3, k), dtype=np.int64)
    assign = np.empty(n_groups, dtype=np.int64)
    denom = np.maximum(targets, 1)
    for g in order:
        c = counts[g]
        over = np.maximum(filled + c - targets, 0).sum(axis=1).astype(np.float64)
        over[r == 0] = np.inf
        fill = ((filled * (c > 0)) / denom).sum(axis=1) / max((c > 0).sum(), 1)
        s = min(range(3), key=lambda i: (over[i], fill[i], i))
        assign[g] = s
        filled[s] += c
    example_split = assign[groups]
    return {name: np.flatnonzero(example_split == s).astype(np.int64)
            for s, name in enumerate(SPLITS)}


def kfold_indices(labels, patient_ids, *, k: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """k stratified, patient-grouped folds as (train_idx, val_idx); each index in one val fold.

    Uses scikit-learn's StratifiedGroupKFold (shuffled by `seed`). Raises DataError for k < 2
    or a class with fewer patient groups than folds.
    """
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise DataError(f"k must be an integer >= 2, got {k!r}")
    labels, patient_ids = _as_arrays(labels, patient_ids)
    groups = _groups(patient_ids)
    for c in np.unique(labels):
        g_c = len(np.unique(groups[labels == c]))
        if g_c < k:
            raise DataError(
                f"class {c} has {int((labels == c).sum())} example(s) from {g_c} patient "
                f"group(s), fewer than k={k} folds")
    folds = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=seed)
    return [(np.sort(tr).astype(np.int64), np.sort(va).astype(np.int64))
            for tr, va in folds.split(np.zeros(len(labels)), labels, groups)]


def source_split_indices(labels, patient_ids, source_splits, *,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """{"train", "val", "test"}: test is the source's own `test` folder; everything else (its
    train and val folders: Kermany's val holds 16 images) splits into train/val as
    `split_indices` does, with SOURCE_VAL_SHARE for val. Images of a patient who also has
    images in the test folder are left out of train and val (a warning counts them), so the
    splits stay patient-disjoint. DataError when the dataset has no test folder."""
    labels, patient_ids = _as_arrays(labels, patient_ids)
    source_splits = np.asarray(source_splits, dtype=str)
    if source_splits.shape != labels.shape:
        raise ValueError(f"source_splits has {len(source_splits)} entries but labels has "
                         f"{len(labels)}")
    test = np.flatnonzero(source_splits == "test").astype(np.int64)
    if not len(test):
        raise DataError("split recipe source: this dataset has no test folder of its own "
                        "(a Kermany layout has train/ and test/); use another --split-recipe")
    test_patients = {str(p) for p in patient_ids[test] if p}
    rest = np.flatnonzero(source_splits != "test")
    shared = np.array([bool(patient_ids[i]) and str(patient_ids[i]) in test_patients
                       for i in rest], dtype=bool)
    if shared.any():
        warnings.warn(f"split recipe source: {int(shared.sum())} image(s) outside the test "
                      f"folder belong to patients in it; left out of train and val",
                      stacklevel=2)
    rest = rest[~shared]
    inner = split_indices(labels[rest], patient_ids[rest], seed=seed,
                          ratios=(1 - SOURCE_VAL_SHARE, SOURCE_VAL_SHARE, 0.0))
    return {"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test}
