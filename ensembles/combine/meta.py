"""The meta-classifier (stacking): a scikit-learn estimator over concatenated member outputs.

Stacking only generalises when the meta-classifier sees predictions on examples the members
never trained on (out-of-fold or validation predictions); `fit` therefore takes the example
index of every row and the members' training indices, and raises if any row was a training
example.

Nothing is saved as a pickle. The logistic model is saved as readable JSON (coefficients,
intercepts, classes, feature layout). Gradient boosting has no parameter form that small, so
it is saved with skops (a zip of JSON and .npy arrays that loads without executing code); on
load every type skops does not trust by default must be on `GBOOST_TRUSTED_TYPES`, the types
a fitted HistGradientBoostingClassifier needs, or the file is refused.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

FORMAT = "cxr-ensembles/meta-logistic-v1"
GBOOST_FORMAT = "cxr-ensembles/meta-gboost-v1"
MODELS = ("logistic", "gradient_boosting")
FILE_NAMES = {"logistic": "meta.json", "gradient_boosting": "meta.skops"}
# Beyond skops' default-trusted types (builtins, numpy arrays and dtypes, scikit-learn
# estimators such as HistGradientBoostingClassifier and its bin mapper), a fitted
# HistGradientBoostingClassifier holds only its trees' predictors.
GBOOST_TRUSTED_TYPES = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


def make_features(blocks: Mapping[str, object]) -> tuple[np.ndarray, list[dict]]:
    """Concatenate named blocks of outputs into features [N, F] and their column layout.

    Each block is a [N, C] array (e.g. a single model's probabilities or logits), a [N, M, C]
    array, or a sequence of per-member [N, C_m] arrays (e.g. "ova/resnet50" member outputs).
    The layout lists {"block", "member", "columns"} in column order, so a saved model can check
    that prediction-time features are built the same way.
    """
    columns, layout, n = [], [], None
    for name, block in blocks.items():
        if isinstance(block, np.ndarray) and block.ndim == 2:
            parts = [block]
        elif isinstance(block, np.ndarray) and block.ndim == 3:
            parts = [block[:, m] for m in range(block.shape[1])]
        else:
            parts = [np.asarray(b) for b in block]
        for m, part in enumerate(parts):
            if part.ndim != 2:
                raise ValueError(f"block {name!r} member {m}: expected [N, C], got {part.shape}")
            if n is not None and len(part) != n:
                raise ValueError(f"block {name!r} has {len(part)} rows, earlier blocks {n}")
            n = len(part)
            columns.append(part.astype(np.float64))
            layout.append({"block": str(name), "member": m, "columns": int(part.shape[1])})
    if not columns:
        raise ValueError("no feature blocks given")
    x = np.concatenate(columns, axis=1)
    if not np.all(np.isfinite(x)):
        raise ValueError("meta-classifier features contain NaN or inf")
    return x, layout


def check_no_leakage(example_indices, train_indices, fold=None) -> None:
    """Raise ValueError if a row's example was in the training set of the model that predicted it.

    `train_indices` is one index array (members trained once; rows are validation predictions)
    or, with `fold` [N], one array per fold (row i was predicted by the model of fold[i], as in
    out-of-fold predictions).
    """
    idx = np.asarray(example_indices)
    if idx.ndim != 1 or len(np.unique(idx)) != len(idx):
        raise ValueError("example_indices must be a 1-D array of distinct example ids")
    if fold is None:
        sets, fold = [np.asarray(train_indices)], np.zeros(len(idx), dtype=int)
    else:
        sets, fold = [np.asarray(t) for t in train_indices], np.asarray(fold)
        if fold.shape != idx.shape or fold.min() < 0 or fold.max() >= len(sets):
            raise ValueError(f"fold must be [N] with values in [0, {len(sets)})")
    leaked = np.concatenate([idx[(fold == f) & np.isin(idx, s)] for f, s in enumerate(sets)])
    if len(leaked):
        raise ValueError(
            f"leakage: {len(leaked)} of {len(idx)} meta-classifier examples were member-training "
            f"examples (ids {sorted(leaked.tolist())[:5]}...); fit on out-of-fold or validation "
            f"predictions")


class MetaClassifier(ClassifierMixin, BaseEstimator):
    """Stacking meta-classifier: LogisticRegression (default) or HistGradientBoostingClassifier.

    fit(x, y, example_indices=..., train_indices=...) refuses member-training predictions;
    `layout` (from make_features) is kept and checked by `features`.
    """

    def __init__(self, model: str = "logistic", C: float = 1.0, max_iter: int = 2000,
                 random_state: int = 0):
        self.model = model
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _new_estimator(self):
        if self.model == "logistic":
            return LogisticRegression(C=self.C, max_iter=self.max_iter)
        if self.model == "gradient_boosting":
            return HistGradientBoostingClassifier(max_iter=min(self.max_iter, 200),
                                                  random_state=self.random_state)
        raise ValueError(f"unknown meta model {self.model!r}; choose from {', '.join(MODELS)}")

    def fit(self, x, y, *, example_indices, train_indices, fold=None,
            layout: Sequence[dict] | None = None, n_classes: int | None = None) -> MetaClassifier:
        """Fit on held-out member outputs x [N, F] with labels y [N] (all n_classes present)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        if x.ndim != 2 or y.shape != (len(x),):
            raise ValueError(f"need features [N, F] and labels [N]; got {x.shape} and {y.shape}")
        if len(np.asarray(example_indices)) != len(x):
            raise ValueError(f"example_indices has {len(np.asarray(example_indices))} ids for "
                             f"{len(x)} rows")
        check_no_leakage(example_indices, train_indices, fold)
        k = int(y.max()) + 1 if n_classes is None else n_classes
        missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
        if missing:
            raise ValueError(f"meta-classifier training labels lack class(es) {missing}")
        if layout is not None and sum(b["columns"] for b in layout) != x.shape[1]:
            raise ValueError(f"layout describes {sum(b['columns'] for b in layout)} columns, "
                             f"features have {x.shape[1]}")
        self.estimator_ = self._new_estimator().fit(x, y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = x.shape[1]
        self.layout_ = list(layout) if layout is not None else None
        return self

    def features(self, blocks: Mapping[str, object]) -> np.ndarray:
        """make_features(blocks), checked against the layout the model was fitted with."""
        x, layout = make_features(blocks)
        if self.layout_ is not None and layout != self.layout_:
            raise ValueError(f"feature layout differs from the fitted one:\n{layout}\nvs\n"
                             f"{self.layout_}")
        return x

    def predict_proba(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ValueError(f"expected features [N, {self.n_features_in_}], got {x.shape}")
        return self.estimator_.predict_proba(x)

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(axis=1)]

    @property
    def file_name(self) -> str:
        """The conventional file name `save` writes this model's format to."""
        return FILE_NAMES[self.model]

    def save(self, path) -> Path:
        """Write the fitted model: logistic as JSON (coef_, intercept_, classes_, layout),
        gradient boosting as a skops file (the estimator with params and layout)."""
        path = Path(path)
        if self.model == "gradient_boosting":
            sio.dump({"format": GBOOST_FORMAT, "params": self.get_params(),
                      "n_features": int(self.n_features_in_), "layout": self.layout_,
                      "estimator": self.estimator_}, path)
            return path
        est = self.estimator_
        doc = {"format": FORMAT, "params": self.get_params(),
               "classes": est.classes_.tolist(), "coef": est.coef_.tolist(),
               "intercept": est.intercept_.tolist(), "n_features": int(self.n_features_in_),
               "layout": self.layout_}
        path.write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path) -> MetaClassifier:
        """Rebuild a saved meta-classifier (JSON or skops file); predictions are identical.

        A skops file holding any type outside the allowlist, or anything but a gradient-
        boosting meta-classifier, raises ValueError before an object is built from it. Every
        malformed document (a missing or unknown key, an unknown parameter, arrays of the
        wrong shape) raises a one-line ValueError naming the file."""
        path = Path(path)
        if zipfile.is_zipfile(path):
            return cls._load_skops(path)
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: neither a JSON nor a skops meta-classifier file") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else None
            raise ValueError(f"{path}: not a saved meta-classifier (format {found!r}, "
                             f"expected {FORMAT!r})")
        _check_keys(path, doc, ("format", "params", "classes", "coef", "intercept",
                                "n_features", "layout"))
        meta = cls._from_params(path, doc, "logistic")
        est = meta._new_estimator()
        try:
            est.classes_ = np.asarray(doc["classes"])
            est.coef_ = np.asarray(doc["coef"], dtype=np.float64)
            est.intercept_ = np.asarray(doc["intercept"], dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: classes, coef and intercept must be numeric arrays "
                             f"({str(error).splitlines()[0]})") from None
        est.n_features_in_ = doc["n_features"]
        rows = 1 if len(est.classes_) == 2 else len(est.classes_)
        if (est.classes_.ndim != 1 or len(est.classes_) < 2
                or not np.issubdtype(est.classes_.dtype, np.integer)
                or est.coef_.shape != (rows, est.n_features_in_)
                or est.intercept_.shape != (rows,)):
            raise ValueError(f"{path}: coef {list(est.coef_.shape)} and intercept "
                             f"{list(est.intercept_.shape)} do not fit {len(est.classes_)} "
                             f"classes and {est.n_features_in_} features")
        meta.estimator_, meta.classes_ = est, est.classes_
        meta.n_features_in_, meta.layout_ = est.n_features_in_, doc["layout"]
        return meta

    @classmethod
    def _from_params(cls, path: Path, doc: dict, model: str) -> MetaClassifier:
        """A MetaClassifier of the saved params: each known, of its type, for `model`; and
        a layout that describes the saved n_features."""
        params = doc["params"]
        if not isinstance(params, dict):
            raise ValueError(f"{path}: the saved meta-classifier's params must be a mapping")
        known = cls().get_params()
        unknown = sorted(set(params) - set(known), key=str)
        if unknown:
            raise ValueError(f"{path}: unknown meta-classifier parameter(s) "
                             f"{', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        if params.get("model") != model:
            raise ValueError(f"{path}: params.model is {params.get('model')!r}, expected "
                             f"{model!r}")
        for name, ok in (("C", _is_number), ("max_iter", _is_int),
                         ("random_state", lambda v: v is None or _is_int(v))):
            if name in params and not ok(params[name]):
                raise ValueError(f"{path}: params.{name} is {params[name]!r}, not a valid value")
        n = doc["n_features"]
        if not _is_int(n) or n < 1:
            raise ValueError(f"{path}: n_features must be a positive integer, found {n!r}")
        layout = doc["layout"]
        if layout is not None:
            entry = {"block": str, "member": int, "columns": int}
            if (not isinstance(layout, list) or not all(
                    isinstance(b, dict) and set(b) == set(entry)
                    and all(isinstance(b[k], t) and not isinstance(b[k], bool)
                            for k, t in entry.items()) for b in layout)
                    or sum(b["columns"] for b in layout) != n):
                raise ValueError(f"{path}: layout must list {{block, member, columns}} entries "
                                 f"whose columns add up to n_features ({n})")
        return cls(**params)

    @classmethod
    def _load_skops(cls, path: Path) -> MetaClassifier:
        try:
            with zipfile.ZipFile(path) as archive:
                has_schema = "schema.json" in archive.namelist()
        except (OSError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path}: not a readable skops file ({error})") from None
        if not has_schema:
            raise ValueError(f"{path}: not a skops file: its schema.json is missing")
        try:
            untrusted = sio.get_untrusted_types(file=path)
        except Exception as error:  # noqa: BLE001 - skops parsing an untrusted file
            raise ValueError(f"{path}: not a readable skops file "
                             f"({type(error).__name__}: {_first_line(error)})") from None
        unexpected = sorted(set(untrusted) - set(GBOOST_TRUSTED_TYPES))
        if unexpected:
            raise ValueError(f"{path}: refusing to load types outside the gradient-boosting "
                             f"meta-classifier allowlist: {', '.join(unexpected)}")
        try:
            doc = sio.load(path, trusted=untrusted)
        except Exception as error:  # noqa: BLE001 - skops building allowlisted types only
            raise ValueError(f"{path}: not a readable skops file "
                             f"({type(error).__name__}: {_first_line(error)})") from None
        if not isinstance(doc, dict) or doc.get("format") != GBOOST_FORMAT:
            raise ValueError(f"{path}: not a saved gradient-boosting meta-classifier (expected "
                             f"a {GBOOST_FORMAT!r} document)")
        _check_keys(path, doc, ("format", "params", "n_features", "layout", "estimator"))
        est = doc["estimator"]
        if not isinstance(est, HistGradientBoostingClassifier):
            raise ValueError(f"{path}: holds a {type(est).__name__}, expected a "
                             f"HistGradientBoostingClassifier")
        meta = cls._from_params(path, doc, "gradient_boosting")
        if getattr(est, "n_features_in_", None) != doc["n_features"]:
            raise ValueError(f"{path}: estimator has {getattr(est, 'n_features_in_', None)} "
                             f"features, n_features {doc['n_features']}")
        meta.estimator_, meta.classes_ = est, est.classes_
        meta.n_features_in_, meta.layout_ = est.n_features_in_, doc["layout"]
        return meta


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or isinstance(v, float | np.floating)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _check_keys(path: Path, doc: dict, keys: Sequence[str]) -> None:
    """The saved document has exactly `keys`; ValueError naming the first missing or extra."""
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ValueError(f"{path}: the saved meta-classifier has no {missing[0]!r}")
    extra = sorted(set(doc) - set(keys), key=str)
    if extra:
        raise ValueError(f"{path}: the saved meta-classifier has an unknown entry "
                         f"{extra[0]!r}")
