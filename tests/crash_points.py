"""Crash injection for the exact-resume tests of the engine and of ensembles: an exception
that nothing catches (as a kill would leave the files) at each point between an epoch's
writes."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from backbones import training
from backbones.training.metric_writer import MetricWriter

TIMING = ("seconds", "images_per_s", "step_time_s")


class Crash(Exception):
    """Stands for a kill: raised at an injection point, caught only by the test."""


class Interrupted(training.DataParallel):
    """Raises Crash (or poisons the batch with NaN) at the k-th train call."""

    def __init__(self, at: int, poison: bool = False):
        super().__init__("shard_map", tuple(jax.devices()[:1]))
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "poison", poison)

    def train(self, step_fn, **kwargs):
        inner, calls = super().train(step_fn, **kwargs), [0]

        def run(state, batch):
            calls[0] += 1
            if calls[0] == self.at:
                if not self.poison:
                    raise Crash("killed mid epoch")
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            return inner(state, batch)
        return run


def final_checkpoint(ckpt: Path) -> dict:
    """The newest epoch's saved items (state with optimizer state, best, stopper)."""
    with ocp.CheckpointManager(ckpt.absolute()) as manager:
        epoch = manager.latest_step()
        return manager.restore(epoch, args=ocp.args.Composite(
            items=ocp.args.StandardRestore()))["items"]


def _crash_before_save(monkeypatch):
    original = training.Checkpointer.save

    def save(self, epoch, *args, **kwargs):
        if epoch == 2:
            raise Crash("before the checkpoint")
        return original(self, epoch, *args, **kwargs)
    monkeypatch.setattr(training.Checkpointer, "save", save)


def _crash_inside_save(monkeypatch):
    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if Path(str(self._final_path)).name == "2":
            raise Crash("inside the checkpoint: written, not renamed")
        return await original(self, *args, **kwargs)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


def _crash_after_save(monkeypatch):
    original = MetricWriter.write

    def write(self, record):
        if record["epoch"] == 2:
            raise Crash("between the checkpoint and the metric record")
        return original(self, record)
    monkeypatch.setattr(MetricWriter, "write", write)


CRASH_POINTS = ("before_save", "inside_save", "after_save", "after_record")


def inject(where: str, monkeypatch, *, steps: int) -> training.DataParallel | None:
    """Arm a Crash in epoch 2 at `where` (after_record: the first step of epoch 3); returns
    the DataParallel to train with for that point (None: the default one)."""
    if where == "after_record":
        return Interrupted(at=2 * steps + 1)
    {"before_save": _crash_before_save, "inside_save": _crash_inside_save,
     "after_save": _crash_after_save}[where](monkeypatch)
    return None
