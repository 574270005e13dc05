"""One orbax checkpoint per epoch holding everything a resume needs, written atomically.

Each epoch's checkpoint is ONE orbax step with five items: the train state, the best
variables per member so far, the early-stopping record, the per-epoch metric records and the
Grain iterator position. Orbax writes a step into a temporary folder and renames it when
complete, so a run killed at any moment resumes from a checkpoint whose items agree with each
other: there is no "latest" saved without its matching "best" (the crash window that two
separate managers had). The K most recent epochs are kept. A state or best snapshot with a
NaN or Inf anywhere is never written.

With several JAX processes every process saves and restores (orbax's collective protocol):
the items are host copies, written once by process 0, and Grain writes each process's
iterator position to its own `data/process_<i>-of-<n>.json`, so a resume needs the same
process count (the loader's sampler, part of the saved state, names it too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from backbones.training.state import TrainState, checkpoint_items, with_checkpoint_items


class _DropSaveWaitAdvice(logging.Filter):
    """Orbax warns "Waiting for previous save ... consider checkpointing less frequently" when
    a save waits for the previous one; we save once per epoch, so on a slow machine the
    advice is terminal noise between progress bars, not something the user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Waiting for previous save")


logging.getLogger("absl").addFilter(_DropSaveWaitAdvice())


class NonFiniteError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN or Inf values."""


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of floating-point leaves that contain NaN or Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def checkpointable(iterator: Any) -> bool:
    """Whether a data iterator can save its position (Grain's iterators can)."""
    return hasattr(iterator, "get_state") and hasattr(iterator, "set_state")


class Checkpointer:
    """The per-epoch checkpoints of one training (a member group, or one member)."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        if keep < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def latest_epoch(self) -> int | None:
        """The newest complete epoch, None if there is none."""
        return self.manager.latest_step()

    def path(self) -> Path | None:
        """Directory of the newest complete checkpoint."""
        epoch = self.latest_epoch()
        return None if epoch is None else self.directory / str(epoch)

    def save(self, epoch: int, state: TrainState, best: dict, stopper: dict,
             records: list[dict], data_iterator: Any = None) -> None:
        """Write epoch `epoch` as one atomic step; NonFiniteError if state or best is bad."""
        items = {"state": jax.device_get(checkpoint_items(state)), "best": jax.device_get(best),
                 "stopper": {k: np.asarray(v) for k, v in stopper.items()}}
        bad = non_finite_leaves({"state": items["state"], "best": items["best"]})
        if bad:
            raise NonFiniteError(f"refusing to checkpoint epoch {epoch}: non-finite values in "
                                 f"{', '.join(bad[:5])}")
        args = {"items": ocp.args.StandardSave(items), "records": ocp.args.JsonSave(records)}
        if data_iterator is not None and checkpointable(data_iterator):
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(epoch, args=ocp.args.Composite(**args), force=True)

    def restore(self, state: TrainState, best: dict, stopper: dict, data_iterator: Any = None
                ) -> tuple[TrainState, dict, dict, list[dict], int] | None:
        """(state, best, stopper, records, epoch) of the newest epoch, shaped like the given
        templates; moves `data_iterator` to the saved position. None if nothing is saved."""
        epoch = self.latest_epoch()
        if epoch is None:
            return None
        template = {"state": jax.device_get(checkpoint_items(state)),
                    "best": jax.device_get(best),
                    "stopper": {k: np.asarray(v) for k, v in stopper.items()}}
        args = {"items": ocp.args.StandardRestore(template), "records": ocp.args.JsonRestore()}
        if data_iterator is not None and checkpointable(data_iterator):
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(epoch, args=ocp.args.Composite(**args))
        items = restored["items"]
        return (with_checkpoint_items(state, items["state"]), items["best"], items["stopper"],
                list(restored["records"]), epoch)

    def close(self) -> None:
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
