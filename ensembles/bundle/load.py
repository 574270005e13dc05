"""Reading and checking a bundle: schema, paths, digests and shapes first, weights last."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import backbones
from data_pipeline import leakage
from data_pipeline.preprocess import PreprocessConfig
from ensembles.bundle.integrity import (
    CONFIG_FILE,
    inside,
    piece_files,
    pieces_of,
    verify,
)
from ensembles.bundle.runtime import Bundle, StackBundle
from ensembles.bundle.schema import (
    COMBINER_SCHEMA,
    ENSEMBLE_SCHEMA,
    FORMAT_VERSION,
    MANIFEST_KEY,
    STACK_SCHEMA,
    BundleError,
    first_line,
    shown,
    validate,
)
from ensembles.bundle.segmenter import load_segmenter
from ensembles.combine.groups import MemberGroup
from ensembles.combine.meta import FILE_NAMES as META_FILE_NAMES
from ensembles.combine.meta import MetaClassifier
from ensembles.combine.rules import combiner_from_json
from ensembles.combine.tasks import Tasks, make_tasks
from ensembles.config import STRATEGIES, RunConfig, parse_operating_point


def _model_options(model: dict) -> dict:
    options = {"head": model.get("head", "linear")}
    if model.get("width") is not None:
        options["width"] = model["width"]
    return options



def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise BundleError(f"{path} is not a valid {what} ({reason})") from None
    except OSError as error:
        raise BundleError(f"{path}: cannot read ({error.strerror})") from None


def read_config(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise BundleError(f"run directory {run_dir} does not exist")
    path = run_dir / CONFIG_FILE
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link: a bundle holds its own files")
    if not path.is_file():
        raise BundleError(f"{run_dir} is not a complete run: config.json is missing")
    config = _read_json(path, "JSON file")
    if not isinstance(config, dict):
        raise BundleError(f"{path} must hold a JSON object, found {shown(config)}")
    return config


def section_of(run_dir: Path, config: dict) -> dict | None:
    """The schema-checked "bundle" entry of config.json (None for a run that did not finish)."""
    path = run_dir / CONFIG_FILE
    section = config.get("bundle")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise BundleError(f"{path}: bundle must be a JSON object, found {shown(section)}")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{run_dir} has bundle format version {version!r}; this code reads "
                          f"version {FORMAT_VERSION}")
    if section.get("kind") not in ("ensemble", "stack"):
        raise BundleError(f"{run_dir} has unknown bundle kind {section.get('kind')!r}")
    if MANIFEST_KEY not in section:
        raise BundleError(f"{path}: bundle.{MANIFEST_KEY} (the SHA-256 manifest of the "
                          f"bundle's files) is missing: the run predates digests or was edited")
    validate(section, STACK_SCHEMA if section["kind"] == "stack" else ENSEMBLE_SCHEMA,
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
    pieces = pieces_of(section)
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


def check(run_dir: Path) -> _Checked:
    """Everything but restoring the weights: schema, paths, pieces present, digests, and that
    the checkpoints, combiner and meta file fit the bundle section."""
    config = read_config(run_dir)
    section = section_of(run_dir, config)
    if section is None:
        raise BundleError(f"{run_dir} is not a finished run: its config.json has no bundle "
                          f"section (training did not end, or it predates bundles)")
    if section["kind"] == "stack":
        return _check_stack(run_dir, section)
    return _check_ensemble(run_dir, config, section)


def _file_piece(run_dir: Path, rel: str, where: str) -> Path:
    path = inside(run_dir, rel, where)
    if not path.is_file():
        raise BundleError(f"incomplete run: {path} is missing")
    return path


def _check_ensemble(run_dir: Path, config: dict, section: dict) -> _Checked:
    path = run_dir / CONFIG_FILE
    checkpoints = []
    for i, entry in enumerate(section["stacks"]):
        ckpt = inside(run_dir, entry["path"], f"bundle.stacks[{i}].path")
        if not ckpt.is_dir():
            raise BundleError(f"incomplete run: member checkpoint {ckpt} is missing")
        if not piece_files(run_dir, entry["path"]):
            raise BundleError(f"incomplete run: member checkpoint {ckpt} is empty")
        checkpoints.append(ckpt)
    combiner_path = _file_piece(run_dir, section["combiner"], "bundle.combiner")
    meta_path = (_file_piece(run_dir, section["meta"], "bundle.meta") if section.get("meta")
                 else None)
    hashes_path = (_file_piece(run_dir, section["train_hashes"], "bundle.train_hashes")
                   if section.get("train_hashes") else None)
    verify(run_dir, section)

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
        raise BundleError(f"{path}: bundle.preprocess is invalid ({first_line(error)})") from None
    tasks = _tasks(path, section)
    stacks = _stacks(path, section, tasks)
    options = _model_options(section["model"])
    expected = [_checkpoint_fits(ckpt, path, backbone, options, preprocess, stack)
                for ckpt, stack in zip(checkpoints, stacks, strict=True)]
    doc = _read_json(combiner_path, "combiner file")
    validate(doc, COMBINER_SCHEMA, "the combiner", combiner_path)
    try:
        combiner = combiner_from_json(tasks, doc["rule"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"{combiner_path}: not a combiner of these tasks "
                          f"({first_line(error)})") from None
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
        return Bundle(run_dir=run_dir, backbone=backbone, class_names=class_names,
                      preprocess=preprocess, tasks=tasks, groups=stacks, variables=variables,
                      combiner=combiner, meta=meta, temperature=doc.get("temperature"),
                      kind="ensemble", model_options=options,
                      operating_point=point.get("target"),
                      thresholds=point.get("thresholds"), hashes_file=hashes_path,
                      segmenter=segmenter)

    return _Checked(run_dir, section, load)


def _segmenter(path: Path, section: dict, preprocess: PreprocessConfig):
    """The segmenter a lung_mask auto run recorded, loaded and checked against its digest."""
    ref = section.get("segmenter")
    if ref is None:
        return None
    if not preprocess.lung_mask:
        raise BundleError(f"{path}: bundle.segmenter is set but preprocess.lung_mask is off")
    try:
        return load_segmenter(ref["path"], ref["sha256"])
    except BundleError as error:
        raise BundleError(f"{path}: its lung masks come from a segmenter that cannot be used: "
                          f"{first_line(error)}") from None


def _operating_point_fits(point: dict | None, path: Path, k: int) -> None:
    """The saved operating point names a known target and one threshold per class."""
    if point is None:
        return
    try:
        parse_operating_point(point["target"])
    except ValueError as error:
        raise BundleError(f"{path}: operating_point: {first_line(error)}") from None
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
        raise BundleError(f"{path}: bundle.tasks: {first_line(error)}") from None
    mine = {"names": list(tasks.names), "num_classes": list(tasks.num_classes),
            "table": tasks.table.tolist(), "healthy": tasks.healthy}
    for key, value in mine.items():
        if t[key] != value:
            raise BundleError(f"{path}: bundle.tasks.{key} differs from the "
                              f"{section['strategy']} tasks over bundle.class_names")
    return tasks


def _stacks(path: Path, section: dict, tasks: Tasks) -> list[MemberGroup]:
    """The member groups (bundle.stacks in config.json): each member once, with its class count."""
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
        stacks.append(MemberGroup(tuple(idx), c, tasks.table[idx], np.ones((len(idx), c),
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
                     preprocess: PreprocessConfig, stack: MemberGroup) -> dict:
    """The checkpoint's arrays (from its metadata) are those of the bundle's model; returns
    {name: (shape, dtype)} with the member axis first."""
    what = (f"{backbone} {options}, {preprocess.image_size} px, {preprocess.channels} "
            f"channel(s), {stack.num_classes} classes, {len(stack.members)} member(s)")
    try:
        one = _model_shapes(backbone, tuple(sorted(options.items())), stack.num_classes,
                            preprocess.image_size, preprocess.channels)
    except (TypeError, ValueError) as error:
        raise BundleError(f"{path}: cannot build the bundle's model ({what}): "
                          f"{first_line(error)}") from None
    expected = {k: ((len(stack.members), *shape), dtype) for k, (shape, dtype) in one.items()}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(ckpt.absolute())
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
        if not isinstance(tree, Mapping) or not isinstance(tree.get("params"), Mapping):
            raise ValueError("its metadata describes no params")
        saved = _flat({"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}})
    except Exception as error:  # noqa: BLE001 - orbax parsing untrusted files: any failure
        raise BundleError(f"{ckpt}: not a readable member checkpoint ({first_line(error)})") from None
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
                          f"({first_line(error)})") from None
    if restored != expected:
        raise BundleError(f"{path}: the restored arrays differ from the checkpoint's metadata")
    return variables


def _load_meta(path: Path) -> MetaClassifier:
    try:
        return MetaClassifier.load(path)
    except ValueError as error:
        raise BundleError(first_line(error)) from None


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
        raise BundleError(f"{path}: the run config is invalid ({first_line(error)})") from None
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
        folder = inside(run_dir, c["path"], f"bundle.components[{i}].path")
        config = read_config(folder)
        inner = section_of(folder, config)
        if inner is None or inner["kind"] != "ensemble":
            raise BundleError(f"{folder} is not a finished ensemble run: a stack's components "
                              f"are ensemble bundles")
        component = _check_ensemble(folder, config, inner)
        if tuple(inner["class_names"]) != class_names:
            raise BundleError(f"{run_dir}: component {c['name']} has classes "
                              f"{inner['class_names']}, the stack {list(class_names)}")
        components.append(component)
    meta_path = _file_piece(run_dir, section["meta"], "bundle.meta")
    verify(run_dir, section)
    meta = _load_meta(meta_path)
    layout = [{"block": n, "member": m, "columns": int(c)}
              for n, component in zip(names, components, strict=True)
              for m, c in enumerate(component.section["tasks"]["num_classes"])]
    _meta_fits(meta, meta_path, layout, len(class_names), "the components' members")

    def load() -> StackBundle:
        return StackBundle(run_dir=run_dir, class_names=class_names, names=names,
                           components=[c.load() for c in components], meta=meta)

    return _Checked(run_dir, section, load)


def load_bundle(run_dir: str | Path) -> Bundle | StackBundle:
    """Load an ensemble (single included) or stack run, after checking its schema, paths,
    digests and shapes; BundleError (one line, naming the file) if incomplete, foreign or
    changed since it was saved."""
    return check(Path(run_dir)).load()

