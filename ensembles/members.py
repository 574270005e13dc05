"""Ensemble members trained together: one model per task, parameters stacked on a member axis.

All members of one strategy and backbone see the same images; each learns its own labels,
computed on device from the relabel table (`table[:, y]`, -1 = not this member's example)
and weighted by its own class weights. The engine's pure per-shard `train_step` is
`jax.vmap`-ed over the member axis (image shared) *before* the parallel wrapper, so pmap and
shard_map, checkpoints and resume work on the stacked state as on a single model.

Members with different class counts (a cascade: stage 1 has 2 classes, stage 2 has K-1)
train as separate stacks, one per class count: no padded head, no masked logits, and a
K=3 cascade (2 and 2 classes) still trains as one stack.

`--members sequential` trains the same members one after another with the plain,
un-vmapped step (for backbones too big to hold M copies); it uses the same keys, batches and
per-member early stopping, so both modes give the same members within float tolerance.

`init_variables` starts the members from given weights instead of a fresh initialisation (the
second phase of two-phase fine-tuning continues from the head-only phase's best variables).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from backbones.training.state import checkpoint_items, with_checkpoint_items

MEMBER_MODES = ("stacked", "sequential")


@dataclass(frozen=True)
class Stack:
    """Members that train as one vmapped model: same class count, consecutive in the plan."""

    members: tuple[int, ...]      # indices into the strategy's member list
    num_classes: int
    table: np.ndarray             # int32 [M_s, K]: member label per original class, -1 = masked
    class_weight: np.ndarray      # float32 [M_s, num_classes]

    @property
    def size(self) -> int:
        return len(self.members)


def plan_stacks(num_classes: Sequence[int], table: np.ndarray, class_weight: Sequence[np.ndarray]
                ) -> list[Stack]:
    """Group members by class count, keeping member order within a group.

    `class_weight[m]` has `num_classes[m]` entries; the result is one Stack per distinct count,
    in order of first appearance.
    """
    table = np.asarray(table, np.int32)
    if table.ndim != 2 or table.shape[0] != len(num_classes):
        raise ValueError(f"relabel table must be [members={len(num_classes)}, K]; "
                         f"got {table.shape}")
    stacks = []
    for c in dict.fromkeys(num_classes):
        idx = tuple(m for m, n in enumerate(num_classes) if n == c)
        weights = np.stack([np.asarray(class_weight[m], np.float32) for m in idx])
        if weights.shape != (len(idx), c):
            raise ValueError(f"class weights of members {idx} must be [{len(idx)}, {c}]; "
                             f"got {weights.shape}")
        stacks.append(Stack(idx, int(c), table[list(idx)], weights))
    return stacks


def member_targets(labels: jax.Array, table: jax.Array, class_weight: jax.Array,
                   weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Member labels and weights [M, B] from original labels [B], on device.

    A masked example (table entry -1) gets label 0 and weight 0, so it adds nothing to the
    loss or the accuracy; `weight` (e.g. 0 for padding) multiplies every member's weight.
    """
    member_label = jnp.asarray(table)[:, labels]
    keep = member_label >= 0
    safe = jnp.where(keep, member_label, 0)
    w = jnp.take_along_axis(jnp.asarray(class_weight), safe, axis=1) * keep
    if weight is not None:
        w = w * weight[None, :]
    return safe.astype(jnp.int32), w.astype(jnp.float32)


def stacked_train_step(train_step: Callable, table: np.ndarray, class_weight: np.ndarray
                       ) -> Callable:
    """A per-shard step over a stacked state that looks like a single-model step to the wrapper.

    The batch is the ordinary {"image", "label"[, "weight"]} with original labels; member
    labels and weights are derived inside, then `train_step` runs under `jax.vmap` with the
    state and targets on axis 0 and the image shared. Metrics come back per member, [M].
    """
    table = jnp.asarray(table, jnp.int32)
    class_weight = jnp.asarray(class_weight, jnp.float32)
    vstep = jax.vmap(train_step, in_axes=(0, {"image": None, "label": 0, "weight": 0}))

    def step(state, batch):
        labels, weights = member_targets(batch["label"], table, class_weight, batch.get("weight"))
        return vstep(state, {"image": batch["image"], "label": labels, "weight": weights})

    return step


def relabel_for_member(train_step: Callable, table_row: np.ndarray,
                       class_weight_row: np.ndarray) -> Callable:
    """Adapt an already wrapped plain step to original labels for one member.

    The targets are computed on the host, so every member of a sequential run reuses the one
    compiled step (the table is data here, not a traced constant).
    """
    table = np.asarray(table_row, np.int32)[None]
    class_weight = np.asarray(class_weight_row, np.float32)[None]

    def step(state, batch):
        labels, weights = member_targets(np.asarray(batch["label"]), table, class_weight,
                                         batch.get("weight"))
        return train_step(state, {"image": batch["image"], "label": np.asarray(labels[0]),
                                  "weight": np.asarray(weights[0])})

    return step


def stacked_eval_step(eval_step: Callable) -> Callable:
    """vmap an eval step `(state, batch) -> logits [B, C]` to stacked logits [M, B, C]."""
    return jax.vmap(eval_step, in_axes=(0, None))


def stack_trees(trees: Sequence) -> object:
    """Stack identical pytrees (member states or variables) on a new leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, m: int) -> object:
    """Member `m` of a stacked pytree."""
    return jax.tree.map(lambda x: x[m], tree)


def member_keys(key: jax.Array, members: Sequence[int]) -> jax.Array:
    """One key per member, derived from the member's global index so every mode agrees."""
    return jnp.stack([jax.random.fold_in(key, m) for m in members])


# -- training ----------------------------------------------------------------------------


@dataclass
class EarlyStopping:
    """Per-member early stopping on validation loss, with the best variables kept per member.

    A member stops when its loss has not improved for `patience` epochs (0: never stops);
    in a stack the others keep training while a stopped member's best snapshot is frozen, so
    the stack selects exactly what each member trained alone would select.
    """

    best_loss: np.ndarray        # [M]
    best_epoch: np.ndarray       # [M]
    stale: np.ndarray            # [M] epochs since the last improvement
    active: np.ndarray           # [M] bool
    patience: int

    @classmethod
    def start(cls, size: int, patience: int) -> EarlyStopping:
        return cls(np.full(size, np.inf), np.full(size, -1), np.zeros(size, np.int64),
                   np.ones(size, bool), patience)

    def update(self, epoch: int, val_loss: np.ndarray) -> np.ndarray:
        """Record one epoch; returns the mask of members whose snapshot must be replaced."""
        improved = self.active & (val_loss < self.best_loss)
        self.best_loss = np.where(improved, val_loss, self.best_loss)
        self.best_epoch = np.where(improved, epoch, self.best_epoch)
        self.stale = np.where(improved, 0, self.stale + self.active)
        if self.patience:
            self.active = self.active & (self.stale < self.patience)
        return improved

    def as_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "stale": self.stale,
                "active": self.active}

    def restore(self, d: dict) -> None:
        for k in ("best_loss", "best_epoch", "stale", "active"):
            setattr(self, k, np.asarray(d[k]))


def member_val_loss(logits: np.ndarray, labels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Mean cross-entropy per member over its own validation examples; logits [M, N, C]."""
    logits = np.asarray(logits, np.float64)
    member_label = np.asarray(table)[:, labels]                               # [M, N]
    keep = member_label >= 0
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(keep, member_label, 0)[..., None], -1)[..., 0]
    return (nll * keep).sum(1) / np.maximum(keep.sum(1), 1)


class StackCheckpoints:
    """Per-epoch orbax checkpoints of one stack's training: state, best snapshot, stopper.

    Orbax writes each step into a temporary folder and renames it when complete, so an
    interrupted save is never restored; `max_to_keep` bounds the disk used.
    """

    def __init__(self, directory: Path, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state, best, stopper: dict, records: list[dict]) -> None:
        items = {"state": checkpoint_items(state), "best": best,
                 "stopper": {k: np.asarray(v) for k, v in stopper.items()}}
        self.manager.save(epoch, args=ocp.args.Composite(
            items=ocp.args.StandardSave(items), records=ocp.args.JsonSave(records)))
        self.manager.wait_until_finished()

    def restore_into(self, state, best_template, size: int):
        """Restore the latest epoch, shaped like `state` / `best_template`, for `_fit` to resume."""
        epoch = self.manager.latest_step()
        template = {"state": checkpoint_items(state), "best": best_template,
                    "stopper": EarlyStopping.start(size, 0).as_dict()}
        restored = self.manager.restore(epoch, args=ocp.args.Composite(
            items=ocp.args.StandardRestore(jax.tree.map(np.asarray, template)),
            records=ocp.args.JsonRestore()))
        items = restored["items"]
        state = with_checkpoint_items(state, jax.tree.map(jnp.asarray, items["state"]))
        return state, items["best"], items["stopper"], list(restored["records"]), epoch


def _finite_or_raise(values: np.ndarray, what: str, epoch: int, step: int, members) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        names = [members[i] for i in np.flatnonzero(bad)]
        raise FloatingPointError(
            f"non-finite {what} at epoch {epoch} step {step} for member(s) {names}; "
            "no checkpoint was written with these values (lower --lr or check the data)")


def _predict_all(predict: Callable, state, val_batches: Callable) -> tuple[np.ndarray, np.ndarray]:
    logits, labels, size = [], [], None
    for batch in val_batches():
        images = np.asarray(batch["image"])
        size, n = size or len(images), len(images)
        if n < size:                     # pad the last batch: one compiled shape
            images = np.concatenate([images, np.repeat(images[-1:], size - n, axis=0)])
        logits.append(np.asarray(predict(state, {"image": images}))[:, :n])
        labels.append(np.asarray(batch["label"]))
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def _fit(state, step: Callable, predict: Callable, *, table: np.ndarray, members: Sequence[int],
         parallel, train_batches: Callable, val_batches: Callable, epochs: int, patience: int,
         stacked: bool, checkpoints=None, on_epoch: Callable | None = None,
         desc: str = "members", progress: bool = True):
    """Train one stack (or one member as a stack of one) with per-member early stopping.

    `predict(state, batch)` returns logits [M, B, C]; `step` returns per-member metrics [M]
    (scalars when not `stacked`: one member's plain state). Returns the best variables with a
    member axis, the per-epoch records and the stopper.
    """
    from tqdm import tqdm

    size = len(members)
    stopper = EarlyStopping.start(size, patience)
    best = None
    records: list[dict] = []
    start_epoch = 0
    if checkpoints is not None and checkpoints.latest_step() is not None:
        template = {"params": state.params, "batch_stats": state.batch_stats}
        if not stacked:
            template = jax.tree.map(lambda x: np.asarray(x)[None], template)
        state, best, stopper_d, records, start_epoch = checkpoints.restore_into(
            state, template, size)
        stopper.restore(stopper_d)
    state = parallel.replicate(state)
    step_count = records[-1]["step"] if records else 0
    for epoch in range(start_epoch, epochs):
        if not stopper.active.any():
            break
        t0, n_images, sums = time.perf_counter(), 0, []
        bar = tqdm(train_batches(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not progress)
        for batch in bar:
            state, metrics = step(state, {"image": batch["image"], "label": batch["label"]})
            metrics = jax.tree.map(lambda x: np.atleast_1d(np.asarray(x)), metrics)
            step_count += 1
            _finite_or_raise(metrics["loss"], "training loss", epoch, step_count, members)
            sums.append(metrics)
            n_images += len(batch["label"])
            bar.set_postfix(loss=f"{float(np.mean(metrics['loss'])):.3f}")
        seconds = time.perf_counter() - t0
        host = jax.device_get(parallel.unreplicate(state))
        logits, labels = _predict_all(predict, state, val_batches)
        logits = logits.reshape(size, *logits.shape[-2:])
        val_loss = member_val_loss(logits, labels, table)
        _finite_or_raise(val_loss, "validation loss", epoch, step_count, members)
        improved = stopper.update(epoch, val_loss)
        variables = {"params": host.params, "batch_stats": host.batch_stats}
        if not stacked:
            variables = jax.tree.map(lambda x: np.asarray(x)[None], variables)
        best = variables if best is None else jax.tree.map(
            lambda new, old, keep=improved: np.where(keep.reshape(-1, *[1] * (np.ndim(new) - 1)),
                                                     new, old),
            variables, best)
        record = {"epoch": epoch + 1, "step": step_count,
                  "train_loss": np.mean([m["loss"] for m in sums], 0).tolist(),
                  "train_accuracy": np.mean([m["accuracy"] for m in sums], 0).tolist(),
                  "val_loss": val_loss.tolist(), "active": stopper.active.tolist(),
                  "images_per_s": n_images / seconds, "seconds": seconds}
        records.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if checkpoints is not None:
            checkpoints.save(epoch + 1, host, best, stopper.as_dict(), records)
    return best, records, stopper


def _check_like(variables: dict, template: dict) -> None:
    """ValueError naming the first leaf whose path or shape differs from `template`'s."""
    if jax.tree.structure(variables) != jax.tree.structure(template):
        raise ValueError("init_variables do not match the members' variables: tree structure "
                         f"{jax.tree.structure(variables)} != {jax.tree.structure(template)}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(variables),
                            jax.tree.leaves(template), strict=True):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"init_variables{jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(a)}; the members' state needs {np.shape(b)}")


def start_from(state, variables: dict, *, stacked: bool):
    """`state` with its params and batch_stats replaced by `variables` and a fresh opt state.

    The optimiser state is rebuilt with `state.tx.init` on the new params (vmapped over the
    member axis when `stacked`): the optimisers in backbones/training/optim.py keep zeros and
    a count, but an optimiser that keeps a copy of the parameters would otherwise start from
    the discarded initialisation. Step and rng stay as built.
    """
    current = {"params": state.params, "batch_stats": state.batch_stats}
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    _check_like(variables, current)
    variables = jax.tree.map(lambda v, c: jnp.asarray(v, c.dtype), variables, current)
    init = jax.vmap(state.tx.init) if stacked else state.tx.init
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                         opt_state=init(variables["params"]))


@dataclass
class TrainedStack:
    """What one stack's training produced: best variables [M_s, ...] and its history."""

    stack: Stack
    variables: dict
    records: list[dict]
    best_epoch: np.ndarray


def train_stack(stack: Stack, *, make_state: Callable, train_step: Callable,
                eval_step: Callable, parallel, train_batches: Callable, val_batches: Callable,
                epochs: int, patience: int, key: jax.Array, mode: str = "stacked",
                checkpoint_dir: Path | None = None, on_epoch: Callable | None = None,
                progress: bool = True, init_variables: dict | None = None) -> TrainedStack:
    """Train the members of `stack` together (vmapped) or one after another (sequential).

    make_state(num_classes, key) -> TrainState of one member; train_batches(epoch) and
    val_batches() yield {"image", "label"} batches (the same order in both modes); member m's
    initial key is fold_in(key, m) in both modes; states are built under jit (one trace, so
    every sequential member shares one compiled step). Checkpoints go under checkpoint_dir and a
    rerun with the same directory resumes from the last finished epoch.

    init_variables: {"params", "batch_stats"} with a leading member axis [M_s, ...] (what
    TrainedStack.variables holds) replace the fresh initialisation (start_from; member i's
    slice in sequential mode); a checkpoint being resumed takes precedence over them.
    """
    if mode not in MEMBER_MODES:
        raise ValueError(f"unknown member mode {mode!r}; choose one of {', '.join(MEMBER_MODES)}")
    if init_variables is not None:
        sizes = {np.shape(x)[:1] for x in jax.tree.leaves(init_variables)}
        if sizes != {(stack.size,)}:
            raise ValueError(f"init_variables need a leading member axis of {stack.size} (the "
                             f"stack's members); got leading shapes {sorted(sizes)}")
    keys = member_keys(key, stack.members)
    common = {"parallel": parallel, "train_batches": train_batches, "val_batches": val_batches,
              "epochs": epochs, "patience": patience, "progress": progress}
    if mode == "stacked":
        state = jax.jit(jax.vmap(lambda k: make_state(stack.num_classes, k)))(keys)
        if init_variables is not None:
            state = start_from(state, init_variables, stacked=True)
        step = parallel.train(stacked_train_step(train_step, stack.table, stack.class_weight))
        predict = parallel.predict(stacked_eval_step(eval_step), out_axis=1)
        ckpt = StackCheckpoints(checkpoint_dir) if checkpoint_dir else None
        best, records, stopper = _fit(state, step, predict, table=stack.table,
                                      members=stack.members, stacked=True, checkpoints=ckpt,
                                      desc=f"{stack.size} stacked members", on_epoch=on_epoch,
                                      **common)
        return TrainedStack(stack, best, records, stopper.best_epoch)
    parts, all_records, best_epochs = [], [], []
    plain = parallel.train(train_step)
    one = parallel.predict(eval_step)
    init = jax.jit(lambda k: make_state(stack.num_classes, k))   # one trace: one apply_fn
    for i, m in enumerate(stack.members):
        state = init(keys[i])
        if init_variables is not None:
            state = start_from(state, unstack_tree(init_variables, i), stacked=False)
        step = relabel_for_member(plain, stack.table[i], stack.class_weight[i])
        ckpt = StackCheckpoints(Path(checkpoint_dir) / f"member-{m}") if checkpoint_dir else None
        log = None if on_epoch is None else (lambda r, m=m: on_epoch({**r, "member": m}))
        best, records, stopper = _fit(state, step, lambda s, b, one=one: one(s, b)[None],
                                      table=stack.table[i:i + 1], members=(m,), stacked=False,
                                      checkpoints=ckpt, desc=f"member {m}", on_epoch=log,
                                      **common)
        parts.append(best)
        all_records.extend({**r, "member": m} for r in records)
        best_epochs.append(stopper.best_epoch[0])
    variables = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return TrainedStack(stack, variables, all_records, np.asarray(best_epochs))
