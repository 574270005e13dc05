"""Writing a bundle's pieces: member checkpoints and the "bundle" section of config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import orbax.checkpoint as ocp

from data_pipeline.preprocess import PreprocessConfig
from ensembles.bundle.integrity import COMBINER_FILE, COMPONENTS_DIR
from ensembles.bundle.schema import FORMAT_VERSION
from ensembles.combine.groups import MemberGroup
from ensembles.combine.tasks import Tasks


def save_members(run_dir: Path, stacks: list[MemberGroup], variables: list[dict]) -> list[dict]:
    """Write each stack's variables under members/stack-<s>/; returns the "stacks" entries."""
    entries = []
    with ocp.StandardCheckpointer() as ckpt:
        for s, (stack, v) in enumerate(zip(stacks, variables, strict=True)):
            path = Path(run_dir).absolute() / "members" / f"stack-{s}"
            ckpt.save(path, {"params": v["params"], "batch_stats": v.get("batch_stats", {})},
                      force=True)
            entries.append({"members": list(stack.members), "num_classes": stack.num_classes,
                            "path": f"members/stack-{s}"})
    return entries


def bundle_section(*, strategy: str, backbone: str, model: dict, class_names, preprocess:
                   PreprocessConfig, tasks: Tasks, stacks: list[dict], meta: str | None,
                   train_hashes: str | None = None, segmenter: dict | None = None) -> dict:
    """The "bundle" entry of config.json describing how to rebuild and run the ensemble;
    `segmenter` is `Segmenter.reference()` for a run masked by predicted lung masks."""
    return {"format_version": FORMAT_VERSION, "kind": "ensemble", "strategy": strategy,
            "backbone": backbone, "model": model, "class_names": list(class_names),
            "preprocess": dataclasses.asdict(preprocess),
            "tasks": {"names": list(tasks.names), "num_classes": list(tasks.num_classes),
                      "table": tasks.table.tolist(), "healthy": tasks.healthy},
            "stacks": stacks, "combiner": COMBINER_FILE, "meta": meta,
            **({"train_hashes": train_hashes} if train_hashes else {}),
            **({"segmenter": segmenter} if segmenter else {})}


def stack_section(*, class_names, names: Sequence[str], meta: str) -> dict:
    """The "bundle" entry of a stack run's config.json: components i live in components/<i>/."""
    return {"format_version": FORMAT_VERSION, "kind": "stack", "class_names": list(class_names),
            "components": [{"name": n, "path": f"{COMPONENTS_DIR}/{i}"}
                           for i, n in enumerate(names)], "meta": meta}


