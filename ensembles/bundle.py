"""The ensemble bundle: a self-contained run directory that `evaluate` and `predict` load.

    RUN/config.json           every flag, plus "bundle": {"format_version", "kind",
                              "strategy", "backbone", "model", "class_names", "preprocess",
                              "tasks", "stacks", "combiner", "meta"}
    RUN/members/stack-<s>/    orbax checkpoint of stack s's variables (member axis first)
    RUN/combiner.json         the fitted rule combiner (and temperature)
    RUN/meta.json             optional logistic meta-classifier (JSON, never pickle)

Single-model runs of `experiments.single` load too: their config.json names the backbone
and head, and checkpoint/ holds the engine's orbax checkpoints (best, else latest); they
become a one-member "single" bundle. A directory missing any piece, or written by another
format version, is refused with a one-line error naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import backbones
from data_pipeline.preprocess import PreprocessConfig
from ensembles import strategy as strategy_lib
from ensembles.members import Stack
from ensembles.meta import MetaClassifier
from ensembles.tasks import Tasks, make_tasks

FORMAT_VERSION = 1
COMBINER_FILE = "combiner.json"
META_FILE = "meta.json"


class BundleError(ValueError):
    """A run directory that cannot be loaded (missing pieces, other format version)."""


def _model_options(model: dict) -> dict:
    options = {"head": model.get("head", "linear")}
    if model.get("width") is not None:
        options["width"] = model["width"]
    return options


def save_members(run_dir: Path, stacks: list[Stack], variables: list[dict]) -> list[dict]:
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
                   PreprocessConfig, tasks: Tasks, stacks: list[dict], meta: bool) -> dict:
    """The "bundle" entry of config.json describing how to rebuild and run the ensemble."""
    return {"format_version": FORMAT_VERSION, "kind": "ensemble", "strategy": strategy,
            "backbone": backbone, "model": model, "class_names": list(class_names),
            "preprocess": dataclasses.asdict(preprocess),
            "tasks": {"names": list(tasks.names), "num_classes": list(tasks.num_classes),
                      "table": tasks.table.tolist(), "healthy": tasks.healthy},
            "stacks": stacks, "combiner": COMBINER_FILE, "meta": META_FILE if meta else None}


@dataclasses.dataclass
class Bundle:
    """A loaded ensemble (or single model): members' variables, combiner, preprocessing."""

    run_dir: Path
    backbone: str
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    tasks: Tasks
    stacks: list[Stack]
    variables: list[dict]
    combiner: Any
    meta: MetaClassifier | None
    temperature: float | None
    kind: str

    def __post_init__(self):
        self._apply = [strategy_lib.stacked_apply(
            backbones.create(self.backbone, num_classes=s.num_classes, **self.model_options))
            for s in self.stacks]

    model_options: dict = dataclasses.field(default_factory=dict)

    def member_outputs(self, batches: Iterable[dict]
                       ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Per-member probabilities [N, C_m], labels and indices over preprocessed batches."""
        logits, labels, indices = strategy_lib.member_logits(
            self._apply, self.variables, self.stacks, batches)
        return [strategy_lib.softmax(z) for z in logits], labels, indices

    def combine(self, member_probs: list[np.ndarray], *, use_meta: bool = False) -> np.ndarray:
        """K-class probabilities from member probabilities (the rule, or the meta-classifier)."""
        if use_meta:
            if self.meta is None:
                raise BundleError(f"{self.run_dir} has no saved meta-classifier")
            return self.meta.predict_proba(self.meta.features({self.tasks.strategy:
                                                               member_probs}))
        return self.combiner.predict_proba(member_probs)

    def decide(self, member_probs: list[np.ndarray]) -> np.ndarray:
        """Class decisions of the rule (the cascade's stage rule, OvO votes, else argmax)."""
        return self.combiner.predict(member_probs)


def _read_config(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise BundleError(f"run directory {run_dir} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise BundleError(f"{run_dir} is not a complete run: config.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON ({error.msg})") from None


def _restore(path: Path) -> dict:
    if not path.is_dir():
        raise BundleError(f"incomplete run: member checkpoint {path} is missing")
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path.absolute())
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}


def load_bundle(run_dir: str | Path) -> Bundle:
    """Load an ensemble bundle or a single-model run; BundleError if incomplete or foreign."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    section = config.get("bundle")
    if section is None:
        return _load_single(run_dir, config)
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{run_dir} has bundle format version {version!r}; this code reads "
                          f"version {FORMAT_VERSION}")
    t = section["tasks"]
    tasks = make_tasks(section["strategy"], section["class_names"],
                       **({} if t.get("healthy") is None else
                          {"healthy": section["class_names"][t["healthy"]]}))
    if tasks.table.tolist() != t["table"]:
        raise BundleError(f"{run_dir}: saved task table differs from make_tasks' table")
    stacks, variables = [], []
    for entry in section["stacks"]:
        idx = entry["members"]
        stacks.append(Stack(tuple(idx), entry["num_classes"], tasks.table[idx],
                            np.ones((len(idx), entry["num_classes"]), np.float32)))
        variables.append(_restore(run_dir / entry["path"]))
    combiner_path = run_dir / section["combiner"]
    if not combiner_path.is_file():
        raise BundleError(f"incomplete run: {combiner_path} is missing")
    doc = json.loads(combiner_path.read_text())
    meta = None
    if section.get("meta"):
        if not (run_dir / section["meta"]).is_file():
            raise BundleError(f"incomplete run: {run_dir / section['meta']} is missing")
        meta = MetaClassifier.load(run_dir / section["meta"])
    return Bundle(run_dir, section["backbone"], tuple(section["class_names"]),
                  PreprocessConfig(**section["preprocess"]), tasks, stacks, variables,
                  strategy_lib.combiner_from_json(tasks, doc["rule"]), meta,
                  doc.get("temperature"), "ensemble", _model_options(section["model"]))


def _load_single(run_dir: Path, config: dict) -> Bundle:
    """A run of experiments.single: one K-class member from its best (else latest) checkpoint."""
    needed = ("backbone", "class_names", "image_size", "channels", "normalization")
    missing = [k for k in needed if k not in config]
    if missing:
        raise BundleError(f"{run_dir}/config.json is neither an ensemble bundle nor a single-"
                          f"model run (missing {', '.join(missing)})")
    checkpoint = None
    for kind in ("best", "latest"):
        steps = sorted((p for p in (run_dir / "checkpoint" / kind).glob("*") if p.name.isdigit()),
                       key=lambda p: int(p.name))
        if steps:
            checkpoint = steps[-1]
            break
    if checkpoint is None:
        raise BundleError(f"incomplete run: no checkpoint under {run_dir / 'checkpoint'}")
    with ocp.CheckpointManager(checkpoint.parent) as manager:
        restored = manager.restore(int(checkpoint.name), args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    state = restored["state"]
    variables = {"params": _add_axis(state["params"]),
                 "batch_stats": _add_axis(state.get("batch_stats") or {})}
    class_names = tuple(config["class_names"])
    tasks = make_tasks("single", class_names)
    stack = Stack((0,), len(class_names), tasks.table, np.ones((1, len(class_names)), np.float32))
    preprocess = PreprocessConfig(image_size=config["image_size"], channels=config["channels"],
                                  normalization=config["normalization"],
                                  clahe=bool(config.get("clahe", False)))
    return Bundle(run_dir, config["backbone"], class_names, preprocess, tasks, [stack],
                  [variables], strategy_lib.rule_combiner(tasks), None, None, "single",
                  _model_options(config))


def _add_axis(tree):
    return jax.tree.map(lambda x: np.asarray(x)[None], tree)
