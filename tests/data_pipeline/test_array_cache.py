"""Decode-once array store: equal to decoding, reused, keyed, crash-safe, locked, memory-mapped."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import threading
import time

import numpy as np
import pytest

from data_pipeline import array_cache
from data_pipeline import datasets as D
from data_pipeline.array_cache import cached_source, prepare_image
from data_pipeline.augment import AugmentConfig
from data_pipeline.datasets import load_dataset
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig, preprocess

PRE = PreprocessConfig(image_size=16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ds(cache):
    return load_dataset("synthetic_cxr", cache_dir=cache, count=12, image_size=32, seed=0)


def _decoded(source, cfg: PreprocessConfig) -> np.ndarray:
    """What the decode path computes for every example, in order."""
    return np.stack([prepare_image(e["image"], cfg, e.get("mask"))
                     for e in (source[i] for i in range(len(source)))])


def _folder(store) -> str:
    return store.folder.parent.name


def _forbid_decoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("decoded again although a store exists")
    monkeypatch.setattr(array_cache, "prepare_image", fail)


@pytest.mark.parametrize("cfg", [
    PRE,
    PreprocessConfig(image_size=12, resize="crop", clahe=True),
    PreprocessConfig(image_size=20, local_equalize=True, local_equalize_radius=3,
                     lung_mask=True),
], ids=["pad", "crop-clahe", "local-eq-mask"])
def test_store_equals_the_decode_path_bit_for_bit(ds, cfg):
    store = cached_source(ds.source, cfg)
    decoded = _decoded(ds.source, cfg)
    assert store.images.dtype == np.uint8 and store.images.shape == decoded.shape
    np.testing.assert_array_equal(store.images, decoded)
    np.testing.assert_array_equal(store.labels, ds.labels)
    np.testing.assert_array_equal(np.load(store.folder / "ids.npy"), ds.paths)
    # the uint8 image is the float pipeline's, rounded
    unit = np.stack([preprocess(ds.source[i]["image"], cfg, ds.source[i]["mask"])
                     for i in range(len(ds))])
    assert np.abs(decoded / 255.0 - unit).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("augment", [None, AugmentConfig(rotation_deg=15, brightness=0.2)],
                         ids=["plain", "host-augment"])
def test_loader_batches_are_identical_with_and_without_the_store(ds, augment):
    cfg = PreprocessConfig(image_size=16, channels=3, normalization="torch", clahe=True)

    def batches(cache_arrays):
        return list(make_loader(ds.source, np.arange(1, 12), batch_size=4, preprocess=cfg,
                                augment=augment, seed=5, num_epochs=2,
                                cache_arrays=cache_arrays))
    cached, decoded = batches(True), batches(False)
    assert len(cached) == len(decoded) == 5
    for a, b in zip(cached, decoded):
        assert a.keys() == b.keys() == {"image", "label", "index"}
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    assert cached[0]["image"].shape == (4, 16, 16, 3) and cached[0]["image"].dtype == np.float32


def test_second_use_reuses_the_store(ds, monkeypatch):
    cfg = PreprocessConfig(image_size=10)
    first = cached_source(ds.source, cfg)
    images = first.folder / "images.npy"
    stamp = images.stat().st_mtime_ns
    _forbid_decoding(monkeypatch)
    again = cached_source(ds.source, cfg)
    # normalisation and channels are applied per batch: they share the store
    shared = cached_source(ds.source, dataclasses.replace(cfg, channels=3, normalization="tf"))
    assert again.folder == first.folder == shared.folder
    assert images.stat().st_mtime_ns == stamp
    batch = next(iter(make_loader(ds.source, np.arange(12), batch_size=12, preprocess=cfg,
                                  shuffle=False)))
    np.testing.assert_array_equal(batch["image"], first.images / np.float32(255.0))


@pytest.mark.parametrize("change", [
    {"image_size": 18}, {"resize": "crop"}, {"clahe": True}, {"lung_mask": True},
    {"local_equalize": True}])
def test_a_host_preprocessing_option_makes_a_new_store(ds, change):
    old = cached_source(ds.source, PRE)
    cfg = dataclasses.replace(PRE, **change)
    new = cached_source(ds.source, cfg)
    assert _folder(new) != _folder(old)
    np.testing.assert_array_equal(new.images, _decoded(ds.source, cfg))


def test_clahe_clip_is_keyed_only_with_clahe():
    clahe = PreprocessConfig(clahe=True)
    assert array_cache.store_key(clahe) != array_cache.store_key(
        dataclasses.replace(clahe, clahe_clip=0.02))
    assert array_cache.store_key(PreprocessConfig()) == array_cache.store_key(
        PreprocessConfig(clahe_clip=0.02))


def test_other_dataset_content_makes_a_new_store(ds, cache):
    other = load_dataset("synthetic_cxr", cache_dir=cache, count=12, image_size=32, seed=1)
    a, b = cached_source(ds.source, PRE), cached_source(other.source, PRE)
    assert a.folder != b.folder
    np.testing.assert_array_equal(b.images, _decoded(other.source, PRE))
    assert not np.array_equal(a.images, b.images)


def test_killed_build_leaves_no_complete_store_and_the_next_call_rebuilds(ds, monkeypatch,
                                                                           capsys):
    cfg = PreprocessConfig(image_size=14)
    calls = []
    real = array_cache.prepare_image

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # what a kill looks like: no cleanup code runs
        return real(*args, **kwargs)

    monkeypatch.setattr(array_cache, "prepare_image", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        cached_source(ds.source, cfg)
    folder = ds.source.arrays_dir / array_cache.store_key(cfg)
    assert not (folder / "data").exists()
    assert [p.name.startswith("incomplete.") for p in folder.iterdir()] == [True]
    monkeypatch.setattr(array_cache, "prepare_image", real)
    store = cached_source(ds.source, cfg)
    assert [p.name for p in folder.iterdir()] == ["data"]   # the orphan was removed
    assert "left by an interrupted build" in capsys.readouterr().err
    np.testing.assert_array_equal(store.images, _decoded(ds.source, cfg))


def test_a_second_builder_waits_for_the_lock_then_reuses(ds, monkeypatch):
    cfg = PreprocessConfig(image_size=15)
    folder = ds.source.arrays_dir / array_cache.store_key(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(D, "_LOCK_POLL_S", 0.02)
    result: dict = {}
    fd = os.open(folder.with_name(folder.name + ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is building this store
    try:
        waiter = threading.Thread(target=lambda: result.update(
            store=cached_source(ds.source, cfg)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive() and "store" not in result
        array_cache._build(ds.source, cfg, folder, folder / "data", False)
        _forbid_decoding(monkeypatch)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    waiter.join(30)
    assert result["store"].folder == folder / "data"


def test_store_is_memory_mapped_and_pickles_without_its_pixels(ds):
    store = cached_source(ds.source, PRE)
    assert isinstance(store.images, np.memmap) and store.images.mode == "r"
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < store.images.nbytes
    np.testing.assert_array_equal(copy[3]["image"], store.images[3])
    assert copy[3]["label"] == ds.labels[3] and copy[3]["label"].dtype == np.int32


def test_iterator_state_moves_between_the_store_and_the_decode_path(ds):
    def loader(cache_arrays):
        return make_loader(ds.source, np.arange(12), batch_size=3, preprocess=PRE, seed=2,
                           num_epochs=2, cache_arrays=cache_arrays)
    it = iter(loader(False))   # e.g. a checkpoint written before the store existed
    next(it)
    state = it.get_state()
    rest = [b["index"] for b in it]
    resumed = iter(loader(True))
    resumed.set_state(state)
    assert [b["index"].tolist() for b in resumed] == [r.tolist() for r in rest]


def test_sources_without_a_store_decode():
    source = [{"image": np.full((8, 8, 1), 9, np.uint8), "label": 1}] * 3
    assert cached_source(source, PRE) is None
    batch = next(iter(make_loader(source, np.arange(3), batch_size=3, preprocess=PRE)))
    np.testing.assert_array_equal(batch["image"], np.full((3, 16, 16, 1), 9 / np.float32(255)))


def test_benchmark_runs_at_tiny_size(tmp_path):
    from benchmarks import input_pipeline
    result = input_pipeline.main(["--quick", "--cache-dir", str(tmp_path),
                                  "--json", str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").is_file()
    per_core = {r["size"]: r for r in result["per_core"]}
    assert set(per_core) == set(result["config"]["sizes"])
    for row in per_core.values():
        assert min(row["cached_per_core"], row["cached_uint8_per_core"],
                   row["decode_per_core"]) > 0
        assert row["cores_for_target"] == pytest.approx(
            result["config"]["target"] / row["cached_per_core"])


def test_progress_false_builds_the_store_without_a_bar(ds, capfd):
    """--no-progress reaches the store's build (build_data passes the run's progress)."""
    quiet = cached_source(ds.source, PreprocessConfig(image_size=9), progress=False)
    assert "caching" not in capfd.readouterr().err
    loud = cached_source(ds.source, PreprocessConfig(image_size=11))
    assert "caching 12 images at 11px" in capfd.readouterr().err
    assert quiet.folder != loud.folder and (quiet.folder / "images.npy").is_file()


def test_a_run_without_progress_builds_its_store_silently(cache, capfd, monkeypatch):
    """build_data builds the store itself, with the run's progress setting."""
    from ensembles.config import make_config, resolve
    from ensembles.training import build
    config = resolve(make_config("single", backbone="simple_cnn", count=12, image_size=13,
                                 cache_dir=str(cache), batch_size=4, progress=False))
    data = build.build_data(config)
    assert "caching" not in capfd.readouterr().err
    _forbid_decoding(monkeypatch)   # built by build_data: found, not decoded again
    assert array_cache.cached_source(data.dataset.source, data.preprocess) is not None
