"""The ensemble bundle: a self-contained run directory that `evaluate` and `predict` load.

    RUN/config.json           every flag, plus "bundle": {"format_version", "kind":
                              "ensemble", "strategy", "backbone", "model", "class_names",
                              "preprocess", "tasks", "stacks", "combiner", "meta"}
    RUN/members/stack-<s>/    orbax checkpoint of stack s's variables (member axis first)
    RUN/combiner.json         the fitted rule combiner (and temperature)
    RUN/meta.json | meta.skops  optional meta-classifier (ensembles.meta: JSON for logistic,
                              allowlisted skops for gradient boosting; never pickle)

A single model is a one-member ensemble (strategy "single"): its run is the same bundle.

A stack run of `experiments.stack` is a bundle of bundles:

    STACK/config.json         "bundle": {"format_version", "kind": "stack", "class_names",
                              "components": [{"name", "path"}], "meta"}
    STACK/components/<i>/     the pieces of stacked run i (`bundle_pieces`), hard-linked
    STACK/meta.json | meta.skops  the meta-classifier over the components' member outputs

Each component keeps its own preprocessing, so `StackBundle.predict` runs every component
on the raw images through that component's PreprocessConfig, concatenates the member
probabilities in the saved feature layout and applies the meta-classifier. `Bundle.predict`
and `StackBundle.predict` share one signature, which is all `evaluate` and `predict` use.

A directory missing any piece, written by another format version, or holding a meta file
that fails the skops type check is refused with a one-line BundleError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from scipy.special import softmax

import backbones
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig
from ensembles import strategy as strategy_lib
from ensembles.members import Stack
from ensembles.meta import MetaClassifier
from ensembles.tasks import Tasks, make_tasks

FORMAT_VERSION = 1
COMBINER_FILE = "combiner.json"
COMPONENTS_DIR = "components"


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
                   PreprocessConfig, tasks: Tasks, stacks: list[dict], meta: str | None
                   ) -> dict:
    """The "bundle" entry of config.json describing how to rebuild and run the ensemble."""
    return {"format_version": FORMAT_VERSION, "kind": "ensemble", "strategy": strategy,
            "backbone": backbone, "model": model, "class_names": list(class_names),
            "preprocess": dataclasses.asdict(preprocess),
            "tasks": {"names": list(tasks.names), "num_classes": list(tasks.num_classes),
                      "table": tasks.table.tolist(), "healthy": tasks.healthy},
            "stacks": stacks, "combiner": COMBINER_FILE, "meta": meta}


def stack_section(*, class_names, names: Sequence[str], meta: str) -> dict:
    """The "bundle" entry of a stack run's config.json: components i live in components/<i>/."""
    return {"format_version": FORMAT_VERSION, "kind": "stack", "class_names": list(class_names),
            "components": [{"name": n, "path": f"{COMPONENTS_DIR}/{i}"}
                           for i, n in enumerate(names)], "meta": meta}


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What a loaded bundle says about source[indices], in that order. Probability columns,
    decisions and labels all index `class_names` (the model's classes)."""

    class_names: tuple[str, ...]
    proba: np.ndarray       # [N, K] class probabilities
    decisions: np.ndarray   # [N] class decisions (the combiner's rule or argmax)
    labels: np.ndarray      # [N] the source's labels in the model's order; -1: unknown class
    indices: np.ndarray     # [N] positions in the source


def model_order(labels: np.ndarray, label_names: Sequence[str] | None,
                class_names: Sequence[str]) -> np.ndarray:
    """Source labels (indices into `label_names`) as indices into the model's `class_names`
    (-1 for a class the model lacks); unchanged when `label_names` is None."""
    labels = np.asarray(labels)
    if label_names is None:
        return labels
    lookup = np.array([list(class_names).index(c) if c in class_names else -1
                       for c in label_names], np.int64)
    return lookup[labels] if len(labels) else labels


def _loader(source, indices, preprocess: PreprocessConfig, batch_size: int):
    return make_loader(source, indices, batch_size=batch_size, preprocess=preprocess,
                       shuffle=False, num_epochs=1, drop_remainder=False)


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
        return [softmax(z, axis=-1) for z in logits], labels, indices

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

    def predict(self, source, indices, *, batch_size: int = 32, use_meta: bool = False,
                label_names: Sequence[str] | None = None) -> Predictions:
        """Preprocess source[indices] (raw examples), run the members, combine and decide;
        `label_names` (the source's class names) maps its labels to the model's order."""
        probs, labels, idx = self.member_outputs(
            _loader(source, indices, self.preprocess, batch_size))
        proba = self.combine(probs, use_meta=use_meta)
        decisions = proba.argmax(1) if use_meta else self.decide(probs)
        return Predictions(self.class_names, proba, decisions,
                           model_order(labels, label_names, self.class_names), idx)


@dataclasses.dataclass
class StackBundle:
    """A loaded stack run: component bundles and the meta-classifier over their members."""

    run_dir: Path
    class_names: tuple[str, ...]
    names: tuple[str, ...]
    components: list[Bundle]
    meta: MetaClassifier
    kind: str = "stack"

    def predict(self, source, indices, *, batch_size: int = 32, use_meta: bool = False,
                label_names: Sequence[str] | None = None) -> Predictions:
        """Each component on source[indices] with its own preprocessing, then the meta-
        classifier; decisions are its argmax. A stack always combines with its meta-
        classifier: `use_meta` is accepted for the shared signature and changes nothing."""
        blocks = {}
        for name, component in zip(self.names, self.components, strict=True):
            # unshuffled loaders over the same indices: labels and idx agree across components
            blocks[name], labels, idx = component.member_outputs(
                _loader(source, indices, component.preprocess, batch_size))
        proba = self.meta.predict_proba(self.meta.features(blocks))
        return Predictions(self.class_names, proba, self.meta.classes_[proba.argmax(1)],
                           model_order(labels, label_names, self.class_names), idx)


def feature_layout(names: Sequence[str], components: Sequence[Bundle]) -> list[dict]:
    """The make_features layout of the components' member probabilities, in member order."""
    return [{"block": n, "member": m, "columns": int(c)}
            for n, b in zip(names, components, strict=True)
            for m, c in enumerate(b.tasks.num_classes)]


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


def _section(run_dir: Path, config: dict) -> dict | None:
    """The checked "bundle" entry of config.json (None for a run that did not finish)."""
    section = config.get("bundle")
    if section is None:
        return None
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{run_dir} has bundle format version {version!r}; this code reads "
                          f"version {FORMAT_VERSION}")
    if section.get("kind") not in ("ensemble", "stack"):
        raise BundleError(f"{run_dir} has unknown bundle kind {section.get('kind')!r}")
    return section


def load_bundle(run_dir: str | Path) -> Bundle | StackBundle:
    """Load an ensemble (single included) or stack run; BundleError if incomplete or
    foreign."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    section = _section(run_dir, config)
    if section is None:
        raise BundleError(f"{run_dir} is not a finished run: its config.json has no bundle "
                          f"section (training did not end, or it predates bundles)")
    if section["kind"] == "stack":
        return _load_stack(run_dir, section)
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
    meta = _load_meta(run_dir, section["meta"]) if section.get("meta") else None
    return Bundle(run_dir, section["backbone"], tuple(section["class_names"]),
                  PreprocessConfig(**section["preprocess"]), tasks, stacks, variables,
                  strategy_lib.combiner_from_json(tasks, doc["rule"]), meta,
                  doc.get("temperature"), "ensemble", _model_options(section["model"]))


def _load_meta(run_dir: Path, name: str) -> MetaClassifier:
    path = run_dir / name
    if not path.is_file():
        raise BundleError(f"incomplete run: {path} is missing")
    try:
        return MetaClassifier.load(path)
    except ValueError as error:
        raise BundleError(str(error)) from None


def _load_stack(run_dir: Path, section: dict) -> StackBundle:
    """Components (each an ensemble or single bundle) and the meta-classifier over them."""
    class_names = tuple(section["class_names"])
    names = tuple(c["name"] for c in section["components"])
    components = []
    for c in section["components"]:
        bundle_pieces(run_dir / c["path"])          # complete, and not itself a stack
        component = load_bundle(run_dir / c["path"])
        if component.class_names != class_names:
            raise BundleError(f"{run_dir}: component {c['name']} has classes "
                              f"{list(component.class_names)}, the stack {list(class_names)}")
        components.append(component)
    meta = _load_meta(run_dir, section["meta"])
    if meta.layout_ != feature_layout(names, components):
        raise BundleError(f"{run_dir}: the meta-classifier's feature layout does not match the "
                          f"components' members")
    return StackBundle(run_dir, class_names, names, components, meta)


# -- copying a run into a stack bundle ---------------------------------------------------
def bundle_pieces(run_dir: str | Path) -> list[Path]:
    """The paths (relative to run_dir) load_bundle reads: config.json, combiner, member
    checkpoints and meta file of an ensemble. BundleError if one is missing or the run is foreign or a stack."""
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    section = _section(run_dir, config)
    if section is None:
        raise BundleError(f"{run_dir} is not a finished run: its config.json has no bundle "
                          f"section")
    if section["kind"] == "stack":
        raise BundleError(f"{run_dir} is a stack bundle; stack the runs it was built from")
    pieces = [Path("config.json"), Path(section["combiner"]),
              *(Path(e["path"]) for e in section["stacks"])]
    if section.get("meta"):
        pieces.append(Path(section["meta"]))
    for piece in pieces:
        if not (run_dir / piece).exists():
            raise BundleError(f"incomplete run: {run_dir / piece} is missing")
    return pieces


def copy_bundle(run_dir: str | Path, dest: str | Path, pieces: Sequence[Path]) -> None:
    """Copy `pieces` of run_dir into dest (a new folder), hard-linking files where the
    filesystem allows (checkpoints are written once, so links are safe and cost no space)."""
    run_dir, dest = Path(run_dir), Path(dest)
    for piece in pieces:
        target = dest / piece
        target.parent.mkdir(parents=True, exist_ok=True)
        if (run_dir / piece).is_dir():
            shutil.copytree(run_dir / piece, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(run_dir / piece, target)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
