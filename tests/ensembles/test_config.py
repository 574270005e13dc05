"""ensembles.config: each default written once (family defaults read off the fields), every
"auto" resolved and recorded, no cluster joined while a config is built, a resume on other
hardware continues with the run's own members, one-line did-you-mean errors, the dataset
inferred from --data-dir's layout, and older config.json files still load."""

from __future__ import annotations

import json

import jax
import pytest

import backbones
from backbones.training import distributed
from ensembles import config as config_lib
from ensembles.config import (
    FAMILY_DEFAULTS,
    FIELDS,
    STRATEGY_DEFAULTS,
    ConfigError,
    RunConfig,
    for_resume,
    make_config,
)
from ensembles.training import runs
from experiments import common

AUTO = ("dataset", "channels", "normalization", "augment", "head", "precision", "members",
        "member_data")


def _value(config, name):
    return getattr(getattr(config, FIELDS[name][0]), name)


def test_family_defaults_are_read_off_the_fields():
    family_fields = {n for n, (_, f) in FIELDS.items() if "family" in f.metadata}
    assert family_fields == {"count", "image_size", "epochs", "batch_size"}
    for name in family_fields:
        assert FIELDS[name][1].default is None, name   # written once: per family only
        assert {k: v[name] for k, v in FAMILY_DEFAULTS.items()} == FIELDS[name][1].metadata[
            "family"]
    assert STRATEGY_DEFAULTS == {("imagenet", "cascade"): {"epochs": 10},
                                 ("imagenet", "ovo"): {"epochs": 6}}


@pytest.mark.parametrize("strategy", ["single", "ova", "ovo", "cascade"])
@pytest.mark.parametrize("backbone", ["simple_cnn", "resnet50", "densenet121"])
def test_every_auto_is_resolved_and_recorded(strategy, backbone):
    config = make_config(strategy, backbone=backbone)
    doc = config.to_dict()
    for name in AUTO:
        assert _value(config, name) not in (None, "auto"), name
    assert doc["model"]["head"] == backbones.resolve_head("auto", backbone)
    assert doc["model"]["precision"] == "fp32"                  # on CPU
    assert doc["training"]["members"] == "sequential"
    assert doc["training"]["member_data"] == (
        "own" if strategy == "ovo" and backbone == "simple_cnn" else "shared")
    assert config.hardware_auto == {"members", "member_data", "precision"}
    assert RunConfig.from_dict(json.loads(json.dumps(doc))) == config


def test_on_an_accelerator_auto_means_bf16_and_stacked_members(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    config = make_config("ovo", backbone="simple_cnn")
    assert (config.model.precision, config.training.members, config.training.member_data) == (
        "bf16", "stacked", "shared")
    given = make_config("ovo", backbone="simple_cnn", precision="fp32", members="sequential")
    assert (given.model.precision, given.training.members, given.training.member_data) == (
        "fp32", "sequential", "own")
    assert given.hardware_auto == set()        # nothing left to the machine


def test_building_a_config_joins_no_cluster(monkeypatch):
    def refuse(*args):
        raise AssertionError(f"distributed.initialize{args} while building a config")
    monkeypatch.setattr(distributed, "initialize", refuse)
    make_config("ova", backbone="simple_cnn")
    config_lib.resolve(RunConfig())


def test_a_config_naming_processes_needs_the_process_to_have_joined(monkeypatch):
    monkeypatch.setattr(config_lib, "_joined", None)
    monkeypatch.setattr(distributed, "_joined", None)
    launch = {"coordinator": "127.0.0.1:1", "num_processes": 1, "process_id": 0}
    with pytest.raises(ConfigError, match="has not joined the run's processes"):
        make_config("ova", **launch)
    config_lib.join_cluster(**launch)     # one process: nothing to connect to
    assert make_config("ova", **launch).training.num_processes == 1


def test_joining_with_half_the_settings_is_a_config_error(monkeypatch):
    monkeypatch.setattr(distributed, "_joined", None)
    with pytest.raises(ConfigError, match="go together"):
        config_lib.join_cluster(coordinator="127.0.0.1:1")


def test_the_cli_joins_before_jax_picks_its_backend(monkeypatch):
    monkeypatch.setattr(config_lib, "_joined", None)
    monkeypatch.setattr(distributed, "_joined", None)
    calls, join, backend = [], config_lib.join_cluster, jax.default_backend
    monkeypatch.setattr(common, "join_cluster", lambda **kw: calls.append(("join", kw)) or
                        join(**kw))
    monkeypatch.setattr(jax, "default_backend", lambda: calls.append(("backend",)) or backend())
    common.parse("ova", ["--num-processes", "1", "--process-id", "0", "--coordinator", "h:1"])
    assert calls[0] == ("join", {"coordinator": "h:1", "num_processes": 1, "process_id": 0})
    assert ("backend",) in calls[1:]


def test_a_misspelt_choice_or_setting_names_the_closest():
    with pytest.raises(ConfigError) as error:
        make_config("ova", backbone="resnet5O")
    assert str(error.value) == "unknown backbone 'resnet5O'; did you mean resnet50?"
    with pytest.raises(ConfigError, match="unknown setting 'epoch'; did you mean epochs"):
        make_config("ova", epoch=3)
    with pytest.raises(ConfigError, match="unknown split recipe '70/15'; did you mean 70/15/15"):
        make_config("ova", split_recipe="70/15")
    with pytest.raises(ValueError, match="choose one of single, ova, ovo, cascade"):
        make_config("bagging")            # a ValueError still, for the Python API's callers


def _folder(root, *files):
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    return str(root)


@pytest.mark.parametrize("files,dataset", [
    (["COVID/images/COVID-1.png", "Normal/images/Normal-1.png"], "covid19_radiography"),
    (["chest_xray/train/NORMAL/a.jpeg", "chest_xray/test/PNEUMONIA/b.jpeg"],
     "chest_xray_pneumonia"),
    (["train/NORMAL/a.jpeg"], "chest_xray_pneumonia"),
    (["covid/a.png", "normal/b.png"], "image_folder"),
])
def test_data_dir_without_dataset_takes_its_layout(files, dataset, tmp_path):
    config = make_config("ova", data_dir=_folder(tmp_path, *files))
    assert config.data.dataset == dataset and config.data.augment


def test_data_dir_of_no_known_layout_or_with_synthetic_cxr_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot tell the layout of data_dir"):
        make_config("ova", data_dir=_folder(tmp_path, "scans/a.png"))
    with pytest.raises(ConfigError, match="is not a folder"):
        make_config("ova", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="synthetic_cxr is generated"):
        make_config("ova", dataset="synthetic_cxr", data_dir=str(tmp_path))
    assert make_config("ova").data.dataset == "synthetic_cxr"


def _old_config_doc(**changes):
    """config.json's "config" as the previous main wrote it: head and precision "auto"."""
    doc = make_config("ova", backbone="simple_cnn").to_dict()
    doc["model"].update(head="auto", precision="auto")
    for key, value in changes.items():
        doc[FIELDS[key][0]][key] = value
    return doc


def test_an_older_config_loads_and_a_resume_of_it_is_not_refused():
    old = RunConfig.from_dict(_old_config_doc())
    assert old.model.head == "imagenet"                 # what the bundle section records
    assert old.model.precision == "auto"                # unknown: not made up
    new = make_config("ova", backbone="simple_cnn")
    assert new.differences(old) == [] and old.differences(new) == []
    explicit = make_config("ova", backbone="simple_cnn", precision="fp32")
    assert explicit.differences(old) == ["model.precision: 'auto' vs 'fp32'"]


def test_a_resume_on_other_hardware_keeps_the_runs_members(tmp_path):
    gpu_run = _old_config_doc(members="stacked", member_data="shared", precision="fp32")
    here = make_config("ovo", backbone="simple_cnn")        # CPU: sequential, own pairs
    gpu_run["ensemble"]["strategy"] = "ovo"
    assert here.differences(RunConfig.from_dict(gpu_run))
    resumed = for_resume(here, gpu_run)
    assert (resumed.training.members, resumed.training.member_data) == ("stacked", "shared")
    assert resumed.differences(RunConfig.from_dict(gpu_run)) == []
    given = make_config("ovo", backbone="simple_cnn", members="sequential")
    assert for_resume(given, gpu_run).training.members == "sequential"   # refused later
    assert for_resume(here, None) == here and for_resume(here, {"model": {"x": 1}}) == here


def test_a_resume_in_another_precision_is_refused_unless_given(tmp_path):
    bf16_run = _old_config_doc(precision="bf16")
    here = make_config("ova", backbone="simple_cnn")
    with pytest.raises(ConfigError, match="trained in bf16.*--precision bf16"):
        for_resume(here, bf16_run)
    given = for_resume(make_config("ova", backbone="simple_cnn", precision="bf16"), bf16_run)
    assert given.differences(RunConfig.from_dict(bf16_run)) == []


def test_the_cli_resume_of_a_gpu_run_passes_the_run_check(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = _old_config_doc(members="stacked", precision="fp32")
    (out / runs.CONFIG_FILE).write_text(json.dumps({"config": saved}))
    config, target = common.parse("ova", ["--resume", "--out", str(out)])
    assert config.training.members == "stacked"
    runs.check_run_dir(out, config, resume=True, overwrite=False)   # not refused
    refused, _ = common.parse("ova", ["--resume", "--out", str(out), "--members", "sequential"])
    with pytest.raises(ValueError, match="training.members: 'stacked' vs 'sequential'"):
        runs.check_run_dir(out, refused, resume=True, overwrite=False)
