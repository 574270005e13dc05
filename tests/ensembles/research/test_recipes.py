"""experiments.reproduce: the recipes load, their settings layer per scale as documented,
weights and unavailable settings are reported (never silently dropped), and every recipe runs
at tiny scale with reproduction.md holding the published figure, our metrics.json figures
with CIs, the differences and the caveats."""

from __future__ import annotations

import json
import re

import pytest

from backbones.pretrained import KERAS
from ensembles import RunConfig
from ensembles.research import recipes as rep
from experiments import reproduce as cli

RECIPES = rep.load_recipes(cli.RECIPES)


def _recipe(tmp_path, text: str) -> rep.Recipe:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return rep.load_recipe(path)


MINIMAL = """
name = "t"
title = "T"
dataset = "covid19_radiography"
differences = ["one"]
[settings]
image_size = 128
epochs = 30
[if_available]
clahe = true
no_such_field = 0.1
[[runs]]
name = "a"
strategy = "single"
[runs.settings]
backbone = "simple_cnn"
[[runs]]
name = "b"
strategy = "single"
[runs.settings]
backbone = "resnet50"
pretrained = "imagenet"
freeze = "head"
image_size = 224
[runs.scales.tiny]
image_size = 40
[runs.scales.cpu]
image_size = 72
[[published]]
run = "b"
metric = "accuracy"
value = 0.9
test_size = 50
"""


def test_shipped_recipes():
    assert set(RECIPES) == {"custom-cnns-resnet50", "transfer-vgg-xception-densenet",
                            "cnn-bn-clahe-vgg19", "cnn16-masked-brisque", "resnet50-ova-ovo"}
    transfer = RECIPES["transfer-vgg-xception-densenet"]
    assert [(p.run, p.value, p.test_size) for p in transfer.published] == [
        ("vgg16", 0.946, 129), ("xception", 0.954, 129), ("densenet121", 0.985, 129)]
    assert transfer.settings["split_recipe"] == "80/20-70/30"
    assert transfer.settings["balance"] == "downsample"
    assert transfer.settings["classes"] == ("covid", "normal", "viral_pneumonia")
    assert [r.strategy for r in RECIPES["resnet50-ova-ovo"].runs] == ["single", "ova", "ovo"]
    masked = RECIPES["cnn16-masked-brisque"]
    assert masked.if_available == {"lung_mask": "dataset", "quality_drop_worst": 0.05}
    # both fields exist now: applied, and a segmenter given by the caller wins over "dataset"
    settings, notes = rep.run_settings(masked, masked.runs[0], "cpu")
    assert settings["lung_mask"] == "dataset" and settings["quality_drop_worst"] == 0.05
    assert not any("not available" in n for n in notes)
    settings, _ = rep.run_settings(masked, masked.runs[0], "cpu",
                                   {"lung_mask": "auto", "segmenter": "runs/seg"})
    assert (settings["lung_mask"], settings["segmenter"]) == ("auto", "runs/seg")


def test_list(capsys):
    assert cli.main(["--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted(RECIPES)
    transfer = next(line for line in lines if line.startswith("transfer-"))
    assert "xception accuracy 0.954 (129 test images)" in transfer
    assert "resnet50 accuracy 0.857 (test-set size not recorded)" in next(
        line for line in lines if line.startswith("cnn16-"))


def test_layering_and_notes(tmp_path):
    recipe = _recipe(tmp_path, MINIMAL)
    a, b = recipe.runs
    full, notes = rep.run_settings(recipe, b, "full")
    assert (full["image_size"], full["epochs"], full["pretrained"], full["dataset"]) == (
        224, 30, "imagenet", "covid19_radiography")
    assert full["clahe"] is True                           # a RunConfig field: applied
    assert notes == ["no_such_field=0.1: not available in this version"]
    tiny, notes = rep.run_settings(recipe, b, "tiny")
    assert (tiny["image_size"], tiny["epochs"], tiny["dataset"], tiny["pretrained"],
            tiny["backbone"], tiny["width"]) == (40, 1, "synthetic_cxr", None, "simple_cnn", 0.25)
    assert notes[:2] == ["backbone=resnet50: scale tiny trains simple_cnn in its place (scales "
                         "cpu and full train resnet50)",
                         "pretrained=imagenet: scale tiny never loads ImageNet weights; trained "
                         "from a random initialisation"]
    cpu, notes = rep.run_settings(recipe, b, "cpu")
    assert (cpu["image_size"], cpu["epochs"], cpu["backbone"], "width" in cpu) == (
        72, 5, "resnet50", False)
    assert notes == ["no_such_field=0.1: not available in this version",
                     "image_size=224: 72 at scale cpu", "epochs=30: 5 at scale cpu",
                     "batch_size=default: 16 at scale cpu"]
    _, notes = rep.run_settings(recipe, b, "cpu", {"image_size": 32})
    assert notes[1:3] == ["image_size=224: 32 (the caller's override) at scale cpu",
                          "epochs=30: 5 at scale cpu"]
    tiny_a, _ = rep.run_settings(recipe, a, "tiny", {"epochs": 2})
    assert (tiny_a["image_size"], tiny_a["width"], tiny_a["epochs"]) == (32, 0.25, 2)
    other, _ = rep.run_settings(recipe, rep.RecipeRun("c", "single", {"backbone": "resnet18"},
                                                      {}), "tiny")
    assert other["backbone"] == "resnet18" and "width" not in other   # no width to scale
    cpu_a, _ = rep.run_settings(recipe, a, "cpu")
    assert (cpu_a["image_size"], cpu_a["epochs"]) == (64, 5)


def test_weights_fall_back_only_below_full_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_ENSEMBLES_OFFLINE", "1")
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS", str(tmp_path / "no-weights"))
    recipe = _recipe(tmp_path, MINIMAL)
    planned = rep.plan(recipe, "cpu", tmp_path / "out", data_dir=str(tmp_path))
    b = planned[1]
    assert b.config.model.pretrained is None and b.config.data.data_dir == str(tmp_path)
    assert any(n.startswith("pretrained=imagenet: weights not available (") and
               "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in n for n in b.not_applied)
    assert any(n.startswith("freeze=head on random weights") for n in b.not_applied)
    with pytest.raises(ValueError, match="run b: the published protocol needs resnet50's "
                                         "ImageNet weights"):
        rep.plan(recipe, "full", tmp_path / "out", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="give its folder"):
        rep.plan(recipe, "cpu", tmp_path / "out")
    only = rep.plan(recipe, "tiny", tmp_path / "out", only=["b"])
    assert [(p.name, p.run_dir) for p in only] == [("b", tmp_path / "out" / "b")]
    with pytest.raises(ValueError, match=r"runs \['c'\] are not in recipe t; it has a, b"):
        rep.plan(recipe, "tiny", tmp_path / "out", only=["a", "c"])


def test_bad_recipes(tmp_path):
    with pytest.raises(ValueError, match=r"\[settings\] has unknown keys \['imagesize'\]"):
        _recipe(tmp_path, MINIMAL.replace("image_size = 128", "imagesize = 128"))
    with pytest.raises(ValueError, match="published figure for unknown run 'c'"):
        _recipe(tmp_path, MINIMAL.replace('run = "b"', 'run = "c"'))


def test_cli_refusals(tmp_path, capsys):
    assert cli.main(["no-such-recipe"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown recipe 'no-such-recipe'")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert cli.main(["resnet50-ova-ovo", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'out'} exists and is not empty"
    assert cli.main(["resnet50-ova-ovo", "--scale", "cpu", "--out", str(tmp_path / "o2")]) == 2
    assert "give its folder (--data-dir)" in capsys.readouterr().err


def _ours(metrics: dict, name: str) -> str:
    lo, hi = metrics["ci95"][name]
    return f"{metrics[name]:.3f} [{lo:.3f}, {hi:.3f}]"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")   # one synthetic build shared by the recipes


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_at_tiny_scale(name, tmp_path, cache_dir, capsys):
    out = tmp_path / "out"
    assert cli.main([name, "--scale", "tiny", "--data-dir", str(tmp_path), "--out", str(out),
                     "--cache-dir", str(cache_dir), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"report: {out / 'reproduction.md'}")
    recipe, text = RECIPES[name], (out / "reproduction.md").read_text()
    doc = json.loads((out / "reproduction.json").read_text())
    assert [r["name"] for r in doc["runs"]] == [r.name for r in recipe.runs]
    published = {p.run: p for p in recipe.published}
    for run in recipe.runs:
        metrics = json.loads((out / run.name / "metrics.json").read_text())
        config = RunConfig.from_dict(json.loads((out / run.name / "config.json").read_text())[
            "config"])
        backbone = {**recipe.settings, **run.settings}.get("backbone")
        assert (config.data.dataset, config.training.epochs, config.model.pretrained,
                config.ensemble.strategy, config.model.width) == (
            "synthetic_cxr", 1, None, run.strategy, 0.25)
        if backbone in KERAS:   # an ImageNet architecture: the stand-in, and said so
            assert config.model.backbone == rep.TINY_STAND_IN
            assert f"- {run.name}: backbone={backbone}: scale tiny trains" in text
        else:
            assert config.model.backbone == backbone
        for key in ("freeze", "head", "optimizer", "lr"):   # the protocol's other settings
            if key in {**recipe.settings, **run.settings}:
                assert getattr(config.model if key in ("freeze", "head") else config.training,
                               key) == {**recipe.settings, **run.settings}[key]
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        p = published.get(run.name)
        assert cells[3] == (rep.published_text(p) if p else "not recorded")
        assert cells[4] == (_ours(metrics, p.metric) if p else "n/a")
        assert cells[5] == _ours(metrics, "macro_f1")
        assert int(cells[6]) == sum(map(sum, metrics["confusion_matrix"]))
        cm = metrics["confusion_matrix"]
        never = [c for k, c in enumerate(metrics["class_names"]) if not any(r[k] for r in cm)]
        assert cells[7] == (", ".join(never) or "none")
        if {**recipe.settings, **run.settings}.get("pretrained"):
            assert (f"- {run.name}: pretrained=imagenet: scale tiny never loads ImageNet "
                    f"weights") in text
    for p in recipe.published:   # the figure and its test-set size, as published
        assert f"{p.metric} {p.value:.3f} (" in text
        if p.test_size:
            assert f"({p.test_size} test images)" in text
    for d in recipe.differences:
        assert f"- {d}" in text
    for key, value in recipe.if_available.items():   # applied, or said not to be
        applied = key in rep.FIELDS
        assert (f"{key}={value}: not available in this version" in text) is not applied
    assert rep.PATIENT_CAVEAT in text and rep.SOURCE_CAVEAT in text and rep.TINY_NOTE in text
    assert re.search(r"at scale `tiny` on `synthetic_cxr`\.\n", text)


def test_markdown_table_and_never_predicted():
    metrics = {"accuracy": 0.75, "macro_f1": 0.5, "class_names": ["covid", "normal", "viral"],
               "ci95": {"accuracy": [0.6, 0.9], "macro_f1": [0.25, 0.7]},
               "confusion_matrix": [[2, 1, 0], [0, 4, 0], [0, 1, 0]]}
    doc = {"recipe": "t", "title": "T", "scale": "cpu", "dataset": "covid19_radiography",
           "data_dir": "/d", "published": [{"run": "a", "metric": "accuracy", "value": 0.9,
                                            "test_size": 50, "note": ""}],
           "differences": ["one"], "left_out": ["b"],
           "runs": [{"name": "a", "run_dir": "/o/a", "strategy": "ovo", "backbone": "cnn16",
                     "not_applied": ["x=1: not available in this version"],
                     "metrics": metrics}]}
    text = rep.markdown(doc)
    assert rep.never_predicted(metrics) == ["viral"]
    assert ("| a | ovo | cnn16 | accuracy 0.900 (50 test images) | 0.750 [0.600, 0.900] | "
            "0.500 [0.250, 0.700] | 8 | viral |") in text
    assert "- one\n" in text and "- a: x=1: not available in this version\n" in text
    assert "- not run this time: b" in text and rep.TINY_NOTE not in text
    assert "at scale `cpu` on `covid19_radiography` (`/d`)." in text
