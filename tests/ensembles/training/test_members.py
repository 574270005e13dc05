"""Stacked (vmapped) member training: relabelling on device, equality with sequential training,
per-member early stopping, checkpoint resume and the NaN guard."""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import numpy as np
import optax
import pytest

import backbones
from backbones.training import FitConfig, TrainingDiverged
from backbones.training.parallel import data_parallel
from backbones.training.state import create_train_state
from backbones.training.step import make_eval_step, make_train_step
from data_pipeline.synthetic import generate_phantoms
from ensembles.combine.groups import plan_groups
from ensembles.training import members

SIZE, BATCH = 16, 16
# OvA over 3 classes as a relabel table, plus a masked OvO-like member (class 1 vs 2 only).
TABLE = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 1]], np.int32)
WEIGHTS = [np.array([0.75, 1.5]), np.array([0.75, 1.5]), np.array([0.75, 1.5]), np.ones(2)]
NAMES = ["a", "b", "c", "b-vs-c"]


@pytest.fixture(scope="module")
def data():
    ph = generate_phantoms(96, image_size=SIZE, classes=("covid", "normal", "viral_pneumonia"),
                           seed=1)
    x = ph["image"].astype(np.float32) / 255.0
    return x, ph["label"].astype(np.int32)


class Batches:
    """Re-iterable batches: every epoch's training batches, or one validation pass."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def _batches(data, n_train=64, epochs=3):
    x, y = data

    def train():
        for epoch in range(epochs):
            order = np.random.default_rng(epoch).permutation(n_train)
            for s in range(0, n_train, BATCH):
                idx = order[s:s + BATCH]
                yield {"image": x[idx], "label": y[idx]}

    def val():
        for s in range(n_train, len(y), BATCH):
            yield {"image": x[s:s + BATCH], "label": y[s:s + BATCH]}

    return Batches(train), Batches(val)


def _make_state(num_classes, key, backbone="simple_cnn"):
    model = backbones.create(backbone, num_classes=num_classes, width=0.25)
    return create_train_state(model, optax.sgd(0.05, momentum=0.9), key, (1, SIZE, SIZE, 1))


def _config(epochs=2, patience=0):
    return FitConfig(epochs=epochs, steps_per_epoch=64 // BATCH, patience=patience,
                     progress=False)


def _train(data, mode, stack, *, epochs=2, make_state=_make_state, train_step=None, **kw):
    train, val = _batches(data, epochs=epochs)
    return members.train_group(
        stack, make_state=make_state, train_step=train_step or make_train_step(),
        eval_step=make_eval_step(),
        parallel=data_parallel("shard_map"), train_data=train, val_data=val,
        config=_config(epochs), key=jax.random.PRNGKey(0), member_names=NAMES, mode=mode, **kw)


def test_member_targets_relabel_and_mask():
    labels, weights = members.member_targets(np.array([0, 1, 2]), TABLE,
                                             np.stack(WEIGHTS).astype(np.float32))
    np.testing.assert_array_equal(labels, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    np.testing.assert_allclose(weights, [[1.5, .75, .75], [.75, 1.5, .75], [.75, .75, 1.5],
                                         [0, 1, 1]])


def test_plan_groups_groups_by_class_count():
    table = np.array([[0, 1, 1, 1], [-1, 0, 1, 2]])           # cascade over 4 classes
    stacks = plan_groups([2, 3], table, [np.ones(2), np.ones(3)])
    assert [(s.members, s.num_classes) for s in stacks] == [((0,), 2), ((1,), 3)]
    stacks = plan_groups([2, 2], table[:, :3].clip(0, 1), [np.ones(2), np.ones(2)])
    assert [s.members for s in stacks] == [(0, 1)]
    with pytest.raises(ValueError, match="class weights"):
        plan_groups([2, 3], table, [np.ones(2), np.ones(2)])


@pytest.mark.slow
def test_stacked_equals_sequential(data):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    a = _train(data, "stacked", stack)
    b = _train(data, "sequential", stack)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        assert x.shape[0] == 4
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
    seq_val = np.array([[r["val_loss"][0] for r in b.records if r["members"] == [name]]
                        for name in NAMES]).T                          # [epochs, members]
    np.testing.assert_allclose([r["val_loss"] for r in a.records], seq_val, rtol=1e-4)
    # the members learned something different from each other and from the initial state
    p = jax.tree.leaves(a.variables["params"])[0]
    assert not np.allclose(p[0], p[1])


def _own_batches(data, member, epochs=2, n_train=64):
    """Member `member`'s own batches: its unmasked training examples, a fresh permutation
    (seeded by epoch and member) per pass, the common 64 // BATCH steps an epoch."""
    x, y = data
    own = np.flatnonzero(TABLE[member][y[:n_train]] >= 0)
    rng = np.random.default_rng(member)
    stream = np.concatenate([rng.permutation(own) for _ in range(epochs * n_train // len(own)
                                                                  + 1)])

    def train():
        for s in range(0, epochs * n_train, BATCH):
            idx = stream[s:s + BATCH]
            yield {"image": x[idx], "label": y[idx]}

    return Batches(train)


def _jitter(key, images):
    """An on-device 'augmentation' that uses its key, so per-member keys must agree."""
    return images + 0.05 * jax.random.normal(key, images.shape)


def test_member_targets_of_own_batches_use_each_members_column():
    labels = np.array([[0, 1, 2, 1], [2, 0, 1, 2]])            # [B=2, M=4]
    padding = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])           # member 3's first example
    member_labels, weights = members.member_targets(
        labels, TABLE, np.stack(WEIGHTS).astype(np.float32), padding)
    np.testing.assert_array_equal(member_labels, [[1, 0], [1, 0], [1, 0], [0, 1]])
    np.testing.assert_allclose(weights, [[1.5, .75], [1.5, .75], [1.5, .75], [0, 1]])


@pytest.mark.slow
def test_stacked_own_batches_equal_sequential_own(data):
    """Each stacked member trains on its own batch (MemberBatches, image [B, M, ...]) and
    matches the member trained alone on the same batches with the same keys."""
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    own = [_own_batches(data, m) for m in range(4)]
    step = make_train_step(prepare=_jitter)
    a = _train(data, "stacked", stack, member_data=own, train_step=step)
    b = _train(data, "sequential", stack, member_data=own, train_step=step)
    chex.assert_trees_all_close(a.variables, b.variables, atol=2e-5, rtol=1e-4)
    seq = {k: np.array([[r[k][0] for r in b.records if r["members"] == [name]]
                        for name in NAMES]).T for k in ("train_loss", "val_loss")}
    for k, v in seq.items():
        np.testing.assert_allclose([r[k] for r in a.records], v, rtol=1e-4, err_msg=k)
    first = a.records[0]                  # every member's own images count: 4 steps x B x M
    assert first["images_per_s"] * first["seconds"] == pytest.approx(4 * BATCH * 4)


@pytest.mark.slow
def test_batch_norm_members_stacked_equal_sequential(data):
    """The path of the README's main command: BatchNorm members under vmap, parameter by
    parameter and running statistic by statistic, against members trained one by one.

    The phantoms' flat background makes exact ties inside max-pooling windows; vmapped and
    plain convolutions may then route the gradient to different tied elements (both valid
    subgradients: the forward pass and BatchNorm statistics stay equal, conv kernels move
    ~1e-4 apart after one step for some initialisations). A little noise removes the ties,
    and the two modes then agree to float rounding."""
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    x, y = data
    tie_free = (x + np.random.default_rng(0).normal(0, 1e-2, x.shape).astype(np.float32), y)
    bn = functools.partial(_make_state, backbone="cnn_bn3x2")
    a = _train(tie_free, "stacked", stack, make_state=bn)
    b = _train(tie_free, "sequential", stack, make_state=bn)
    assert a.variables["batch_stats"], "cnn_bn3x2 has BatchNorm statistics"
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a.variables),
                            jax.tree.leaves(b.variables), strict=True):
        np.testing.assert_allclose(x, y, atol=5e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    stats = jax.tree.leaves(a.variables["batch_stats"])[0]
    assert not np.allclose(stats[0], stats[1])       # each member kept its own statistics


@pytest.mark.slow
def test_resume_equals_uninterrupted(data, tmp_path):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    full = _train(data, "stacked", stack, epochs=3)
    train, val = _batches(data, epochs=3)
    cut = Batches(lambda: itertools.islice(iter(train), 2 * 64 // BATCH + 1))  # dies in epoch 3
    with pytest.raises(ValueError, match="ran out in epoch 3"):
        members.train_group(
            stack, make_state=_make_state, train_step=make_train_step(),
            eval_step=make_eval_step(), parallel=data_parallel("shard_map"), train_data=cut,
            val_data=val, config=_config(3), key=jax.random.PRNGKey(0), member_names=NAMES,
            checkpoint_dir=tmp_path / "ck")
    # a plain iterator has no position to save: the resumed run skips what epochs 1-2 used
    skip = Batches(lambda: itertools.islice(iter(train), 2 * 64 // BATCH, None))
    resumed = members.train_group(
        stack, make_state=_make_state, train_step=make_train_step(),
        eval_step=make_eval_step(), parallel=data_parallel("shard_map"), train_data=skip,
        val_data=val, config=_config(3), key=jax.random.PRNGKey(0), member_names=NAMES,
        checkpoint_dir=tmp_path / "ck")
    assert [r["epoch"] for r in resumed.records] == [1, 2, 3]
    chex.assert_trees_all_equal(full.variables, resumed.variables)


@pytest.mark.slow
def test_nan_guard(data):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    x, y = data
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"training loss is nan for member\(s\) "
                                               r"\['a', 'b', 'c', 'b-vs-c'\] at step 1 \(epoch 1\)"):
        members.train_group(
            stack, make_state=_make_state, train_step=make_train_step(),
            eval_step=make_eval_step(), parallel=data_parallel("shard_map"),
            train_data=[{"image": bad[:BATCH], "label": y[:BATCH]}], val_data=None,
            config=FitConfig(epochs=1, steps_per_epoch=1, progress=False),
            key=jax.random.PRNGKey(0), member_names=NAMES)



def _initial(stack, seed):
    """Stacked variables of freshly built member states (member keys from `seed`)."""
    keys = members.member_keys(jax.random.PRNGKey(seed), stack.members)
    state = jax.vmap(lambda k: _make_state(stack.num_classes, k))(keys)
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def _differ(a, b) -> bool:
    return not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                       strict=True))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_init_variables_are_the_starting_point(data):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    start = _initial(stack, seed=7)       # not what key 0 would initialise
    assert _differ(start["params"], _initial(stack, seed=0)["params"])
    frozen = members.train_group(         # lr 0: the params stay where they started
        stack, make_state=lambda c, k: create_train_state(
            backbones.create("simple_cnn", num_classes=c, width=0.25), optax.sgd(0.0), k,
            (1, SIZE, SIZE, 1)),
        train_step=make_train_step(), eval_step=make_eval_step(),
        parallel=data_parallel("shard_map"), train_data=_batches(data)[0],
        val_data=_batches(data)[1], config=_config(1), key=jax.random.PRNGKey(0),
        member_names=NAMES, init_variables=start)
    _assert_trees_equal(frozen.variables["params"], start["params"])


@pytest.mark.slow
def test_init_variables_stacked_equals_sequential(data, tmp_path):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    start = _initial(stack, seed=7)
    a = _train(data, "stacked", stack, epochs=1, init_variables=start,
               checkpoint_dir=tmp_path / "ck")
    b = _train(data, "sequential", stack, epochs=1, init_variables=start)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
    assert _differ(a.variables["params"], start["params"])   # it trained on
    # a rerun finds the finished checkpoint: it is restored, other init_variables ignored
    again = _train(data, "stacked", stack, epochs=1, init_variables=_initial(stack, seed=8),
                   checkpoint_dir=tmp_path / "ck")
    _assert_trees_equal(again.variables, a.variables)


@pytest.mark.slow
def test_init_variables_of_the_wrong_shape_are_refused(data):
    (stack,) = plan_groups([2] * 4, TABLE, WEIGHTS)
    two = jax.tree.map(lambda x: x[:2], _initial(stack, seed=7))
    for mode in members.MEMBER_MODES:
        with pytest.raises(ValueError, match="leading member axis of 4"):
            _train(data, mode, stack, epochs=1, init_variables=two)
    (wide,) = plan_groups([3] * 4, np.array([[0, 1, 2]] * 4), [np.ones(3)] * 4)
    with pytest.raises(ValueError, match=r"init_variables\['params'\]\['head'\].*has shape"):
        _train(data, "stacked", wide, epochs=1, init_variables=_initial(stack, seed=7))
