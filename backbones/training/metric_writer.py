"""The training engine's one metric writer: per-epoch records to metrics.jsonl and TensorBoard.

In the spirit of clu's metric writers and big_vision's JSON-lines log. metrics.jsonl (one JSON
object per line) is the record that resume, curves and reports read back; the TensorBoard event
files (written by tensorboardX, no TensorFlow) are for watching a run. Only JAX process 0
writes files; every other process logs each record as one line to stderr, prefixed with its
process id, and writes nothing.

    with MetricWriter(out_dir, resume_records=history) as writer:
        writer.write({"epoch": 1, "step": 100, "train_loss": 0.7, "val_loss": None})
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
from tensorboardX import SummaryWriter

from data_pipeline.atomic import atomic_write

# tensorboardX hands events to a background thread that flushes them at most this many seconds
# later (its flush() does not wait for that thread); close() always writes everything.
TB_FLUSH_SECS = 5


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _step(record: Mapping[str, Any]) -> int:
    """A record's TensorBoard step: its "step" when it has one, else its "epoch"."""
    step = record.get("step")
    return int(record["epoch"] if step is None else step)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one record, by tag.

    Numbers (not bools) are tagged by their key; lists of numbers (one value per ensemble
    member) become `key/<member>` with names from the record's "members" list, else
    `key/<index>`. None, strings, bools and the "step" axis itself are left out.
    """
    members = record.get("members")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if _is_number(value):
            out[key] = float(value)
        elif isinstance(value, list | tuple) and any(_is_number(v) for v in value):
            if members is not None and len(members) != len(value):
                raise ValueError(f"{key!r} has {len(value)} values but the record names "
                                 f"{len(members)} members")
            names = members if members is not None else range(len(value))
            out.update({f"{key}/{name}": float(v)
                        for name, v in zip(names, value, strict=True) if _is_number(v)})
    return out


class MetricWriter:
    """Writes per-epoch records to `directory/metrics.jsonl` and `directory/tensorboard/`.

    `resume_records` are the records restored with a checkpoint, the truth on resume:
    metrics.jsonl is rewritten to exactly them (None starts an empty file). TensorBoard files
    are appended to (a new event file per writer); with `resume_records` they are marked so
    that TensorBoard hides the events a crashed run logged after the last resumed record
    (tensorboardX's purge_step). Without them nothing is hidden: a training phase that holds
    several members' trainings cannot name one step to purge from.
    """

    def __init__(self, directory: str | Path, *, resume_records: Sequence[dict] | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(directory) / "metrics.jsonl"
        self._active = jax.process_index() == 0
        self._tb: SummaryWriter | None = None
        if not self._active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = list(resume_records or [])
        self.rewrite(records)
        if tensorboard:
            self._tb = SummaryWriter(
                str(self.path.parent / "tensorboard"),
                purge_step=_step(records[-1]) + 1 if records else None,
                flush_secs=TB_FLUSH_SECS,
                # tensorboardX names event files by the second and opens them "wb": two writers
                # started within one second would otherwise share, and truncate, one file.
                filename_suffix=f".{time.time_ns()}")

    def write(self, record: dict) -> None:
        """Append one record (int "epoch", optional "step") to metrics.jsonl and TensorBoard.

        The line is flushed at once, so a crash loses at most the line being written.
        """
        if not self._active:
            print(f"[process {jax.process_index()}] {json.dumps(record)}", file=sys.stderr)
            return
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise ValueError(f"a metric record needs an int 'epoch', got {epoch!r}")
        values = scalars(record)  # validates before anything is written
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = _step(record)
            for tag, value in values.items():
                self._tb.add_scalar(tag, value, global_step=step)

    def rewrite(self, records: Sequence[dict]) -> None:
        """Atomically replace metrics.jsonl with exactly `records` (temp file, then os.replace)."""
        if not self._active:
            return
        with atomic_write(self.path) as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def close(self) -> None:
        """Flush and close the TensorBoard event file (metrics.jsonl is never held open)."""
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
