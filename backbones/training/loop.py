"""The epoch loop: train, validate, early-stop, checkpoint, log, resume.

Follows Flax's ImageNet example: the loop owns Python-side concerns (progress bar,
metrics.jsonl, checkpoints, early stopping) and calls the compiled step; the step stays pure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from backbones.training import losses
from backbones.training.checkpoint import Checkpointer
from backbones.training.curves import plot_curves
from backbones.training.parallel import DataParallel
from backbones.training.state import TrainState

MONITORS = {"val_macro_f1": "max", "val_accuracy": "max", "val_loss": "min"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How long to train and when to stop."""

    epochs: int
    steps_per_epoch: int
    monitor: str = "val_macro_f1"
    patience: int | None = 5
    progress: bool = True

    def __post_init__(self):
        if self.monitor not in MONITORS:
            raise ValueError(f"unknown monitor {self.monitor!r}; choose one of "
                             f"{', '.join(MONITORS)}")
        if self.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1: the training split is smaller "
                             "than one batch")


@dataclasses.dataclass
class FitResult:
    state: TrainState            # the best state by the monitor (the last if no validation)
    history: list[dict]          # one record per epoch, as in metrics.jsonl
    best_epoch: int
    stopped_early: bool


def train_batch(batch: dict, class_weights: np.ndarray | None) -> dict:
    """Loader batch -> step batch: image, label and the per-example weight."""
    labels = np.asarray(batch["label"], np.int32)
    weights = (np.ones(len(labels), np.float32) if class_weights is None
               else np.asarray(class_weights, np.float32)[labels])
    return {"image": np.asarray(batch["image"]), "label": labels, "weight": weights}


def predict(predict_fn: Callable, state: Any, loader: Iterable[dict]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and example indices over one pass of an evaluation loader."""
    logits, labels, indices = [], [], []
    for batch in loader:
        logits.append(np.asarray(predict_fn(state, {"image": np.asarray(batch["image"])})))
        labels.append(np.asarray(batch["label"]))
        indices.append(np.asarray(batch["index"]))
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(indices)


def validation_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy, accuracy and macro-F1 over all classes the model outputs."""
    ce = np.asarray(losses.cross_entropy(logits, labels))
    pred = logits.argmax(-1)
    return {"val_loss": float(ce.mean()), "val_accuracy": float((pred == labels).mean()),
            "val_macro_f1": float(f1_score(labels, pred, average="macro",
                                           labels=np.arange(logits.shape[-1]),
                                           zero_division=0))}


def _read_history(path: Path, last_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["epoch"] <= last_epoch]


def _write_history(path: Path, history: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in history))


def _improved(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def fit(state: TrainState, *, parallel: DataParallel, train_step: Callable,
        eval_step: Callable, train_loader: Any, val_loader: Any | None,
        config: FitConfig, out_dir: str | Path, class_weights: np.ndarray | None = None,
        checkpointer: Checkpointer | None = None) -> FitResult:
    """Train `state` for up to `config.epochs` epochs of `steps_per_epoch` steps.

    `train_loader` yields all epochs' batches in one iteration (make_loader with
    num_epochs=epochs), so its iterator state is the data position to checkpoint. If
    `checkpointer` holds a checkpoint, training resumes from it (state, rng, step, data
    position and the early-stopping record from metrics.jsonl). Writes metrics.jsonl and
    curves.png into `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    history_path = out_dir / "metrics.jsonl"
    mode = MONITORS[config.monitor]
    data = iter(train_loader)
    history: list[dict] = []
    if checkpointer is not None:
        restored = checkpointer.restore(state, data)
        if restored is not None:
            state = restored
            history = _read_history(history_path, int(state.step) // config.steps_per_epoch)
    if not history and history_path.exists():
        history_path.unlink()
    best, best_epoch, since_best = None, 0, 0
    for record in history:
        if record.get(config.monitor) is not None and _improved(record[config.monitor], best,
                                                                 mode):
            best, best_epoch, since_best = record[config.monitor], record["epoch"], 0
        else:
            since_best += 1
    stopped = config.patience is not None and history and since_best >= config.patience

    step_fn = parallel.train(train_step)
    predict_fn = parallel.predict(eval_step)
    replicated = parallel.replicate(state)
    best_state = None
    for epoch in range(len(history) + 1, config.epochs + 1):
        if stopped:
            break
        start = time.perf_counter()
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        bar = tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch}/{config.epochs}",
                   disable=not config.progress, leave=False)
        for _ in bar:
            try:
                batch = train_batch(next(data), class_weights)
            except StopIteration:
                raise ValueError(
                    f"the training loader ran out in epoch {epoch}: it must yield "
                    f"{config.epochs} x {config.steps_per_epoch} batches (num_epochs=epochs)"
                ) from None
            replicated, metrics = step_fn(replicated, batch)
            loss, count = float(metrics["loss"]), float(metrics["count"])
            if not math.isfinite(loss):
                step = int(np.asarray(parallel.unreplicate(replicated).step))
                last = checkpointer.path() if checkpointer else None
                raise TrainingDiverged(
                    f"loss is {loss} at step {step} (epoch {epoch}); last good checkpoint: "
                    f"{last or 'none'}")
            sums["loss"] += loss * count
            sums["correct"] += float(metrics["accuracy"]) * count
            sums["count"] += count
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.4f}",
                            acc=f"{sums['correct'] / sums['count']:.3f}",
                            img_s=f"{sums['count'] / elapsed:.0f}")
        train_seconds = time.perf_counter() - start
        record = {"epoch": epoch,
                  "step": int(np.asarray(parallel.unreplicate(replicated).step)),
                  "train_loss": sums["loss"] / sums["count"],
                  "train_accuracy": sums["correct"] / sums["count"],
                  "val_loss": None, "val_accuracy": None, "val_macro_f1": None,
                  "images_per_s": sums["count"] / train_seconds}
        if val_loader is not None:
            record.update(validation_metrics(*predict(predict_fn, replicated, val_loader)[:2]))
        record["seconds"] = time.perf_counter() - start
        value = record.get(config.monitor)
        is_best = value is None or _improved(value, best, mode)
        if is_best:
            best, best_epoch, since_best = value, epoch, 0
        else:
            since_best += 1
        history.append(record)
        _write_history(history_path, history)
        if checkpointer is not None:
            checkpointer.save(parallel.unreplicate(replicated), data, best=is_best)
        elif is_best:
            best_state = jax.device_get(parallel.unreplicate(replicated))
        if config.progress:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in record.items() if v is not None))
        stopped = config.patience is not None and since_best >= config.patience

    plot_curves(history, out_dir / "curves.png")
    final = parallel.unreplicate(replicated)
    if checkpointer is not None and checkpointer.path("best") is not None:
        final = checkpointer.restore(final, kind="best")
    elif best_state is not None:
        final = best_state
    return FitResult(state=final, history=history, best_epoch=best_epoch,
                     stopped_early=bool(stopped) and len(history) < config.epochs)
