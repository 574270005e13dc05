"""MetricWriter: exact metrics.jsonl records, TensorBoard scalars read back from the event file,
atomic rewrite on resume, and silence on every JAX process but 0."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

from backbones.training.metric_writer import MetricWriter

RECORDS = [
    {"epoch": 1, "step": 10, "train_loss": 0.9, "val_loss": None, "lr": 1e-3, "best": True,
     "note": "warm-up"},
    {"epoch": 2, "step": 20, "train_loss": 0.7, "members": ["densenet", "resnet"],
     "val_loss": [0.6, 0.75], "val_accuracy": [0.5, None]},
    {"epoch": 3, "train_loss": 0.5, "val_loss": [0.4, 0.45]},  # no step, no member names
]
# (tag, step) -> value: None, bools, strings and "step" are not written; lists are per member.
SCALARS = {
    ("epoch", 10): 1, ("train_loss", 10): 0.9, ("lr", 10): 1e-3,
    ("epoch", 20): 2, ("train_loss", 20): 0.7, ("val_loss/densenet", 20): 0.6,
    ("val_loss/resnet", 20): 0.75, ("val_accuracy/densenet", 20): 0.5,
    ("epoch", 3): 3, ("train_loss", 3): 0.5, ("val_loss/0", 3): 0.4, ("val_loss/1", 3): 0.45,
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_events(path: Path) -> list[Event]:
    """Parse one TFRecord event file (length, masked CRC, payload, masked CRC), CRCs checked."""
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + length]
        end = pos + 12 + length
        assert struct.unpack("<I", data[end:end + 4])[0] == masked_crc32c(payload)
        events.append(Event.FromString(payload))
        pos = end + 4
    return events


def event_files(directory: Path) -> list[Path]:
    return sorted((directory / "tensorboard").glob("events.out.tfevents.*"))


def scalar_values(events: list[Event]) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def purge_steps(events: list[Event]) -> list[int]:
    return [e.step for e in events if e.session_log.status == SessionLog.START]


def test_write_records_and_tensorboard_scalars(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for record in RECORDS:
            writer.write(record)
    assert read_jsonl(tmp_path / "metrics.jsonl") == RECORDS
    [events_path] = event_files(tmp_path)
    events = read_events(events_path)
    assert events[0].file_version == "brain.Event:2"
    assert purge_steps(events) == []  # without resume records nothing is hidden
    got = scalar_values(events)
    assert got.keys() == SCALARS.keys()
    for key, value in SCALARS.items():
        assert got[key] == np.float32(value), key


def test_rewrite_replaces_the_file_and_resume_appends_to_tensorboard(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for record in RECORDS:
            writer.write(record)
        writer.rewrite(RECORDS[:1])
        assert read_jsonl(tmp_path / "metrics.jsonl") == RECORDS[:1]
        writer.write(RECORDS[2])
    assert read_jsonl(tmp_path / "metrics.jsonl") == [RECORDS[0], RECORDS[2]]

    # Resume after epoch 1 (step 10): the checkpoint's records are the truth.
    with MetricWriter(tmp_path, resume_records=RECORDS[:1]) as writer:
        assert read_jsonl(tmp_path / "metrics.jsonl") == RECORDS[:1]
        writer.write({"epoch": 2, "step": 20, "train_loss": 0.6})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        RECORDS[0], {"epoch": 2, "step": 20, "train_loss": 0.6}]
    first, second = event_files(tmp_path)  # the first run's file is kept, not truncated
    assert ("train_loss", 10) in scalar_values(read_events(first))
    resumed = read_events(second)
    assert purge_steps(resumed) == [11]  # TensorBoard hides the crashed run's steps >= 11
    assert scalar_values(resumed) == {("epoch", 20): 2.0, ("train_loss", 20): np.float32(0.6)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]

    with MetricWriter(tmp_path, tensorboard=False):  # a fresh run starts an empty file
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert len(event_files(tmp_path)) == 2


def test_bad_records_write_nothing(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="2 values but the record names 3 members"):
            writer.write({"epoch": 1, "members": ["a", "b", "c"], "val_loss": [0.1, 0.2]})
        with pytest.raises(ValueError, match="int 'epoch'"):
            writer.write({"step": 3, "train_loss": 0.1})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    run = tmp_path / "run"
    with MetricWriter(run, resume_records=RECORDS[:1]) as writer:
        writer.write(RECORDS[1])
        writer.rewrite(RECORDS)
    assert not run.exists()


def test_curves_show_validation_beside_training_in_titled_panels(tmp_path):
    """Every metric the records hold gets a panel; accuracy shows validation too."""
    from backbones.training.curves import panels, plot_curves
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e,
                "train_accuracy": 0.5 + e / 10, "val_accuracy": 0.4 + e / 10,
                "val_macro_f1": 0.3 + e / 10} for e in (1, 2, 3)]
    assert panels(history) == [("loss", "Loss (cross-entropy)", ("train", "val")),
                               ("accuracy", "Accuracy", ("train", "val")),
                               ("macro_f1", "Macro-F1", ("val",))]
    assert [p[0] for p in panels([{"epoch": 1, "train_loss": 1.0}])] == ["loss"]
    path = plot_curves(history, tmp_path / "curves.png", subtitle="ova")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
