"""Ensemble members trained together: one model per task, parameters stacked on a member axis.

All members of one strategy and backbone see the same images; each learns its own labels,
computed on device from the relabel table (`table[:, y]`, -1 = not this member's example)
and weighted by its own class weights. The engine's pure per-shard `train_step` is
`jax.vmap`-ed over the member axis (image shared) *before* the parallel wrapper, so pmap and
shard_map, checkpoints and resume work on the stacked state as on a single model.

Members with different class counts (a cascade: stage 1 has 2 classes, stage 2 has K-1)
train as separate member groups, one per class count: no padded head, no masked logits, and a
K=3 cascade (2 and 2 classes) still trains as one member group.

`--members sequential` trains the same members one after another with the plain,
un-vmapped step (for backbones too big to hold M copies); it uses the same keys, batches and
per-member early stopping, so both modes give the same members within float tolerance.

With `member_data` "own" each member trains on its own examples, the classes its table row
does not mask (an OvO member on its pair), for the same number of steps per epoch as every
member of its group (`own_examples`): one optimiser schedule, one compiled step, and no
compute spent on examples weighted 0. Sequential members each iterate their own loader;
stacked members get one batch from each loader per step, stacked on axis 1 (`MemberBatches`:
image [B, M, ...], label [B, M]) so the data axis stays first for the parallel wrappers, and
the vmapped step maps the image over axis 1 instead of sharing it.

`init_variables` starts the members from given weights instead of a fresh initialisation (the
second phase of two-phase fine-tuning continues from the head-only phase's best variables).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from backbones.training import distributed
from backbones.training.checkpoint import checkpointable
from backbones.training.loop import FitConfig, ValMetrics, classification_metrics, fit
from ensembles.combine.groups import MemberGroup
from ensembles.combine.tasks import relabel
from ensembles.config import MEMBER_MODES


def relabel_metrics(table: np.ndarray) -> ValMetrics:
    """The engine's `val_metrics` for members with relabel table [M, K]: validation loss,
    accuracy and macro-F1 of each member over its own examples, in its own labels."""
    table = np.asarray(table)

    def metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        return classification_metrics(logits, relabel(table, np.asarray(labels)))

    return metrics


def member_targets(labels: jax.Array, table: jax.Array, class_weight: jax.Array,
                   weight: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Member labels and weights [M, B] from original labels, on device: [B] when every
    member sees the batch, [B, M] when column m is member m's own batch (`MemberBatches`).

    A masked example (table entry -1) gets label 0 and weight 0, so it adds nothing to the
    loss or the accuracy; `weight` (e.g. 0 for padding, shaped like `labels`) multiplies the
    weights.
    """
    member_label = relabel(jnp.asarray(table), labels)
    if weight is not None:
        weight = weight.T if labels.ndim == 2 else weight[None, :]
    keep = member_label >= 0
    safe = jnp.where(keep, member_label, 0)
    w = jnp.take_along_axis(jnp.asarray(class_weight), safe, axis=1) * keep
    if weight is not None:
        w = w * weight
    return safe.astype(jnp.int32), w.astype(jnp.float32)


def stacked_train_step(train_step: Callable, table: np.ndarray, class_weight: np.ndarray,
                       *, own_batches: bool = False) -> Callable:
    """A per-shard step over a stacked state that looks like a single-model step to the wrapper.

    The batch is the ordinary {"image", "label"[, "weight"]} with original labels; member
    labels and weights are derived inside, then `train_step` runs under `jax.vmap` with the
    state and targets on axis 0 and the image shared, or with `own_batches` (image
    [B, M, ...], label [B, M]: `MemberBatches`) member m's image column m. Metrics come back
    per member, [M].
    """
    table = jnp.asarray(table, jnp.int32)
    class_weight = jnp.asarray(class_weight, jnp.float32)
    image_axis = 1 if own_batches else None
    vstep = jax.vmap(train_step, in_axes=(0, {"image": image_axis, "label": 0, "weight": 0}))

    def step(state, batch):
        labels, weights = member_targets(batch["label"], table, class_weight, batch.get("weight"))
        return vstep(state, {"image": batch["image"], "label": labels, "weight": weights})

    return step


def relabel_for_member(train_step: Callable, table_row: np.ndarray,
                       class_weight_row: np.ndarray) -> Callable:
    """Adapt an already wrapped plain step to original labels for one member.

    The targets are computed outside the step, with the labels where they are (a global
    array stays on the devices of every process), so every member of a sequential run
    reuses the one compiled step (the table is data here, not a traced constant).
    """
    table = np.asarray(table_row, np.int32)[None]
    class_weight = np.asarray(class_weight_row, np.float32)[None]

    def step(state, batch):
        labels, weights = member_targets(batch["label"], table, class_weight,
                                         batch.get("weight"))
        return train_step(state, {"image": batch["image"], "label": labels[0],
                                  "weight": weights[0]})

    return step


def stacked_eval_step(eval_step: Callable) -> Callable:
    """vmap an eval step `(state, batch) -> logits [B, C]` to stacked logits [M, B, C]."""
    return jax.vmap(eval_step, in_axes=(0, None))


def unstack_tree(tree, m: int) -> object:
    """Member `m` of a stacked pytree."""
    return jax.tree.map(lambda x: x[m], tree)


def member_keys(key: jax.Array, members: Sequence[int]) -> jax.Array:
    """One key per member, derived from the member's global index so every mode agrees."""
    return jnp.stack([jax.random.fold_in(key, m) for m in members])


def own_examples(group: MemberGroup, indices: np.ndarray, labels: np.ndarray, batch_size: int
                 ) -> tuple[list[np.ndarray], int]:
    """Each member's own training examples and the group's common steps per epoch.

    Member i keeps the entries of `indices` (duplicates from oversampling included) whose
    class `labels[indices]` it does not mask; every member runs round(mean own count /
    batch_size) steps per epoch (at least 1), so with balanced pairs each member's epoch is
    one pass over its own examples, and otherwise the same number of steps for all.
    """
    indices = np.asarray(indices)
    classes = np.asarray(labels)[indices]
    mine = relabel(group.table, classes) >= 0                          # [M, N]
    own = [indices[mine[i]] for i in range(group.size)]
    empty = [i for i, o in enumerate(own) if not len(o)]
    if empty:
        raise ValueError(f"member(s) {[group.members[i] for i in empty]} have no training "
                         "examples of their own")
    steps = max(1, round(float(np.mean([len(o) for o in own])) / batch_size))
    return own, steps


class MemberBatches:
    """Re-iterable: per step one batch from each member's loader, every leaf stacked on axis
    1 ([B, M, ...]: the data axis stays first, where the parallel wrappers split it).

    Iterating it iterates every loader afresh, as a sequential run iterates each member's
    loader; the iterator saves and restores the position of all members' Grain iterators
    when they all can (`CheckpointableStackedIterator`), so a stacked run resumes exactly.
    """

    def __init__(self, loaders: Sequence[Iterable[dict]]):
        if not loaders:
            raise ValueError("MemberBatches needs at least one member loader")
        self.loaders = tuple(loaders)

    def __iter__(self) -> Iterator[dict]:
        iterators = [iter(loader) for loader in self.loaders]
        if all(checkpointable(it) for it in iterators):
            return CheckpointableStackedIterator(iterators)
        return StackedIterator(iterators)


class StackedIterator:
    """The next batch of every member iterator, stacked on axis 1; stops when any stops."""

    def __init__(self, iterators: Sequence[Iterator[dict]]):
        self._iterators = list(iterators)

    def __iter__(self) -> StackedIterator:
        return self

    def __next__(self) -> dict:
        batches = [next(it) for it in self._iterators]
        return {k: np.stack([np.asarray(b[k]) for b in batches], axis=1) for k in batches[0]}


class CheckpointableStackedIterator(StackedIterator):
    """A `StackedIterator` over Grain DataLoader iterators (states as JSON bytes), with the
    protocol Grain's orbax handler calls: one JSON list of the members' states."""

    def get_state(self) -> bytes:
        return json.dumps([it.get_state().decode() for it in self._iterators]).encode()

    def set_state(self, state: bytes) -> None:
        states = json.loads(state.decode())
        if len(states) != len(self._iterators):
            raise ValueError(f"the saved data position holds {len(states)} member iterators; "
                             f"this member group has {len(self._iterators)}")
        for it, member_state in zip(self._iterators, states, strict=True):
            it.set_state(member_state.encode())

    def start_prefetch(self) -> None:
        """Let every member iterator start reading (Grain's handler calls this after a
        restore)."""
        for it in self._iterators:
            start = getattr(it, "start_prefetch", None)
            if start is not None:
                start()


# -- training ----------------------------------------------------------------------------


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
class TrainedGroup:
    """What one member group's training produced: best variables [M_s, ...], its records and each
    member's best epoch (1-based; 0: never improved)."""

    group: MemberGroup
    variables: dict
    records: list[dict]
    best_epoch: np.ndarray


def train_group(group: MemberGroup, *, make_state: Callable, train_step: Callable,
                eval_step: Callable, parallel, train_data: Iterable[dict] | None,
                val_data: Iterable[dict] | None, config: FitConfig, key: jax.Array,
                member_names: Sequence[str], mode: str = "stacked",
                member_data: Sequence[Iterable[dict]] | None = None,
                checkpoint_dir: Path | None = None, on_record: Callable | None = None,
                init_variables: dict | None = None) -> TrainedGroup:
    """Train the members of `group` together (vmapped) or one after another (sequential),
    through the one loop (`backbones.training.fit`).

    make_state(num_classes, key) -> TrainState of one member; `train_data` yields all
    epochs' {"image", "label"} batches with original labels (iterated afresh per member in
    sequential mode, so both modes see the same batches); member m's initial key is
    fold_in(key, m) in both modes; states are built under jit (one trace, so every sequential
    member shares one compiled step). Checkpoints go under checkpoint_dir (member-<m>/ per
    member when sequential) and a rerun with the same directory resumes exactly.

    init_variables: {"params", "batch_stats"} with a leading member axis [M_s, ...] (what
    TrainedGroup.variables holds) replace the fresh initialisation (start_from; member i's
    slice in sequential mode); a checkpoint being resumed takes precedence over them.

    member_data: one loader per member of the group, each member's own batches
    (`own_examples`), in place of the shared `train_data`: iterated by its member when
    sequential, all together (`MemberBatches`) when stacked.
    """
    if mode not in MEMBER_MODES:
        raise ValueError(f"unknown member mode {mode!r}; choose one of {', '.join(MEMBER_MODES)}")
    if init_variables is not None:
        sizes = {np.shape(x)[:1] for x in jax.tree.leaves(init_variables)}
        if sizes != {(group.size,)}:
            raise ValueError(f"init_variables need a leading member axis of {group.size} (the "
                             f"group's members); got leading shapes {sorted(sizes)}")
    if member_data is not None and len(member_data) != group.size:
        raise ValueError(f"member_data needs one loader per member ({group.size}); got "
                         f"{len(member_data)}")
    keys = member_keys(key, group.members)
    names = [member_names[m] for m in group.members]
    common = {"parallel": parallel, "train_data": train_data, "val_data": val_data,
              "config": config, "on_record": on_record}
    say = printer(config.progress)
    start = time.perf_counter()
    if mode == "stacked":
        numbers = ", ".join(str(m + 1) for m in group.members)
        say(f"members {numbers} of {len(member_names)} ({', '.join(names)}), trained together"
            if len(names) > 1 else f"member {numbers} of {len(member_names)}: {names[0]}")
        # XLA's Eigen convolutions (the CPU default) compute vmapped convolutions ~3e-3 off
        # YNNPACK's after 4 steps, where plain ones agree to 3e-7: stacked members keep YNNPACK.
        ynnpack = ()
        state = jax.jit(jax.vmap(lambda k: make_state(group.num_classes, k)))(keys)
        if init_variables is not None:
            state = start_from(state, init_variables, stacked=True)
        if member_data is not None:
            common["train_data"] = MemberBatches(member_data)
        result = fit(state, step=parallel.train(stacked_train_step(
                         train_step, group.table, group.class_weight,
                         own_batches=member_data is not None), compiler_options=ynnpack),
                     predict=parallel.predict(stacked_eval_step(eval_step), out_axis=1,
                                              compiler_options=ynnpack),
                     val_metrics=relabel_metrics(group.table), stacked=True,
                     member_names=names, checkpoint_dir=checkpoint_dir,
                     desc=f"{len(names)} members ({', '.join(names)})", **common)
        seconds = time.perf_counter() - start
        for i, m in enumerate(group.members):
            say(member_done(names[i], m, len(member_names), result.records, i,
                            int(result.best_epoch[i]), config.monitor, seconds))
        return TrainedGroup(group, result.variables, result.records, result.best_epoch)
    parts, all_records, best_epochs = [], [], []
    plain = parallel.train(train_step)
    one = parallel.predict(eval_step)
    init = jax.jit(lambda k: make_state(group.num_classes, k))   # one trace: one apply_fn
    for i, m in enumerate(group.members):
        say(f"member {m + 1} of {len(member_names)}: {names[i]}")
        start = time.perf_counter()
        state = init(keys[i])
        if init_variables is not None:
            state = start_from(state, unstack_tree(init_variables, i), stacked=False)
        if member_data is not None:
            common["train_data"] = member_data[i]
        result = fit(state, step=relabel_for_member(plain, group.table[i], group.class_weight[i]),
                     predict=lambda s, b: one(s, b)[None],
                     val_metrics=relabel_metrics(group.table[i:i + 1]),
                     stacked=False, member_names=[names[i]],
                     checkpoint_dir=(Path(checkpoint_dir) / f"member-{m}"
                                     if checkpoint_dir else None),
                     desc=f"member {names[i]}", **common)
        say(member_done(names[i], m, len(member_names), result.records, 0,
                        int(result.best_epoch[0]), config.monitor,
                        time.perf_counter() - start))
        parts.append(result.variables)
        all_records.extend(result.records)
        best_epochs.append(result.best_epoch[0])
    variables = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return TrainedGroup(group, variables, all_records, np.asarray(best_epochs))


def printer(progress: bool) -> Callable[[str], None]:
    """Print a line that stays on screen (above any bar), on process 0 and with progress."""
    if not progress or not distributed.is_primary():
        return lambda line: None
    return lambda line: tqdm.write(line, file=sys.stderr)


def member_done(name: str, member: int, total: int, records: Sequence[dict], column: int,
                best_epoch: int, monitor: str, seconds: float) -> str:
    """The line that closes a member's training: its best epoch and monitored value there
    (column `column` of the records' per-member lists) and the time it took."""
    at = [r for r in records if r["epoch"] == best_epoch and r.get(monitor) is not None]
    value = f", {monitor} {at[-1][monitor][column]:.4f}" if at else ""
    best = f"best epoch {best_epoch}{value}" if best_epoch else "no improvement"
    return f"member {member + 1} of {total} ({name}) done: {best}, {seconds:.0f} s"
