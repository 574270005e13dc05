"""Members on their own examples (`member_data` "own", the OvO default on CPU): the sampler's
epochs of a given length, each member's examples and steps, the config rule, stacked members'
batches (`MemberBatches`), and runs that stop (between members, or mid-stack) and resume to the
uninterrupted one."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from settings import TINY
from tiny_source import PRE, SOURCE, SPLIT

from backbones.training.checkpoint import Checkpointer
from data_pipeline.loader import EpochShuffleSampler, make_loader
from ensembles import Ensemble, RunConfig, make_config
from ensembles.combine.groups import plan_groups
from ensembles.training import build, fitting
from ensembles.training import members as members_lib

OVO3 = np.array([[0, 1, -1], [0, -1, 1], [-1, 0, 1]], np.int32)   # pairs (0,1), (0,2), (1,2)
MEMBER_DATA = {**TINY, "epochs": 2, "batch_size": 8, "n_bootstrap": 20,
               "early_stopping_patience": 0, "classes": ("covid", "normal", "viral_pneumonia")}


def _keys(sampler, n):
    return [sampler[i].record_key for i in range(n)]


def test_epoch_records_read_one_stream_of_permutations():
    plain = EpochShuffleSampler(5, shuffle=True, seed=3, num_epochs=3, rngs=False)
    short = EpochShuffleSampler(5, shuffle=True, seed=3, num_epochs=4, rngs=False,
                                epoch_records=3)
    assert len(short) == 12
    keys = _keys(short, 12)
    assert keys == _keys(plain, 12)                       # the same stream, cut differently
    assert sorted(keys[:5]) == sorted(keys[5:10]) == list(range(5))
    assert keys[:5] != keys[5:10]
    # checkpoints compare the sampler's text: unchanged without epoch_records
    assert repr(plain) == ("EpochShuffleSampler(num_records=5, shuffle=True, seed=3, "
                           "num_epochs=3)")
    assert "epoch_records=3" in repr(short)
    with pytest.raises(ValueError, match="epoch_records must be >= 1"):
        EpochShuffleSampler(5, shuffle=True, seed=3, num_epochs=1, rngs=False, epoch_records=0)


def test_a_loader_with_epoch_records_resumes_exactly():
    loader = make_loader(SOURCE, SPLIT, batch_size=4, preprocess=PRE, seed=3, num_epochs=3,
                         epoch_records=16)             # 10 records, epochs of 16 draws
    assert len(list(loader)) == 12
    it = iter(loader)
    for _ in range(5):
        next(it)
    state, rest = it.get_state(), list(it)
    again = iter(loader)
    again.set_state(state)
    resumed = list(again)
    assert len(rest) == len(resumed) == 7
    for a, b in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])


def test_own_examples_are_each_members_classes_with_common_steps():
    (stack,) = plan_groups([2, 2, 2], OVO3, [np.ones(2)] * 3)
    labels = np.repeat([0, 1, 2], [10, 20, 30])
    indices = np.concatenate([np.arange(60), [0, 0, 59]])     # oversampled duplicates stay
    own, steps = members_lib.own_examples(stack, indices, labels, batch_size=8)
    for o, pair in zip(own, [(0, 1), (0, 2), (1, 2)], strict=True):
        expected = indices[np.isin(labels[indices], pair)]
        np.testing.assert_array_equal(o, expected)
    assert [len(o) for o in own] == [32, 43, 51]
    assert steps == round(np.mean([32, 43, 51]) / 8) == 5
    with pytest.raises(ValueError, match="no training examples of their own"):
        members_lib.own_examples(stack, np.arange(10), labels, batch_size=8)


def test_ovo_members_one_after_another_draw_their_own_pairs():
    if jax.default_backend() != "cpu":
        pytest.skip("--members auto differs off CPU")
    cnn = make_config("ovo", backbone="simple_cnn")       # custom CNN on CPU: sequential
    assert (cnn.training.members, cnn.training.member_data) == ("sequential", "own")
    assert make_config("ova", backbone="simple_cnn").training.member_data == "shared"
    resnet = make_config("ovo", backbone="resnet50")      # ImageNet families: shared batches
    assert (resnet.training.members, resnet.training.member_data) == ("sequential", "shared")
    stacked = make_config("ovo", backbone="resnet50", members="stacked")
    assert stacked.training.member_data == "shared"
    assert make_config("ovo", members="sequential").training.member_data == "own"
    for members in ("stacked", "sequential"):             # own is a choice in both modes
        own = make_config("ovo", members=members, member_data="own")
        assert (own.training.members, own.training.member_data) == (members, "own")
        assert make_config("ova", members=members).training.member_data == "shared"


def test_each_member_loader_yields_its_pair_for_the_common_steps(tmp_path):
    config = make_config("ovo", cache_dir=str(tmp_path), **MEMBER_DATA)
    data = build.build_data(config)
    plan = fitting.plan_run(config, data)
    (stack,) = plan.groups
    steps, shared, loaders = fitting._stack_data(config, data, stack, data.train_indices)
    assert shared is None and len(loaders) == 3
    labels = data.dataset.labels
    own, expected_steps = members_lib.own_examples(stack, data.train_indices, labels, 8)
    assert steps == expected_steps
    for m, loader in enumerate(loaders):
        batches = list(loader)
        assert len(batches) == steps * config.training.epochs
        seen = np.concatenate([b["index"] for b in batches[:steps]])
        pair = np.flatnonzero(stack.table[m] >= 0)
        assert np.isin(labels[seen], pair).all()
        assert set(seen) <= set(own[m]) and len(set(seen)) == len(seen)   # one permutation


def test_member_batches_stack_each_members_batch_and_resume_exactly():
    loaders = [make_loader(SOURCE, SPLIT[m::2], batch_size=2, preprocess=PRE, seed=3,
                           num_epochs=2, epoch_records=4) for m in range(2)]
    batches = list(members_lib.MemberBatches(loaders))
    assert len(batches) == 4
    for b, *own in zip(batches, *loaders, strict=True):
        assert b["image"].shape == (2, 2, *own[0]["image"].shape[1:])
        for m in range(2):
            np.testing.assert_array_equal(b["index"][:, m], own[m]["index"])
            np.testing.assert_array_equal(b["label"][:, m], own[m]["label"])
    it = iter(members_lib.MemberBatches(loaders))
    next(it)
    state, rest = it.get_state(), list(it)
    again = iter(members_lib.MemberBatches(loaders))
    again.set_state(state)
    resumed = list(again)
    assert len(rest) == len(resumed) == 3
    for a, b in zip(rest, resumed, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
    with pytest.raises(ValueError, match="holds 2 member iterators; this member group has 1"):
        iter(members_lib.MemberBatches(loaders[:1])).set_state(state)


@pytest.mark.slow
def test_stacked_own_stopped_after_an_epoch_resumes_to_the_uninterrupted_run(tmp_path,
                                                                              monkeypatch):
    """The data position of every member's loader is in the checkpoint (MemberBatches)."""
    cache = str(tmp_path / "tfds")
    settings = {**MEMBER_DATA, "members": "stacked", "member_data": "own"}
    full = Ensemble("ovo", cache_dir=cache, **settings).fit(out=tmp_path / "full")
    assert full.config.training.member_data == "own"
    real_save = Checkpointer.save

    def stop_after_epoch_1(self, epoch, *args, **kw):
        real_save(self, epoch, *args, **kw)
        if epoch == 1:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", stop_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            Ensemble("ovo", cache_dir=cache, **settings).fit(out=out)
    resumed = Ensemble("ovo", cache_dir=cache, **settings).fit(out=out, resume=True)
    assert resumed.metrics_ == full.metrics_
    chex.assert_trees_all_equal(resumed.bundle_.variables, full.bundle_.variables)


@pytest.mark.slow
def test_ovo_stopped_between_members_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    cache = str(tmp_path / "tfds")
    full = Ensemble("ovo", cache_dir=cache, **MEMBER_DATA).fit(out=tmp_path / "full")
    real_fit, calls = members_lib.fit, []

    def stop_at_second_member(*args, **kw):
        calls.append(kw["member_names"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(*args, **kw)

    out = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(members_lib, "fit", stop_at_second_member)
        with pytest.raises(KeyboardInterrupt):
            Ensemble("ovo", cache_dir=cache, **MEMBER_DATA).fit(out=out)
    resumed = Ensemble("ovo", cache_dir=cache, **MEMBER_DATA).fit(out=out, resume=True)
    assert resumed.metrics_ == full.metrics_
    chex.assert_trees_all_equal(resumed.bundle_.variables, full.bundle_.variables)
    # the members differ: each learned its own pair
    first = jax.tree.leaves(full.bundle_.variables)[0]
    assert not np.allclose(first[0], first[1])


def test_a_config_written_before_member_data_reads_as_shared_batches():
    doc = make_config("ova", backbone="simple_cnn").to_dict()
    del doc["training"]["member_data"]
    old = RunConfig.from_dict(doc)
    assert old.training.member_data == "shared"
    assert old.differences(make_config("ova", backbone="simple_cnn")) == []
