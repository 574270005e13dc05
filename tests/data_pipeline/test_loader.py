"""Grain loader: batch contents, evaluation coverage, shuffling, resumable state, workers."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_source import PRE, SIZE, SOURCE, SPLIT

from data_pipeline.array_cache import prepare_image
from data_pipeline.augment import AugmentConfig
from data_pipeline.loader import finish, make_loader
from data_pipeline.preprocess import preprocess

AUG = AugmentConfig(rotation_deg=20, zoom=0.2, translate=0.1, brightness=0.2, contrast=0.2)




def _indices(loader) -> list[np.ndarray]:
    return [b["index"] for b in loader]


def test_batch_contents_match_source_and_preprocess():
    batch = next(iter(make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE, seed=1)))
    assert batch["image"].shape == (4, SIZE, SIZE, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int64
    assert np.isin(batch["index"], SPLIT).all()
    for img, label, idx in zip(batch["image"], batch["label"], batch["index"]):
        ex = SOURCE[idx]
        assert label == ex["label"]
        np.testing.assert_array_equal(img, finish(prepare_image(ex["image"], PRE), PRE))
        # the host part is rounded to uint8 (what the array store holds): within half a level
        np.testing.assert_allclose(img, preprocess(ex["image"], PRE), rtol=0, atol=0.5 / 255 + 1e-6)


def test_eval_loader_gives_every_index_once_in_order():
    loader = make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE, shuffle=False,
                         drop_remainder=False)
    batches = _indices(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), SPLIT)


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    def order(seed):
        loader = make_loader(SOURCE, SPLIT, batch_size=5, preprocess=PRE, seed=seed,
                             num_epochs=2)
        return np.concatenate(_indices(loader))
    a, b, c = order(0), order(0), order(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    first, second = a[:10], a[10:]
    np.testing.assert_array_equal(np.sort(first), SPLIT)   # an epoch is a permutation
    np.testing.assert_array_equal(np.sort(second), SPLIT)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, SPLIT)


def test_drop_remainder_drops_the_partial_batch():
    loader = make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE, shuffle=False)
    assert [len(b) for b in _indices(loader)] == [4, 4]


def test_state_resumes_exact_order_across_epoch_boundary():
    loader = make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE, augment=AUG, seed=3,
                         num_epochs=3)
    it = iter(loader)
    for _ in range(2):          # 8 of 10 records of epoch 1
        next(it)
    state = it.get_state()
    rest = list(it)             # 22 records left -> 5 full batches, the first spans epochs
    it2 = iter(loader)
    it2.set_state(state)
    resumed = list(it2)
    assert len(rest) == len(resumed) == 5
    for a, b in zip(rest, resumed):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])  # augmentation too


def test_state_from_another_split_is_refused():
    it = iter(make_loader(SOURCE, SPLIT, batch_size=2, preprocess=PRE))
    next(it)
    other = iter(make_loader(SOURCE, SPLIT[::-1].copy(), batch_size=2, preprocess=PRE))
    with pytest.raises(ValueError, match="DataSource in checkpoint does not match"):
        other.set_state(it.get_state())


def test_host_augmentation_is_deterministic_and_changes_images():
    def first(aug, seed=0):
        return next(iter(make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE,
                                     augment=aug, seed=seed)))
    plain, a, b = first(None), first(AUG), first(AUG)
    np.testing.assert_array_equal(a["index"], plain["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
    assert np.abs(a["image"] - plain["image"]).max() > 0.05
    assert np.isfinite(a["image"]).all()


@pytest.mark.slow
def test_one_worker_gives_the_same_batches_as_none():
    def batches(workers):
        loader = make_loader(SOURCE, SPLIT, batch_size=3, preprocess=PRE, augment=AUG,
                             seed=7, num_epochs=2, worker_count=workers)
        return list(loader)
    inline, worker = batches(0), batches(1)
    assert len(inline) == len(worker) == 6
    for a, b in zip(inline, worker):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("indices, message", [
    ([], "non-empty"),
    ([0, 40], r"must lie in \[0, 40\)"),
    ([[1, 2]], "1-D"),
])
def test_bad_indices_are_refused(indices, message):
    with pytest.raises(ValueError, match=message):
        make_loader(SOURCE, np.asarray(indices, dtype=np.int64), batch_size=2, preprocess=PRE)


def test_synthetic_dataset_end_to_end(tmp_path):
    from data_pipeline.datasets import load_dataset
    from data_pipeline.splits import split_indices

    ds = load_dataset("synthetic_cxr", cache_dir=tmp_path, count=24, image_size=32, seed=0)
    split = split_indices(ds.labels, ds.patient_ids, seed=0)
    loader = make_loader(ds.source, split["test"], batch_size=8, preprocess=PRE,
                         shuffle=False, drop_remainder=False)
    batches = list(loader)
    idx = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(idx, split["test"])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                  ds.labels[split["test"]])
    assert batches[0]["image"].shape[1:] == (SIZE, SIZE, 1)
