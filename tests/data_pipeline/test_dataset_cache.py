"""Dataset cache under concurrency and damage: build lock, orphan cleanup, content keying."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
from folder_fixtures import make_flat, write_image

from data_pipeline import builders
from data_pipeline import datasets as D
from data_pipeline.datasets import load_dataset


def _lock_path(cache, ds_build_dir):
    folder = next(p for p in ds_build_dir.parents if p.parent == cache)
    return folder.with_name(folder.name + ".lock"), folder


def test_second_build_waits_for_the_lock_then_reuses(tmp_path, monkeypatch, capsys):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 2})
    cache = tmp_path / "c"
    first = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    lock, _ = _lock_path(cache, first.build_dir)
    assert lock.exists()

    def no_rebuild(self):
        raise AssertionError("a finished build was rebuilt")

    monkeypatch.setattr(builders.ImageFolder, "_examples", no_rebuild)
    monkeypatch.setattr(D, "_LOCK_POLL_S", 0.02)
    result: dict = {}
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another "process" is building this key
    try:
        worker = threading.Thread(target=lambda: result.update(ds=load_dataset(
            "image_folder", data_dir=root, cache_dir=cache)))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and "ds" not in result  # it waits while the lock is held
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    worker.join(30)
    assert not worker.is_alive()
    assert result["ds"].build_dir == first.build_dir and len(result["ds"]) == 4
    assert "waiting for another build" in capsys.readouterr().err


def test_lock_wait_times_out_with_a_message(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "f", {"COVID": 1, "Normal": 1})
    cache = tmp_path / "c"
    first = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    lock, _ = _lock_path(cache, first.build_dir)
    monkeypatch.setattr(D, "BUILD_LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(D, "_LOCK_POLL_S", 0.02)
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(TimeoutError, match="another process has been building"):
            load_dataset("image_folder", data_dir=root, cache_dir=cache)
    finally:
        os.close(fd)


def test_concurrent_first_builds_share_one_build(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 3, "Normal": 3})
    cache = tmp_path / "c"
    results, errors = [], []

    def build():
        try:
            results.append(load_dataset("image_folder", data_dir=root, cache_dir=cache))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len({r.build_dir for r in results}) == 1 and all(len(r) == 6 for r in results)
    assert len(list(cache.rglob("dataset_info.json"))) == 1
    assert not list(cache.rglob("incomplete.*"))


def test_orphan_incomplete_folder_removed_on_next_build(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 1})
    cache = tmp_path / "c"
    first = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    # what a SIGKILLed build leaves: TFDS's temporary folder beside the version folder
    orphan = first.build_dir.parent / f"incomplete.ABC123_{first.build_dir.name}"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "shard.array_record").write_bytes(b"x" * 100)
    other_key = cache / "image_folder-otherkey" / "image_folder" / "incomplete.XYZ_1.0.0"
    other_key.mkdir(parents=True)  # another key's (possibly live) build is not ours to remove
    again = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    assert again.build_dir == first.build_dir and len(again) == 3
    assert not orphan.exists()
    assert other_key.exists()


def test_content_change_with_same_size_and_mtime_rebuilds(tmp_path):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 2})
    cache = tmp_path / "c"
    target = root / "Normal" / "img1.png"
    first = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    st = target.stat()
    old = target.read_bytes()
    write_image(target, value=200)  # same geometry: a flat PNG of another grey
    new = target.read_bytes()
    if len(new) != len(old):  # force equal size so only the content differs
        new = (new + b"\0" * len(old))[:len(old)] if len(new) < len(old) else new[:len(old)]
    assert new != old
    with target.open("r+b") as f:  # in place: same inode
        f.write(new)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        st.st_size, st.st_mtime_ns, st.st_ino)
    changed = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    assert changed.build_dir != first.build_dir


def test_touch_alone_reuses_and_unchanged_files_are_not_reread(tmp_path, monkeypatch):
    root = make_flat(tmp_path / "f", {"COVID": 2, "Normal": 2})
    cache = tmp_path / "c"
    first = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    hashed = []
    real = D._file_digest
    monkeypatch.setattr(D, "_file_digest", lambda p: hashed.append(p.name) or real(p))
    again = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    assert again.build_dir == first.build_dir and hashed == []  # stat-only check
    os.utime(root / "COVID" / "img0.png")  # mtime changes, content does not
    touched = load_dataset("image_folder", data_dir=root, cache_dir=cache)
    assert touched.build_dir == first.build_dir and hashed == ["img0.png"]
