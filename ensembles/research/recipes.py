"""Published studies as recipes: a protocol as data, run through the API, set beside its figure.

A recipe is a TOML file (the ones shipped live in experiments/recipes/): the study's dataset,
settings shared by its runs, the runs (name, strategy, settings), the published figures
(run, metric, value, test-set size) and the protocol differences we know we cannot match.
Settings are `RunConfig` field names; they are layered

    recipe [settings] -> run settings -> the scale's preset (SCALES) -> recipe
    [scales.<scale>] -> run [scales.<scale>] -> the caller's overrides

so a protocol is data, never a code path. Scales: "full" is the published protocol on the
recipe's dataset; "cpu" is the same protocol at what a laptop CPU allows (64 px, 5 epochs);
"tiny" runs on the synthetic phantoms whatever the data folder, at 32 px for 1 epoch, with a
small custom CNN in place of each ImageNet architecture (reported), so that every recipe runs
in the test suite. Settings a recipe lists under [if_available] are applied
only when this version's RunConfig has the field, and reported as not applied otherwise.
ImageNet weights are never used at "tiny"; at "cpu" a missing weight file falls back to a
random initialisation, and "full" refuses to run without it; both are reported.

    recipe = load_recipe("experiments/recipes/resnet50-ova-ovo.toml")
    doc = reproduce(recipe, "tiny", out="runs/repro")   # runs + reproduction.md / .json
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

import backbones
from backbones.pretrained import KERAS
from ensembles.api import Ensemble
from ensembles.config import SECTIONS, ConfigError, RunConfig, make_config
from ensembles.training import build, runs

SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"dataset": "synthetic_cxr", "data_dir": None, "count": 120, "image_size": 32,
             "epochs": 1, "batch_size": 16, "n_bootstrap": 200, "pretrained": None},
    "cpu": {"image_size": 64, "epochs": 5, "batch_size": 16},
    "full": {},
}
# At tiny scale the ImageNet architectures (compiling and training one takes minutes on a CPU)
# are replaced by a small custom CNN, and every custom CNN has a quarter of its published
# channels (tops stay as published): all recipes together then run in minutes.
TINY_STAND_IN = "simple_cnn"
TINY_CUSTOM_CNN = {"width": 0.25}
FIELDS = {f.name for kind in SECTIONS.values() for f in dataclasses.fields(kind)}
# Settings whose change by a scale is not a protocol difference, or is reported on its own.
UNREPORTED = {"data_dir", "cache_dir", "progress", "backbone", "pretrained"}

PATIENT_CAVEAT = (
    "**Patient grouping.** Our splits are stratified and grouped by patient where the data "
    "names patients (manifest, DICOM PatientID, Kermany file names), so no patient is in two "
    "splits. A split by image puts one patient's images on both sides and inflates test "
    "figures; where a report does not say it grouped by patient, its figure and ours are not "
    "measured the same way.")
SOURCE_CAVEAT = (
    "**Source confounding.** In the public COVID-19 collections class goes with source and "
    "age: viral and bacterial pneumonia and most normals are pediatric images from one "
    "hospital (Kermany, Guangzhou), COVID images are adults from other hospitals. A model can "
    "score well by recognising a child or a scanner rather than a disease, in the report and "
    "here alike; cross-source evaluation (`experiments.evaluate` on another source) is the "
    "honest measure.")
TINY_NOTE = ("Scale `tiny` trains on the synthetic phantoms (`synthetic_cxr`, whatever the data "
             "folder) at toy sizes, with a small custom CNN in place of each ImageNet "
             "architecture: it checks that the protocol runs; its numbers say nothing about "
             "the study.")


@dataclasses.dataclass(frozen=True)
class Published:
    """One published figure: which run, which metric (a metrics.json key), value, test n."""

    run: str
    metric: str
    value: float
    test_size: int | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class RecipeRun:
    """One run of a recipe: its strategy, settings, and per-scale changes to them."""

    name: str
    strategy: str
    settings: dict[str, Any]
    scales: dict[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published study's protocol as data (see the module docstring for the TOML layout)."""

    name: str
    title: str
    dataset: str
    runs: tuple[RecipeRun, ...]
    settings: dict[str, Any]
    scales: dict[str, dict[str, Any]]
    if_available: dict[str, Any]
    published: tuple[Published, ...]
    differences: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """A recipe run resolved for one scale: its checked config, folder and what was not
    applied (each note one sentence)."""

    name: str
    config: RunConfig
    run_dir: Path
    not_applied: tuple[str, ...]


def _table(doc: dict, key: str, allowed: set[str], where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {key} must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{where}: [{key}] has unknown keys {unknown}")
    return value


def _settings(doc: dict, key: str, where: str, *, known: bool = True) -> dict[str, Any]:
    value = _table(doc, key, FIELDS if known else set(doc.get(key, {})), where)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def _scales(doc: dict, where: str) -> dict[str, dict[str, Any]]:
    scales = _table(doc, "scales", set(SCALES), where)
    return {s: _settings(scales, s, f"{where} scales") for s in scales}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe TOML file; ValueError (one line) for anything malformed."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: {error}") from None
    where = path.name
    top = {"name", "title", "dataset", "differences", "settings", "scales", "if_available",
           "runs", "published"}
    unknown = sorted(set(doc) - top)
    missing = [k for k in ("name", "title", "dataset", "runs") if k not in doc]
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    recipe_runs = []
    for i, run in enumerate(doc["runs"]):
        w = f"{where} run {run.get('name', i)!r}"
        unknown = sorted(set(run) - {"name", "strategy", "settings", "scales"})
        if unknown or "name" not in run or "strategy" not in run:
            raise ValueError(f"{w}: needs name and strategy (unknown keys {unknown})")
        recipe_runs.append(RecipeRun(run["name"], run["strategy"], _settings(run, "settings", w),
                                     _scales(run, w)))
    names = [r.name for r in recipe_runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: run names repeat: {names}")
    published = []
    for p in doc.get("published", []):
        try:
            published.append(Published(**p))
        except TypeError as error:
            raise ValueError(f"{where}: published entry {p}: {error}") from None
        if p["run"] not in names:
            raise ValueError(f"{where}: published figure for unknown run {p['run']!r}")
    return Recipe(doc["name"], doc["title"], doc["dataset"], tuple(recipe_runs),
                  _settings(doc, "settings", where), _scales(doc, where),
                  _settings(doc, "if_available", where, known=False), tuple(published),
                  tuple(doc.get("differences", ())))


def load_recipes(folder: str | Path) -> dict[str, Recipe]:
    """Every *.toml recipe in `folder`, by name."""
    recipes = [load_recipe(p) for p in sorted(Path(folder).glob("*.toml"))]
    return {r.name: r for r in recipes}


def run_settings(recipe: Recipe, run: RecipeRun, scale: str,
                 overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The settings of `run` at `scale` (the layering of the module docstring) and the notes
    on settings not applied or changed: the tiny stand-in, ImageNet weights at tiny scale,
    [if_available] fields this RunConfig lacks, and each setting that differs from the
    published protocol ("image_size=224: 64 at scale cpu", or "image_size=224: 32 (the
    caller's override) at scale cpu" for a setting in `overrides`)."""
    if scale not in SCALES:
        raise ConfigError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
    settings = {"dataset": recipe.dataset, **recipe.settings, **run.settings}
    wanted, backbone = settings.get("pretrained"), settings.get("backbone", "simple_cnn")
    settings.update(SCALES[scale])
    notes = []
    if scale == "tiny":
        if backbone in KERAS:
            settings["backbone"] = TINY_STAND_IN
            notes.append(f"backbone={backbone}: scale tiny trains {TINY_STAND_IN} in its place "
                         f"(scales cpu and full train {backbone})")
        if backbones.is_custom_cnn(settings.get("backbone", TINY_STAND_IN)):
            settings.update(TINY_CUSTOM_CNN)
    settings.update({**recipe.scales.get(scale, {}), **run.scales.get(scale, {}),
                     **(overrides or {})})
    if wanted and not settings.get("pretrained"):
        notes.append(f"pretrained={wanted}: scale {scale} never loads ImageNet weights; "
                     f"trained from a random initialisation")
    for key, value in recipe.if_available.items():
        if key in (overrides or {}):
            continue                                   # the caller's choice stands
        if key in FIELDS:
            settings[key] = value
        else:
            notes.append(f"{key}={value}: not available in this version")
    protocol = {"dataset": recipe.dataset, **recipe.settings, **run.settings,
                **recipe.if_available, **recipe.scales.get("full", {}),
                **run.scales.get("full", {})}
    by_caller = " (the caller's override)"
    notes += [f"{key}={protocol.get(key, 'default')}: {value}"
              f"{by_caller if key in (overrides or {}) else ''} at scale {scale}"
              for key, value in settings.items()
              if key not in UNREPORTED and protocol.get(key) != value]
    return settings, notes


def _weights_fallback(config: RunConfig) -> str | None:
    """None when the config's ImageNet weights are at hand (downloaded if needed), else why
    not (one line)."""
    try:
        build.check_weights(config)
    except OSError as error:
        return str(error)
    return None


def plan(recipe: Recipe, scale: str, out: str | Path, *, data_dir: str | None = None,
         overrides: dict[str, Any] | None = None,
         only: list[str] | None = None) -> list[PlannedRun]:
    """Every run of `recipe` (or the runs named in `only`) at `scale`, configs checked and
    run folders free, before anything trains. "cpu" and "full" need `data_dir`; at "cpu"
    missing ImageNet weights fall back to a random initialisation (noted); at "full" they are
    an error."""
    if scale != "tiny" and not data_dir:
        raise ConfigError(f"scale {scale} runs on the recipe's dataset ({recipe.dataset}): "
                          f"give its folder (--data-dir)")
    names = [r.name for r in recipe.runs]
    unknown = sorted(set(only or ()) - set(names))
    if unknown or (only is not None and not only):
        raise ConfigError(f"runs {unknown} are not in recipe {recipe.name}; it has "
                          f"{', '.join(names)}")
    planned = []
    for run in recipe.runs:
        if only is not None and run.name not in only:
            continue
        settings, notes = run_settings(recipe, run, scale, overrides)
        if scale != "tiny":
            settings["data_dir"] = data_dir
        config = make_config(run.strategy, **settings)
        if config.model.pretrained:
            reason = _weights_fallback(config)
            if reason and scale == "full":
                raise ConfigError(f"run {run.name}: the published protocol needs "
                                  f"{config.model.backbone}'s ImageNet weights: {reason}")
            if reason:
                config = make_config(run.strategy, **{**settings, "pretrained": None})
                notes.append(f"pretrained={settings['pretrained']}: weights not available "
                             f"({reason}); trained from a random initialisation")
        wanted = {**recipe.settings, **run.settings}.get("pretrained")
        if wanted and not config.model.pretrained and config.model.freeze != "full":
            notes.append(f"freeze={config.model.freeze} on random weights: the frozen layers "
                         f"are random features, so this run says nothing about transfer")
        run_dir = Path(out) / run.name
        runs.check_run_dir(run_dir, config, resume=False, overwrite=False)
        planned.append(PlannedRun(run.name, config, run_dir, tuple(notes)))
    return planned


def reproduce(recipe: Recipe, scale: str, out: str | Path, *, data_dir: str | None = None,
              overrides: dict[str, Any] | None = None, only: list[str] | None = None) -> dict:
    """Train every run of `recipe` (or those in `only`) at `scale` into out/<run>/ and write
    out/reproduction.md and out/reproduction.json (the returned document: recipe, scale,
    runs with metrics, the runs left out)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty")
    planned = plan(recipe, scale, out, data_dir=data_dir, overrides=overrides, only=only)
    results = []
    for p in planned:
        ens = Ensemble(config=p.config).fit(out=p.run_dir)
        results.append({"name": p.name, "run_dir": str(p.run_dir),
                        "strategy": p.config.ensemble.strategy,
                        "backbone": p.config.model.backbone, "not_applied": list(p.not_applied),
                        "config": p.config.to_dict(), "metrics": ens.metrics_})
    doc = {"recipe": recipe.name, "title": recipe.title, "scale": scale,
           "dataset": planned[0].config.data.dataset,
           "data_dir": data_dir if scale != "tiny" else None,
           "published": [dataclasses.asdict(p) for p in recipe.published],
           "differences": list(recipe.differences), "runs": results,
           "left_out": [r.name for r in recipe.runs if r.name not in {p.name for p in planned}]}
    runs.write_json_atomic(out / "reproduction.json", doc)
    (out / "reproduction.md").write_text(markdown(doc))
    return doc


def never_predicted(metrics: dict) -> list[str]:
    """The classes no test example was predicted as (confusion-matrix columns summing to 0)."""
    cm = np.asarray(metrics["confusion_matrix"])
    return [c for c, n in zip(metrics["class_names"], cm.sum(axis=0), strict=True) if n == 0]


def value_text(metrics: dict, name: str) -> str:
    ci = (metrics.get("ci95") or {}).get(name)
    value = metrics.get(name)
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def published_text(p: Published | None) -> str:
    """"accuracy 0.946 (129 test images)", or what is missing."""
    if p is None:
        return "not recorded"
    size = f"{p.test_size} test images" if p.test_size else "test-set size not recorded"
    return f"{p.metric} {p.value:.3f} ({size}){f'; {p.note}' if p.note else ''}"


def markdown(doc: dict) -> str:
    """reproduction.md: published figures beside ours with 95% CIs, the protocol
    differences, the settings not applied, the caveats."""
    published = {p["run"]: Published(**p) for p in doc["published"]}
    lines = [f"# Reproduction: {doc['title']}", "",
             f"Recipe `{doc['recipe']}` at scale `{doc['scale']}` on `{doc['dataset']}`"
             + (f" (`{doc['data_dir']}`)." if doc["data_dir"] else "."), ""]
    if doc["scale"] == "tiny":
        lines += [TINY_NOTE, ""]
    lines += ["## Published figures and ours", "",
              "Ours: the test split, 95% bootstrap CIs resampling patients.", "",
              "| run | strategy | backbone | published | ours, same metric | ours, macro-F1 | "
              "test images | classes never predicted |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        m, p = r["metrics"], published.get(r["name"])
        never = never_predicted(m)
        lines.append(f"| {r['name']} | {r['strategy']} | {r['backbone']} | {published_text(p)} "
                     f"| {value_text(m, p.metric) if p else 'n/a'} | {value_text(m, 'macro_f1')} | "
                     f"{int(np.sum(m['confusion_matrix']))} | "
                     f"{', '.join(never) if never else 'none'} |")
    lines += ["", "## Protocol differences we could not match", ""]
    lines += [f"- {d}" for d in doc["differences"]] or ["- none recorded"]
    lines += ["", "## Settings not applied, or changed by the scale, in this reproduction", ""]
    notes = [f"- {r['name']}: {n}" for r in doc["runs"] for n in r["not_applied"]]
    lines += notes or ["- none: every setting of the recipe was applied"]
    lines += ["", "## Caveats", "", f"- {PATIENT_CAVEAT}", f"- {SOURCE_CAVEAT}", "",
              "## Runs", ""]
    lines += [f"- {r['name']}: `{r['run_dir']}` (config.json, metrics.json, report.md)"
              for r in doc["runs"]]
    if doc["left_out"]:
        lines.append(f"- not run this time: {', '.join(doc['left_out'])}")
    return "\n".join(lines) + "\n"


def summary(recipe: Recipe) -> str:
    """One line per recipe for --list: name, title, published figures."""
    figures = "; ".join(f"{p.run} {published_text(p)}" for p in recipe.published)
    return (f"{recipe.name}: {recipe.title}. Published: "
            f"{figures or 'figures not recorded yet'}; runs: "
            f"{', '.join(r.name for r in recipe.runs)}")
