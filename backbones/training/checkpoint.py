"""Orbax checkpoints of the train state and the Grain iterator: latest K and the best one.

`latest/` keeps the K most recent epochs with the data iterator's position, so a resumed run
continues bit-identically; `best/` keeps the single best state by the monitored validation
metric. Orbax writes each step into a temporary directory and renames it when complete, so a
crash never leaves a checkpoint that looks finished. A state with a NaN or Inf anywhere is
never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from backbones.training.state import TrainState, checkpoint_items, with_checkpoint_items


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


class Checkpointer:
    """Latest-K and best checkpoints of one run under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = dict(create=True, enable_async_checkpointing=False)
        self.latest = ocp.CheckpointManager(
            self.directory / "latest", options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(keep), **options))
        self.best = ocp.CheckpointManager(
            self.directory / "best", options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(1), **options))

    @staticmethod
    def _state_items(state: TrainState) -> dict:
        items = jax.device_get(checkpoint_items(state))
        bad = non_finite_leaves(items)
        if bad:
            raise NonFiniteError(f"refusing to checkpoint step {int(items['step'])}: "
                                 f"non-finite values in {', '.join(bad[:5])}")
        return items

    def save(self, state: TrainState, data_iterator: Any = None, *, best: bool = False
             ) -> None:
        """Save `state` (one host copy) and the iterator position as the latest checkpoint,
        and also as the best one when `best`."""
        items = self._state_items(state)
        step = int(items["step"])
        args = {"state": ocp.args.StandardSave(items)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.latest.save(step, args=ocp.args.Composite(**args), force=True)
        if best:
            self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(items)),
                           force=True)

    def path(self, kind: str = "latest") -> Path | None:
        """Directory of the latest (or best) complete checkpoint, None if there is none."""
        manager = self.latest if kind == "latest" else self.best
        step = manager.latest_step()
        return None if step is None else self.directory / kind / str(step)

    def restore(self, template: TrainState, data_iterator: Any = None, *,
                kind: str = "latest") -> TrainState | None:
        """Restore into `template` (its shapes, dtypes and optimiser structure) and, for the
        latest checkpoint, move `data_iterator` to its saved position. None if none exists."""
        manager = self.latest if kind == "latest" else self.best
        step = manager.latest_step()
        if step is None:
            return None
        target = jax.device_get(checkpoint_items(template))
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None and kind == "latest":
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
        return with_checkpoint_items(template, restored["state"])

    def close(self) -> None:
        self.latest.close()
        self.best.close()
