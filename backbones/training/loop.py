"""The one training loop: a member group of M >= 1 members, per-member early stopping, resume.

A single model is a group of one member. The caller hands in the wrapped step and predict
functions (`DataParallel.train` / `.predict`, vmapped over members or not) and a validation
metrics callback (per member, from the members' logits and the loader's labels; the loop
knows nothing of what the labels mean to a member). The loop owns the Python-side concerns,
as in Flax's ImageNet example: progress bars, per-member validation, early stopping on any monitor, the NaN guard, one atomic checkpoint per epoch
(state, best variables, stopper, records and the Grain iterator position) and the records a
metric writer receives. The steps stay pure.

Across several processes the loop runs unchanged on every process: each one's share of a
batch becomes one global batch on the mesh of all devices (`prefetch_to_device`), the
replicated state is read back from this process's copy, and validation gathers every
process's logits so early stopping decides the same everywhere.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.special import log_softmax
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from backbones.training import distributed
from backbones.training.checkpoint import Checkpointer
from backbones.training.parallel import AXIS, DataParallel
from backbones.training.predict import predict_logits
from backbones.training.state import TrainState
from data_pipeline.prefetch import prefetch_to_device

MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_macro_f1": "max"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the members, the step and the last
    good checkpoint."""


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How long to train, when each member stops, how many checkpoints to keep."""

    epochs: int
    steps_per_epoch: int
    monitor: str = "val_loss"
    patience: int | None = 3          # epochs without improvement; None or 0: never stop
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise ValueError(f"unknown monitor {self.monitor!r}; choose one of "
                             f"{', '.join(MONITORS)}")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1: the training split is smaller "
                             "than one batch")


@dataclasses.dataclass
class FitResult:
    """Best variables per member (leading member axis), the records and each member's best
    epoch (1-based; 0: never improved)."""

    variables: dict
    records: list[dict]
    best_epoch: np.ndarray
    stopped_early: bool


@dataclasses.dataclass
class EarlyStopping:
    """Per-member early stopping on a monitor; a stopped member's best snapshot is frozen
    while the others train on, so a member group selects what each member alone would select."""

    mode: str                    # "min" | "max"
    patience: int | None
    best: np.ndarray             # [M] best monitored value
    best_epoch: np.ndarray       # [M] 1-based; 0 = never improved
    stale: np.ndarray            # [M] epochs since the last improvement
    active: np.ndarray           # [M] bool

    @classmethod
    def start(cls, size: int, monitor: str, patience: int | None) -> EarlyStopping:
        mode = MONITORS[monitor]
        worst = np.inf if mode == "min" else -np.inf
        return cls(mode, patience, np.full(size, worst), np.zeros(size, np.int64),
                   np.zeros(size, np.int64), np.ones(size, bool))

    def update(self, epoch: int, value: np.ndarray | None) -> np.ndarray:
        """Record epoch `epoch` (1-based); returns the members whose snapshot is replaced.
        Without validation (`value` None) every active member's latest state is its best."""
        if value is None:
            improved = self.active.copy()
        else:
            better = value < self.best if self.mode == "min" else value > self.best
            improved = self.active & better
            self.best = np.where(improved, value, self.best)
        self.best_epoch = np.where(improved, epoch, self.best_epoch)
        self.stale = np.where(improved, 0, self.stale + self.active)
        if self.patience:
            self.active = self.active & (self.stale < self.patience)
        return improved

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "active": self.active}

    def restore(self, saved: dict) -> None:
        for key in ("best", "best_epoch", "stale", "active"):
            setattr(self, key, np.asarray(saved[key]))


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Validation loss, accuracy and macro-F1 of each member over the rows it is scored on.

    logits [M, N, C]; labels [N] (every member scored on every row) or [M, N] (each member's
    own labels, -1 = a row that member is not scored on). The loop's default `val_metrics`;
    a caller whose members learn other labels than the loader's passes its own (e.g.
    relabelled labels through this function)."""
    logits = np.asarray(logits, np.float64)
    labels = np.broadcast_to(np.asarray(labels), logits.shape[:2])               # [M, N]
    keep = labels >= 0
    safe = np.where(keep, labels, 0)
    nll = -np.take_along_axis(log_softmax(logits, axis=-1), safe[..., None], -1)[..., 0]
    count = np.maximum(keep.sum(1), 1)
    pred = logits.argmax(-1)
    f1 = [f1_score(safe[m][keep[m]], pred[m][keep[m]], average="macro", zero_division=0,
                   labels=np.arange(logits.shape[-1])) if keep[m].any() else 0.0
          for m in range(len(logits))]
    return {"val_loss": (nll * keep).sum(1) / count,
            "val_accuracy": ((pred == safe) & keep).sum(1) / count,
            "val_macro_f1": np.asarray(f1, np.float64)}


ValMetrics = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]


def _with_member_axis(tree: Any, stacked: bool) -> Any:
    return tree if stacked else jax.tree.map(lambda x: np.asarray(x)[None], tree)


def _variables(state: TrainState, stacked: bool) -> dict:
    host = distributed.host_copy({"params": state.params, "batch_stats": state.batch_stats})
    return _with_member_axis(host, stacked)


def _check_finite(values: np.ndarray, what: str, epoch: int, step: int,
                  names: Sequence[str], checkpointer: Checkpointer | None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        last = checkpointer.path() if checkpointer is not None else None
        raise TrainingDiverged(
            f"{what} is {values[bad][0]} for member(s) {[names[i] for i in np.flatnonzero(bad)]}"
            f" at step {step} (epoch {epoch}); no checkpoint holds these values; last good "
            f"checkpoint: {last or 'none'} (lower --lr or check the data)")


def fit(state: TrainState, *, step: Callable, predict: Callable, parallel: DataParallel,
        train_data: Iterable[dict], val_data: Iterable[dict] | None,
        config: FitConfig, stacked: bool, member_names: Sequence[str],
        val_metrics: ValMetrics = classification_metrics,
        checkpoint_dir: str | Path | None = None,
        on_record: Callable[[dict], None] | None = None, desc: str = "training") -> FitResult:
    """Train `state` (M stacked members, or one member's plain state) for up to
    `config.epochs` epochs of `config.steps_per_epoch` batches.

    `train_data` is iterated once for the whole training (a Grain loader with
    num_epochs=epochs), so its iterator position is what a checkpoint saves; `val_data` is
    iterated once per epoch. With `checkpoint_dir`, a run that finds a checkpoint there
    resumes from it exactly (state, rng, best snapshots, stopper, records, data position).
    `on_record` receives each epoch's record as it is made (live logging); the returned
    records are the truth, restored ones included. `val_metrics(logits [M, N, C], labels [N])`
    returns each member's validation metrics ([M] arrays, "val_loss" and the monitor among
    them); the default scores every member on the loader's labels.
    """
    size = len(member_names)
    stopper = EarlyStopping.start(size, config.monitor, config.patience)
    data = iter(train_data)   # batches go to the device two ahead of the step (not under pmap)
    sharding = NamedSharding(parallel.mesh, P(AXIS))
    if parallel.mode != "pmap":
        data = prefetch_to_device(data, sharding)
    best = _variables(state, stacked)
    records: list[dict] = []
    checkpointer = (Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
                    if checkpoint_dir is not None else None)
    try:
        start_epoch = 0
        if checkpointer is not None:
            restored = checkpointer.restore(state, best, stopper.as_dict(), data)
            if restored is not None:
                state, best, saved_stopper, records, start_epoch = restored
                stopper.restore(saved_stopper)
        replicated = parallel.replicate(state)
        step_count = records[-1]["step"] if records else 0
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if not stopper.active.any():
                break
            replicated, step_count, train = _train_epoch(
                replicated, step, data, config, epoch, step_count, member_names, checkpointer,
                desc, compiles=epoch == start_epoch + 1)
            host = distributed.host_copy(parallel.unreplicate(replicated))
            record = {"epoch": epoch, "step": step_count, "members": list(member_names),
                      **train}
            value = None
            if val_data is not None:
                logits, labels, _ = predict_logits(
                    predict, replicated, val_data, sharding=sharding,
                    progress=f"{desc} validation {epoch}" if config.progress else None)
                if len(labels):
                    val = val_metrics(logits.reshape(size, *logits.shape[-2:]), labels)
                    _check_finite(val["val_loss"], "validation loss", epoch, step_count,
                                  member_names, checkpointer)
                    record.update({k: v.tolist() for k, v in val.items()})
                    value = val[config.monitor]
            improved = stopper.update(epoch, value)
            variables = _variables(host, stacked)
            best = jax.tree.map(
                lambda new, old: np.where(improved.reshape(-1, *[1] * (np.ndim(new) - 1)),
                                          new, old), variables, best)
            record.update(active=stopper.active.tolist(),
                          best_epoch=stopper.best_epoch.tolist())
            records.append(record)
            if checkpointer is not None:
                checkpointer.save(epoch, host, best, stopper.as_dict(), records, data)
            if on_record is not None:
                on_record(record)
    finally:
        if checkpointer is not None:
            checkpointer.close()
    trained = len(records)
    return FitResult(best, records, stopper.best_epoch,
                     stopped_early=trained < config.epochs and not stopper.active.any())


def _train_epoch(replicated: Any, step: Callable, data: Any, config: FitConfig, epoch: int,
                 step_count: int, names: Sequence[str], checkpointer: Checkpointer | None,
                 desc: str, compiles: bool) -> tuple[Any, int, dict]:
    """One epoch of steps; returns the state, the step count and the epoch's train metrics
    (per member, example-weighted means), images/s and step time. images/s counts the
    images the loader delivered: B a step, B x M when M stacked members each have their own
    batch (labels [B, M]). When the first step `compiles`, the bar says so (XLA takes seconds
    to a minute at 0 steps done)."""
    start = time.perf_counter()
    loss, correct, count, images = 0.0, 0.0, 0.0, 0
    bar = tqdm(range(config.steps_per_epoch), total=config.steps_per_epoch,
               desc=f"{desc} epoch {epoch}/{config.epochs}", leave=False,
               disable=not config.progress or not distributed.is_primary())
    if compiles:
        bar.set_postfix_str("compiling the training step (once per run)")
    for _ in bar:
        try:
            batch = next(data)
        except StopIteration:
            raise ValueError(
                f"the training data ran out in epoch {epoch}: it must yield {config.epochs} x "
                f"{config.steps_per_epoch} batches (a loader with num_epochs=epochs)") from None
        replicated, metrics = step(replicated, {"image": batch["image"],
                                                "label": batch["label"]})
        metrics = jax.tree.map(lambda x: np.atleast_1d(np.asarray(x, np.float64)), metrics)
        step_count += 1
        _check_finite(metrics["loss"], "training loss", epoch, step_count, names, checkpointer)
        loss = loss + metrics["loss"] * metrics["count"]
        correct = correct + metrics["accuracy"] * metrics["count"]
        count = count + metrics["count"]
        images += int(np.size(batch["label"]))
        bar.set_postfix(loss=f"{float(np.mean(loss / np.maximum(count, 1))):.4f}")
    seconds = time.perf_counter() - start
    count = np.maximum(count, 1e-12)
    return replicated, step_count, {
        "train_loss": (loss / count).tolist(), "train_accuracy": (correct / count).tolist(),
        "images_per_s": images / seconds, "step_time_s": seconds / config.steps_per_epoch,
        "seconds": seconds}

