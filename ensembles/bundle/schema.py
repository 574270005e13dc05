"""The schema of config.json's "bundle" section: a small JSON type language, checked on load
with one-line errors that name the file and the key."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_pipeline.preprocess import PreprocessConfig

FORMAT_VERSION = 1
MANIFEST_KEY = "files"      # in the "bundle" section: {file of a piece: its SHA-256 digest}


class BundleError(ValueError):
    """A run directory that cannot be loaded (missing pieces, other format version, a file
    changed since it was saved, a config that fails the schema); one line naming the file."""


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


def shown(value) -> str:
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
    text = json.dumps(value, default=str)
    return kind if len(text) > 40 else f"{kind} ({text})"


def _conforms(value, spec) -> bool:
    try:
        validate(value, spec, "", Path())
    except BundleError:
        return False
    return True


def validate(value, spec, where: str, path: Path) -> None:
    """BundleError naming `path` and the key `where` unless `value` matches `spec`."""
    if isinstance(spec, tuple):
        if not any(_conforms(value, s) for s in spec):
            raise BundleError(f"{path}: {where} must be {_describe(spec)}, found {shown(value)}")
    elif isinstance(spec, _Type):
        if not spec.test(value):
            raise BundleError(f"{path}: {where} must be {spec.name}, found {shown(value)}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise BundleError(f"{path}: {where} must be {_describe(spec)}, found {shown(value)}")
        for i, item in enumerate(value):
            validate(item, spec[0], f"{where}[{i}]", path)
    elif isinstance(spec, _Map):
        if not isinstance(value, dict):
            raise BundleError(f"{path}: {where} must be a JSON object, found {shown(value)}")
        for key, item in value.items():
            validate(item, spec.values, f"{where}[{key!r}]", path)
    else:
        if not isinstance(value, dict):
            raise BundleError(f"{path}: {where} must be a JSON object, found {shown(value)}")
        keys = {k.removesuffix("?"): k for k in spec}
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise BundleError(f"{path}: {where} has unknown key {unknown[0]!r} (known: "
                              f"{', '.join(keys)})")
        for key, raw in keys.items():
            if key in value:
                validate(value[key], spec[raw], f"{where}.{key}", path)
            elif not raw.endswith("?"):
                raise BundleError(f"{path}: {where}.{key} is missing")


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (BundleErrors are one line)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

