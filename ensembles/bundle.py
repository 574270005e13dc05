"""The ensemble bundle: a self-contained run directory that `evaluate` and `predict` load.

    RUN/config.json           every flag, plus "bundle": {"format_version", "kind":
                              "ensemble", "strategy", "backbone", "model", "class_names",
                              "preprocess", "tasks", "stacks", "combiner", "meta"}
    RUN/members/stack-<s>/    orbax checkpoint of stack s's variables (member axis first)
    RUN/combiner.json         the fitted rule combiner (and temperature)
    RUN/meta.json | meta.skops  optional meta-classifier (ensembles.meta: JSON for logistic,
                              allowlisted skops for gradient boosting; never pickle)
    RUN/train_hashes.npz      optional (runs since the leakage check): hashes of the training
                              and validation images (ensembles.leakage), read on demand

A run trained with `--lung-mask auto` records its segmenter in the section ("segmenter":
{"path": its absolute run folder, "sha256": the digest of its config.json}); loading the
bundle loads that segmenter and refuses one that is missing or changed, and `predict` gives
every image the segmenter's mask before the bundle's preprocessing masks it.
`with_segmenter` swaps in another segmenter (evaluate's and predict's `--segmenter`: a run
trained on a dataset's shipped masks applied to images that have none).

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

Integrity: a bundle loads only what it contains, intact.

- Manifest: the "files" entry of the "bundle" section maps every file of the bundle's pieces
  (each file under members/stack-<s>/, combiner.json, the meta file; for a stack, its meta file
  and every file under components/, the components' own config.json included) to its SHA-256
  hex digest. `add_manifest` computes it once those files are written, just before
  config.json, which is written last and atomically: a run has a manifest exactly when it has
  a bundle section. config.json cannot hold its own digest; it is checked instead against the
  schema below and against the checkpoints it describes. A copy (`copy_bundle`,
  `Ensemble.save`, a stack's components) carries config.json and so the manifest, and is
  checked after copying.
- Paths: every path config.json names (stacks[].path, combiner, meta, components[].path, the
  manifest's keys) must be relative, canonical and free of "..", and neither it nor a folder
  on its way may be a symbolic link (the run folder itself may be one); a piece folder holds
  only regular files, exactly those the manifest lists, each with its recorded digest.
- Schema: config.json must be a JSON object whose "bundle" section has exactly the keys and
  types of `ENSEMBLE_SCHEMA` / `STACK_SCHEMA`; preprocess must build a PreprocessConfig, the
  tasks must equal make_tasks', the stacks must hold every member once, and each checkpoint's
  array shapes (read from its metadata before any array is) must be those of the backbone
  built with the bundle's model options, image size, channels and class count. An ensemble's
  run config ("config", which Ensemble.load rebuilds) must parse and agree with the section.
  combiner.json (`COMBINER_SCHEMA`) and the meta file (ensembles.meta) are validated too.

Anything else -- a missing piece, another format version, a meta file that fails the skops
type check, any of the above -- is refused with a one-line BundleError naming the file, which
the CLIs print as `error: ...` (exit 2). The digests catch corrupted or edited files, not a
forger who also rewrites config.json's manifest: that would take a signature.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from scipy.special import softmax

import backbones
from data_pipeline.loader import make_loader
from data_pipeline.preprocess import PreprocessConfig
from ensembles import strategy as strategy_lib
from ensembles import leakage
from ensembles.config import RunConfig
from ensembles.explain import decision_columns
from ensembles.members import Stack
from ensembles.meta import FILE_NAMES as META_FILE_NAMES
from ensembles.meta import MetaClassifier
from ensembles.operating_points import flag, parse_operating_point
from ensembles.tasks import STRATEGIES, Tasks, make_tasks

if TYPE_CHECKING:   # the segmenter module imports this one
    from ensembles.segmenter import Segmenter

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
COMBINER_FILE = "combiner.json"
COMPONENTS_DIR = "components"
MANIFEST_KEY = "files"      # in the "bundle" section: {file of a piece: its SHA-256 digest}


class BundleError(ValueError):
    """A run directory that cannot be loaded (missing pieces, other format version, a file
    changed since it was saved, a config that fails the schema); one line naming the file."""


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


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What a loaded bundle says about source[indices], in that order. Probability columns,
    decisions and labels all index `class_names` (the model's classes)."""

    class_names: tuple[str, ...]
    proba: np.ndarray       # [N, K] class probabilities
    decisions: np.ndarray   # [N] class decisions (the combiner's rule or argmax)
    labels: np.ndarray      # [N] the source's labels in the model's order; -1: unknown class
    indices: np.ndarray     # [N] positions in the source
    # per-row columns saying how each decision was reached (ensembles.explain)
    explanation: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    thresholds: list[float | None] | None = None   # per class, when the operating point applies
    flags: np.ndarray | None = None                 # [N, K] p_k >= thresholds[k]


def concat_predictions(parts: Sequence[Predictions]) -> Predictions:
    """One Predictions from consecutive parts of one model's predictions (rows in order)."""
    first = parts[0]
    cat = np.concatenate
    return Predictions(first.class_names, cat([p.proba for p in parts]),
                       cat([p.decisions for p in parts]), cat([p.labels for p in parts]),
                       cat([p.indices for p in parts]),
                       {k: cat([p.explanation[k] for p in parts]) for k in first.explanation},
                       first.thresholds,
                       None if first.flags is None else cat([p.flags for p in parts]))


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
    operating_point: str | None = None          # what the thresholds aim for, e.g. "youden"
    thresholds: list[float | None] | None = None  # per class, on the rule's probabilities
    hashes_file: Path | None = None     # the train_hashes piece, None for older runs
    segmenter: Any = None               # ensembles.segmenter.Segmenter (lung_mask auto)

    def with_masks(self, source):
        """`source` as this bundle's preprocessing needs it: with the segmenter's masks when
        the run was trained on predicted masks, else unchanged."""
        return source if self.segmenter is None else self.segmenter.source(source)

    @property
    def needs_shipped_masks(self) -> bool:
        """Trained on the lung masks its dataset shipped: every image needs its mask."""
        return self.preprocess.lung_mask and self.segmenter is None

    def with_segmenter(self, segmenter: Segmenter) -> Bundle:
        """This bundle masking every image with `segmenter`'s masks in place of the dataset's
        or the recorded segmenter's; ValueError for a run trained on unmasked images (masking
        would change the input distribution it was trained on)."""
        if not self.preprocess.lung_mask:
            raise ValueError(f"--segmenter: {self.run_dir} was trained on unmasked images; "
                             f"masking them would change the input it was trained on")
        return dataclasses.replace(self, segmenter=segmenter)

    def lung_masks(self, images: Sequence[np.ndarray],
                   masks: Sequence[np.ndarray | None] | None = None) -> list | None:
        """The masks `preprocess` needs for raw images: None when the model masks nothing,
        the segmenter's, else `masks` (ValueError when one is missing)."""
        if not self.preprocess.lung_mask:
            return None
        if self.segmenter is not None:
            return self.segmenter.masks(images)
        if masks is None or any(m is None for m in masks):
            raise ValueError(f"{self.run_dir} was trained on lung-masked images with the "
                             f"dataset's masks: every image needs its mask")
        return list(masks)

    def training_hashes(self) -> leakage.TrainingHashes | None:
        """The hashes of the images the members were fitted on (read now), or None."""
        if self.hashes_file is None:
            return None
        try:
            return leakage.load_training_hashes(self.hashes_file)
        except ValueError as error:
            raise BundleError(_line(error)) from None

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
            _loader(self.with_masks(source), indices, self.preprocess, batch_size))
        proba = self.combine(probs, use_meta=use_meta)
        decisions = proba.argmax(1) if use_meta else self.decide(probs)
        # the thresholds were chosen on the rule's probabilities: not for the meta-classifier's
        thresholds = None if use_meta else self.thresholds
        return Predictions(self.class_names, proba, decisions,
                           model_order(labels, label_names, self.class_names), idx,
                           decision_columns(self.combiner, probs, self.class_names,
                                            use_meta=use_meta),
                           thresholds, None if thresholds is None else flag(proba, thresholds))


@dataclasses.dataclass
class StackBundle:
    """A loaded stack run: component bundles and the meta-classifier over their members."""

    run_dir: Path
    class_names: tuple[str, ...]
    names: tuple[str, ...]
    components: list[Bundle]
    meta: MetaClassifier
    kind: str = "stack"
    operating_point: None = None    # decided by the meta-classifier: no per-class thresholds

    def predict(self, source, indices, *, batch_size: int = 32, use_meta: bool = False,
                label_names: Sequence[str] | None = None) -> Predictions:
        """Each component on source[indices] with its own preprocessing, then the meta-
        classifier; decisions are its argmax. A stack always combines with its meta-
        classifier: `use_meta` is accepted for the shared signature and changes nothing."""
        blocks = {}
        for name, component in zip(self.names, self.components, strict=True):
            # unshuffled loaders over the same indices: labels and idx agree across components
            blocks[name], labels, idx = component.member_outputs(
                _loader(component.with_masks(source), indices, component.preprocess,
                        batch_size))
        proba = self.meta.predict_proba(self.meta.features(blocks))
        return Predictions(self.class_names, proba, self.meta.classes_[proba.argmax(1)],
                           model_order(labels, label_names, self.class_names), idx,
                           decision_columns(None, [proba], self.class_names, use_meta=True))

    @property
    def needs_shipped_masks(self) -> bool:
        """A component was trained on the lung masks its dataset shipped."""
        return any(c.needs_shipped_masks for c in self.components)

    def with_segmenter(self, segmenter: Segmenter) -> StackBundle:
        """Every component trained on masked images masks with `segmenter`; ValueError when
        none was (see `Bundle.with_segmenter`)."""
        if not any(c.preprocess.lung_mask for c in self.components):
            raise ValueError(f"--segmenter: no component of {self.run_dir} was trained on "
                             f"masked images; masking them would change their input")
        return dataclasses.replace(self, components=[
            c.with_segmenter(segmenter) if c.preprocess.lung_mask else c
            for c in self.components])

    def training_hashes(self) -> leakage.TrainingHashes | None:
        """Every component's training hashes together; None if a component has none."""
        parts = [c.training_hashes() for c in self.components]
        return None if any(p is None for p in parts) else leakage.concatenate(parts)


def feature_layout(names: Sequence[str], components: Sequence[Bundle]) -> list[dict]:
    """The make_features layout of the components' member probabilities, in member order."""
    return [{"block": n, "member": m, "columns": int(c)}
            for n, b in zip(names, components, strict=True)
            for m, c in enumerate(b.tasks.num_classes)]


# -- the schema of config.json's "bundle" section ------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Type:
    """A JSON leaf type of the schema: a description and a test."""

    name: str
    test: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


STR = _Type("a string", lambda v: isinstance(v, str))
INT = _Type("an integer", _is_int)
NUM = _Type("a number", lambda v: _is_int(v) or isinstance(v, float))
BOOL = _Type("true or false", lambda v: isinstance(v, bool))
NULL = _Type("null", lambda v: v is None)
ANY = _Type("any JSON value", lambda v: True)
SHA256 = _Type("a SHA-256 hex digest", lambda v: isinstance(v, str)
               and re.fullmatch(r"[0-9a-f]{64}", v) is not None)


@dataclasses.dataclass(frozen=True)
class _Map:
    """A JSON object with any string keys and values of one spec (the manifest)."""

    values: Any


# A spec is a _Type, a tuple of alternative specs, a one-element list [spec of the items],
# a _Map, or a dict {key: spec} for an object with exactly those keys ("key?": optional).
_NUMS = [NUM]
PREPROCESS_TYPES = {"image_size": INT, "channels": INT, "resize": STR, "normalization": STR,
                    "mean": (NULL, _NUMS), "std": (NULL, _NUMS), "clahe": BOOL,
                    "clahe_clip": NUM, "local_equalize": BOOL, "local_equalize_radius": INT,
                    "lung_mask": BOOL}
# Exactly PreprocessConfig's fields (a field added there is accepted with any JSON value until
# PREPROCESS_TYPES types it; PreprocessConfig itself then checks the values).
PREPROCESS_SCHEMA = {f.name: PREPROCESS_TYPES.get(f.name, ANY)
                     for f in dataclasses.fields(PreprocessConfig)}
ENSEMBLE_SCHEMA = {
    "format_version": INT, "kind": STR, "strategy": STR, "backbone": STR,
    "model": {"head": STR, "width?": (NUM, NULL)},
    "class_names": [STR], "preprocess": PREPROCESS_SCHEMA,
    "tasks": {"names": [STR], "num_classes": [INT], "table": [[INT]], "healthy": (INT, NULL)},
    "stacks": [{"members": [INT], "num_classes": INT, "path": STR}],
    "combiner": STR, "meta": (STR, NULL), "train_hashes?": STR,
    "segmenter?": {"path": STR, "sha256": SHA256}, MANIFEST_KEY: _Map(SHA256)}
STACK_SCHEMA = {
    "format_version": INT, "kind": STR, "class_names": [STR],
    "components": [{"name": STR, "path": STR}], "meta": STR, MANIFEST_KEY: _Map(SHA256)}
COMBINER_SCHEMA = {"rule": {"strategy": STR, "decision?": STR, "confidence?": STR,
                            "threshold?": NUM, "target_sensitivity?": (NUM, NULL)},
                   "temperature?": (NUM, NULL),
                   "operating_point?": {"target": STR, "thresholds": [(NUM, NULL)]}}


def _describe(spec) -> str:
    if isinstance(spec, _Type):
        return spec.name
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    if isinstance(spec, list):
        return f"a list, each item {_describe(spec[0])}"
    return "a JSON object"


def _shown(value) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
    text = json.dumps(value, default=str)
    return kind if len(text) > 40 else f"{kind} ({text})"


def _conforms(value, spec) -> bool:
    try:
        _validate(value, spec, "", Path())
    except BundleError:
        return False
    return True


def _validate(value, spec, where: str, path: Path) -> None:
    """BundleError naming `path` and the key `where` unless `value` matches `spec`."""
    if isinstance(spec, tuple):
        if not any(_conforms(value, s) for s in spec):
            raise BundleError(f"{path}: {where} must be {_describe(spec)}, found {_shown(value)}")
    elif isinstance(spec, _Type):
        if not spec.test(value):
            raise BundleError(f"{path}: {where} must be {spec.name}, found {_shown(value)}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise BundleError(f"{path}: {where} must be {_describe(spec)}, found {_shown(value)}")
        for i, item in enumerate(value):
            _validate(item, spec[0], f"{where}[{i}]", path)
    elif isinstance(spec, _Map):
        if not isinstance(value, dict):
            raise BundleError(f"{path}: {where} must be a JSON object, found {_shown(value)}")
        for key, item in value.items():
            _validate(item, spec.values, f"{where}[{key!r}]", path)
    else:
        if not isinstance(value, dict):
            raise BundleError(f"{path}: {where} must be a JSON object, found {_shown(value)}")
        keys = {k.removesuffix("?"): k for k in spec}
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise BundleError(f"{path}: {where} has unknown key {unknown[0]!r} (known: "
                              f"{', '.join(keys)})")
        for key, raw in keys.items():
            if key in value:
                _validate(value[key], spec[raw], f"{where}.{key}", path)
            elif not raw.endswith("?"):
                raise BundleError(f"{path}: {where}.{key} is missing")


def _line(error: BaseException) -> str:
    """The first line of an exception's message (BundleErrors are one line)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# -- paths inside the run and the SHA-256 manifest -------------------------------------------
def _inside(run_dir: Path, rel, where: str) -> Path:
    """run_dir/rel for a path named in run_dir's config.json: relative, canonical, without
    "..", and without a symbolic link on the way; BundleError naming it otherwise."""
    config = run_dir / CONFIG_FILE
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{config}: {where} {rel!r} is not a path inside the run")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise BundleError(f"{config}: {where} {rel!r} points outside the run folder")
    if not pure.parts or pure.as_posix() != rel or rel == CONFIG_FILE:
        raise BundleError(f"{config}: {where} {rel!r} is not a canonical path of a bundle piece")
    path = run_dir
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link: a bundle holds its own files, so "
                              f"{where} may not lead out of it")
    if path.exists() and not path.resolve().is_relative_to(run_dir.resolve()):
        raise BundleError(f"{path} resolves outside the run folder {run_dir}")
    return path


def _piece_files(run_dir: Path, rel: str) -> list[str]:
    """Every file of the piece rel (a file, or a folder of regular files), relative to
    run_dir, sorted; BundleError on a symbolic link, a non-regular or unreadable entry."""
    path = run_dir / rel
    if path.is_file():
        return [rel]
    found = []

    def refuse(error: OSError):
        raise BundleError(f"{error.filename}: cannot read the bundle folder ({error.strerror})")

    for root, dirs, files in os.walk(path, onerror=refuse):
        dirs.sort()
        for name in sorted(dirs + files):
            entry = Path(root) / name
            if entry.is_symlink():
                raise BundleError(f"{entry} is a symbolic link: a bundle holds its own files")
            if name in files and not entry.is_file():
                raise BundleError(f"{entry} is not a regular file")
            if name in files:
                found.append(entry.relative_to(run_dir).as_posix())
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise BundleError(f"{path}: cannot read ({error.strerror})") from None
    return digest.hexdigest()


def _pieces(section: dict) -> list[str]:
    """The pieces (files or folders, relative to the run) a bundle section names, config.json
    aside: combiner, member checkpoints, meta and training-hashes files; for a stack its meta
    and components."""
    if section["kind"] == "stack":
        return [section["meta"], *(c["path"] for c in section["components"])]
    return [section["combiner"], *(e["path"] for e in section["stacks"]),
            *([section["meta"]] if section.get("meta") else []),
            *([section["train_hashes"]] if section.get("train_hashes") else [])]


def manifest(run_dir: str | Path, pieces: Sequence[str]) -> dict[str, str]:
    """{file: SHA-256 hex digest} for every file of `pieces` (relative to run_dir), sorted."""
    run_dir = Path(run_dir)
    files = [f for rel in pieces for f in _piece_files(run_dir, str(rel))]
    return {f: _sha256(run_dir / f) for f in sorted(files)}


def add_manifest(run_dir: str | Path, section: dict) -> dict:
    """The bundle section with its "files" manifest: call once every piece is written and
    before config.json (which holds the section) is."""
    return {**section, MANIFEST_KEY: manifest(run_dir, _pieces(section))}


def _verify(run_dir: Path, section: dict) -> None:
    """Every file of the pieces is listed in the manifest, every listed file is there, and
    each has its recorded digest; BundleError naming the first file that does not."""
    config, files = run_dir / CONFIG_FILE, section[MANIFEST_KEY]
    pieces = _pieces(section)
    for rel in files:
        _inside(run_dir, rel, "a manifest entry")
        if not any(rel == p or rel.startswith(p + "/") for p in pieces):
            raise BundleError(f"{config}: the manifest lists {rel}, which is not in a piece of "
                              f"the bundle")
    found = [f for rel in pieces for f in _piece_files(run_dir, rel)]
    for rel in found:
        if rel not in files:
            raise BundleError(f"{run_dir / rel} is not in the manifest of {config}: the bundle "
                              f"was changed after it was saved")
    present = set(found)
    for rel, digest in files.items():
        if rel not in present:
            raise BundleError(f"incomplete run: {run_dir / rel} is missing (listed in the "
                              f"manifest of {config})")
        if _sha256(run_dir / rel) != digest:
            raise BundleError(f"{run_dir / rel} does not match its SHA-256 digest in {config}: "
                              f"the file changed after the run was saved (corrupt or tampered)")


# -- reading and checking a bundle ---------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise BundleError(f"{path} is not a valid {what} ({reason})") from None
    except OSError as error:
        raise BundleError(f"{path}: cannot read ({error.strerror})") from None


def _read_config(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise BundleError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG_FILE
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link: a bundle holds its own files")
    if not path.is_file():
        raise BundleError(f"{run_dir} is not a complete run: config.json is missing")
    config = _read_json(path, "JSON file")
    if not isinstance(config, dict):
        raise BundleError(f"{path} must hold a JSON object, found {_shown(config)}")
    return config


def _section(run_dir: Path, config: dict) -> dict | None:
    """The schema-checked "bundle" entry of config.json (None for a run that did not finish)."""
    path = run_dir / CONFIG_FILE
    section = config.get("bundle")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise BundleError(f"{path}: bundle must be a JSON object, found {_shown(section)}")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{run_dir} has bundle format version {version!r}; this code reads "
                          f"version {FORMAT_VERSION}")
    if section.get("kind") not in ("ensemble", "stack"):
        raise BundleError(f"{run_dir} has unknown bundle kind {section.get('kind')!r}")
    if MANIFEST_KEY not in section:
        raise BundleError(f"{path}: bundle.{MANIFEST_KEY} (the SHA-256 manifest of the "
                          f"bundle's files) is missing: the run predates digests or was edited")
    _validate(section, STACK_SCHEMA if section["kind"] == "stack" else ENSEMBLE_SCHEMA,
              "bundle", path)
    names = section["class_names"]
    if len(names) < 2 or len(set(names)) != len(names):
        raise BundleError(f"{path}: bundle.class_names must be 2 or more distinct names, found "
                          f"{names}")
    listed = "components" if section["kind"] == "stack" else "stacks"
    if not section[listed]:
        raise BundleError(f"{path}: bundle.{listed} is empty")
    if section.get("meta") and (section["meta"] not in META_FILE_NAMES.values()):
        raise BundleError(f"{path}: bundle.meta {section['meta']!r} must be one of "
                          f"{', '.join(META_FILE_NAMES.values())}")
    if section.get("train_hashes", leakage.TRAIN_HASHES_FILE) != leakage.TRAIN_HASHES_FILE:
        raise BundleError(f"{path}: bundle.train_hashes {section['train_hashes']!r} must be "
                          f"{leakage.TRAIN_HASHES_FILE}")
    pieces = _pieces(section)
    for a in pieces:
        for b in pieces:
            if a is not b and (a == b or b.startswith(a + "/")):
                raise BundleError(f"{path}: bundle pieces {a!r} and {b!r} overlap")
    return section


@dataclasses.dataclass
class _Checked:
    """A bundle whose config, paths, files and shapes were checked; `load` restores the
    weights (the only step left)."""

    run_dir: Path
    section: dict
    load: Callable[[], Bundle | StackBundle]


def _check(run_dir: Path) -> _Checked:
    """Everything but restoring the weights: schema, paths, pieces present, digests, and that
    the checkpoints, combiner and meta file fit the bundle section."""
    config = _read_config(run_dir)
    section = _section(run_dir, config)
    if section is None:
        raise BundleError(f"{run_dir} is not a finished run: its config.json has no bundle "
                          f"section (training did not end, or it predates bundles)")
    if section["kind"] == "stack":
        return _check_stack(run_dir, section)
    return _check_ensemble(run_dir, config, section)


def _file_piece(run_dir: Path, rel: str, where: str) -> Path:
    path = _inside(run_dir, rel, where)
    if not path.is_file():
        raise BundleError(f"incomplete run: {path} is missing")
    return path


def _check_ensemble(run_dir: Path, config: dict, section: dict) -> _Checked:
    path = run_dir / CONFIG_FILE
    checkpoints = []
    for i, entry in enumerate(section["stacks"]):
        ckpt = _inside(run_dir, entry["path"], f"bundle.stacks[{i}].path")
        if not ckpt.is_dir():
            raise BundleError(f"incomplete run: member checkpoint {ckpt} is missing")
        if not _piece_files(run_dir, entry["path"]):
            raise BundleError(f"incomplete run: member checkpoint {ckpt} is empty")
        checkpoints.append(ckpt)
    combiner_path = _file_piece(run_dir, section["combiner"], "bundle.combiner")
    meta_path = (_file_piece(run_dir, section["meta"], "bundle.meta") if section.get("meta")
                 else None)
    hashes_path = (_file_piece(run_dir, section["train_hashes"], "bundle.train_hashes")
                   if section.get("train_hashes") else None)
    _verify(run_dir, section)

    class_names = tuple(section["class_names"])
    if section["strategy"] not in STRATEGIES:
        raise BundleError(f"{path}: bundle.strategy {section['strategy']!r} is not one of "
                          f"{', '.join(STRATEGIES)}")
    backbone = section["backbone"]
    if backbone not in backbones.names():
        raise BundleError(f"{path}: bundle.backbone {backbone!r} is not a known backbone")
    try:
        preprocess = PreprocessConfig(**section["preprocess"])
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: bundle.preprocess is invalid ({_line(error)})") from None
    tasks = _tasks(path, section)
    stacks = _stacks(path, section, tasks)
    options = _model_options(section["model"])
    expected = [_checkpoint_fits(ckpt, path, backbone, options, preprocess, stack)
                for ckpt, stack in zip(checkpoints, stacks, strict=True)]
    doc = _read_json(combiner_path, "combiner file")
    _validate(doc, COMBINER_SCHEMA, "the combiner", combiner_path)
    try:
        combiner = strategy_lib.combiner_from_json(tasks, doc["rule"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{combiner_path}: not a combiner of these tasks "
                          f"({_line(error)})") from None
    _operating_point_fits(doc.get("operating_point"), combiner_path, len(class_names))
    meta = None
    if meta_path is not None:
        meta = _load_meta(meta_path)
        _meta_fits(meta, meta_path, [{"block": tasks.strategy, "member": m, "columns": c}
                                     for m, c in enumerate(tasks.num_classes)],
                   len(class_names))
    _run_config_agrees(path, config, section, preprocess)
    segmenter = _segmenter(path, section, preprocess)

    def load() -> Bundle:
        variables = [_restore(ckpt, want) for ckpt, want in zip(checkpoints, expected,
                                                                  strict=True)]
        point = doc.get("operating_point") or {}
        return Bundle(run_dir, backbone, class_names, preprocess, tasks, stacks, variables,
                      combiner, meta, doc.get("temperature"), "ensemble", options,
                      point.get("target"), point.get("thresholds"), hashes_path, segmenter)

    return _Checked(run_dir, section, load)


def _segmenter(path: Path, section: dict, preprocess: PreprocessConfig):
    """The segmenter a lung_mask auto run recorded, loaded and checked against its digest."""
    from ensembles.segmenter import load_segmenter   # it imports this module
    ref = section.get("segmenter")
    if ref is None:
        return None
    if not preprocess.lung_mask:
        raise BundleError(f"{path}: bundle.segmenter is set but preprocess.lung_mask is off")
    try:
        return load_segmenter(ref["path"], ref["sha256"])
    except BundleError as error:
        raise BundleError(f"{path}: its lung masks come from a segmenter that cannot be used: "
                          f"{_line(error)}") from None


def _operating_point_fits(point: dict | None, path: Path, k: int) -> None:
    """The saved operating point names a known target and one threshold per class."""
    if point is None:
        return
    try:
        parse_operating_point(point["target"])
    except ValueError as error:
        raise BundleError(f"{path}: operating_point: {_line(error)}") from None
    if len(point["thresholds"]) != k:
        raise BundleError(f"{path}: operating_point has {len(point['thresholds'])} thresholds "
                          f"for {k} classes")


def _tasks(path: Path, section: dict) -> Tasks:
    t, class_names = section["tasks"], section["class_names"]
    healthy = t["healthy"]
    if healthy is not None and not 0 <= healthy < len(class_names):
        raise BundleError(f"{path}: bundle.tasks.healthy {healthy} is not a class index")
    try:
        tasks = make_tasks(section["strategy"], class_names,
                           **({} if healthy is None else {"healthy": class_names[healthy]}))
    except ValueError as error:
        raise BundleError(f"{path}: bundle.tasks: {_line(error)}") from None
    mine = {"names": list(tasks.names), "num_classes": list(tasks.num_classes),
            "table": tasks.table.tolist(), "healthy": tasks.healthy}
    for key, value in mine.items():
        if t[key] != value:
            raise BundleError(f"{path}: bundle.tasks.{key} differs from the "
                              f"{section['strategy']} tasks over bundle.class_names")
    return tasks


def _stacks(path: Path, section: dict, tasks: Tasks) -> list[Stack]:
    """The members' stacks; each member exactly once, with its task's class count."""
    m, stacks, seen = tasks.num_members, [], []
    for i, entry in enumerate(section["stacks"]):
        idx, c = entry["members"], entry["num_classes"]
        if not idx or any(not 0 <= j < m for j in idx):
            raise BundleError(f"{path}: bundle.stacks[{i}].members {idx} must be member "
                              f"indices in [0, {m})")
        counts = sorted({tasks.num_classes[j] for j in idx})
        if counts != [c]:
            raise BundleError(f"{path}: bundle.stacks[{i}].num_classes {c} disagrees with its "
                              f"members' class counts {counts}")
        seen += idx
        stacks.append(Stack(tuple(idx), c, tasks.table[idx], np.ones((len(idx), c),
                                                                     np.float32)))
    if sorted(seen) != list(range(m)):
        raise BundleError(f"{path}: bundle.stacks hold members {sorted(seen)}; the tasks have "
                          f"{m} members, each to be held once")
    return stacks


def _flat(tree: Mapping, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params/block1_conv1/kernel": (shape, dtype)} for the leaves of nested mappings."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flat(value, name))
        else:
            out[name] = (tuple(int(d) for d in value.shape), str(np.dtype(value.dtype)))
    return out


@functools.lru_cache(maxsize=64)
def _model_shapes(backbone: str, options: tuple, num_classes: int, image_size: int,
                  channels: int) -> dict:
    """The variables' shapes of one member (traced, not computed)."""
    model = backbones.create(backbone, num_classes=num_classes, **dict(options))
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    tree = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0),
                                                "dropout": jax.random.key(1)}, x, train=False), x)
    return _flat({"params": tree["params"], "batch_stats": tree.get("batch_stats", {})})


def _checkpoint_fits(ckpt: Path, path: Path, backbone: str, options: dict,
                     preprocess: PreprocessConfig, stack: Stack) -> dict:
    """The checkpoint's arrays (from its metadata) are those of the bundle's model; returns
    {name: (shape, dtype)} with the member axis first."""
    what = (f"{backbone} {options}, {preprocess.image_size} px, {preprocess.channels} "
            f"channel(s), {stack.num_classes} classes, {len(stack.members)} member(s)")
    try:
        one = _model_shapes(backbone, tuple(sorted(options.items())), stack.num_classes,
                            preprocess.image_size, preprocess.channels)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: cannot build the bundle's model ({what}): "
                          f"{_line(error)}") from None
    expected = {k: ((len(stack.members), *shape), dtype) for k, (shape, dtype) in one.items()}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(ckpt.absolute())
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
        if not isinstance(tree, Mapping) or not isinstance(tree.get("params"), Mapping):
            raise ValueError("its metadata describes no params")
        saved = _flat({"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}})
    except Exception as error:  # noqa: BLE001 - orbax parsing untrusted files: any failure
        raise BundleError(f"{ckpt}: not a readable member checkpoint ({_line(error)})") from None
    if saved != expected:
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        differ = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        detail = (f"{differ[0]} is {saved[differ[0]]}, the model needs {expected[differ[0]]}"
                  if differ else f"it lacks {missing[0]}" if missing else
                  f"it holds {extra[0]}, which the model does not have")
        raise BundleError(f"{ckpt} does not fit the model {path} describes ({what}): {detail}")
    return expected


def _restore(path: Path, expected: dict) -> dict:
    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(path.absolute())
        variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
        restored = _flat(variables)
    except Exception as error:  # noqa: BLE001 - orbax reading untrusted files: any failure
        raise BundleError(f"{path}: cannot restore the member checkpoint "
                          f"({_line(error)})") from None
    if restored != expected:
        raise BundleError(f"{path}: the restored arrays differ from the checkpoint's metadata")
    return variables


def _load_meta(path: Path) -> MetaClassifier:
    try:
        return MetaClassifier.load(path)
    except ValueError as error:
        raise BundleError(_line(error)) from None


def _meta_fits(meta: MetaClassifier, path: Path, layout: list[dict], k: int,
               members: str = "the bundle's members") -> None:
    if meta.layout_ != layout:
        raise BundleError(f"{path}: the meta-classifier's feature layout does not match "
                          f"{members}")
    if np.asarray(meta.classes_).tolist() != list(range(k)):
        raise BundleError(f"{path}: the meta-classifier's classes "
                          f"{np.asarray(meta.classes_).tolist()} are not the bundle's {k}")


def _run_config_agrees(path: Path, config: dict, section: dict,
                       preprocess: PreprocessConfig) -> None:
    """The run config (what Ensemble.load rebuilds) parses and agrees with the bundle."""
    doc = config.get("config")
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: the run config (\"config\") is missing or not an object")
    try:
        cfg = RunConfig.from_dict(doc)
        head = backbones.resolve_head(cfg.model.head, cfg.model.backbone)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: the run config is invalid ({_line(error)})") from None
    pairs = [("ensemble.strategy", cfg.ensemble.strategy, "strategy", section["strategy"]),
             ("model.backbone", cfg.model.backbone, "backbone", section["backbone"]),
             ("model.head", head, "model.head", section["model"]["head"]),
             ("model.width", cfg.model.width, "model.width", section["model"].get("width")),
             ("data.image_size", cfg.data.image_size, "preprocess.image_size",
              preprocess.image_size),
             ("data.channels", cfg.data.channels, "preprocess.channels", preprocess.channels),
             ("data.normalization", cfg.data.normalization, "preprocess.normalization",
              preprocess.normalization),
             ("data.clahe", cfg.data.clahe, "preprocess.clahe", preprocess.clahe),
             ("data.lung_mask", cfg.data.lung_mask != "none", "preprocess.lung_mask",
              preprocess.lung_mask)]
    for ours, mine, theirs, value in pairs:
        if mine is not None and mine != value:
            raise BundleError(f"{path}: bundle.{theirs} {value!r} disagrees with the run "
                              f"config's {ours} {mine!r}")


def _check_stack(run_dir: Path, section: dict) -> _Checked:
    """Components (each an ensemble bundle, checked on its own) and the meta-classifier."""
    path = run_dir / CONFIG_FILE
    class_names = tuple(section["class_names"])
    names = tuple(c["name"] for c in section["components"])
    if len(set(names)) != len(names):
        raise BundleError(f"{path}: bundle.components names repeat: {list(names)}")
    components = []
    for i, c in enumerate(section["components"]):
        folder = _inside(run_dir, c["path"], f"bundle.components[{i}].path")
        config = _read_config(folder)
        inner = _section(folder, config)
        if inner is None or inner["kind"] != "ensemble":
            raise BundleError(f"{folder} is not a finished ensemble run: a stack's components "
                              f"are ensemble bundles")
        component = _check_ensemble(folder, config, inner)
        if tuple(inner["class_names"]) != class_names:
            raise BundleError(f"{run_dir}: component {c['name']} has classes "
                              f"{inner['class_names']}, the stack {list(class_names)}")
        components.append(component)
    meta_path = _file_piece(run_dir, section["meta"], "bundle.meta")
    _verify(run_dir, section)
    meta = _load_meta(meta_path)
    layout = [{"block": n, "member": m, "columns": int(c)}
              for n, component in zip(names, components, strict=True)
              for m, c in enumerate(component.section["tasks"]["num_classes"])]
    _meta_fits(meta, meta_path, layout, len(class_names), "the components' members")

    def load() -> StackBundle:
        return StackBundle(run_dir, class_names, names, [c.load() for c in components], meta)

    return _Checked(run_dir, section, load)


def load_bundle(run_dir: str | Path) -> Bundle | StackBundle:
    """Load an ensemble (single included) or stack run, after checking its schema, paths,
    digests and shapes; BundleError (one line, naming the file) if incomplete, foreign or
    changed since it was saved."""
    return _check(Path(run_dir)).load()


# -- copying a run into a stack bundle ---------------------------------------------------
def bundle_pieces(run_dir: str | Path) -> list[Path]:
    """The paths (relative to run_dir) load_bundle reads: config.json, combiner, member
    checkpoints, meta and training-hashes files of an ensemble, once checked as load_bundle
    checks them (weights aside). BundleError if one is missing or changed, or the run is
    foreign or a stack."""
    run_dir = Path(run_dir)
    section = _section(run_dir, _read_config(run_dir))
    if section is not None and section["kind"] == "stack":
        raise BundleError(f"{run_dir} is a stack bundle; stack the runs it was built from")
    checked = _check(run_dir)
    return [Path(CONFIG_FILE), *(Path(p) for p in _pieces(checked.section))]


def copy_bundle(run_dir: str | Path, dest: str | Path, pieces: Sequence[Path]) -> None:
    """Copy `pieces` of run_dir into dest (a new folder), hard-linking files where the
    filesystem allows (checkpoints are written once, so links are safe and cost no space);
    a copy holding config.json is then checked as load_bundle checks it (digests included)."""
    run_dir, dest = Path(run_dir), Path(dest)
    for piece in pieces:
        target = dest / piece
        target.parent.mkdir(parents=True, exist_ok=True)
        if (run_dir / piece).is_dir() and not (run_dir / piece).is_symlink():
            shutil.copytree(run_dir / piece, target, symlinks=True,
                            copy_function=_link_or_copy)
        else:
            _link_or_copy(run_dir / piece, target)
    if Path(CONFIG_FILE) in map(Path, pieces):
        _check(dest)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
