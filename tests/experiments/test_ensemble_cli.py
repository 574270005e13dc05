"""The ova / ovo / cascade CLIs end to end on synthetic_cxr at tiny size, and their bad-input
errors (raised before anything is written)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from settings import TINY_ARGS

from data_pipeline.splits import kfold_indices
from ensembles.training import build, fitting, runs
from experiments import common, ensemble_cli

ARGS = [*TINY_ARGS, "--n-bootstrap", "1000"]   # the metrics carry CIs
FILES = ("config.json", "combiner.json", "metrics.json", "metrics.jsonl", "report.md",
         "confusion.png", "roc.png", "reliability.png", "curves.png", "outputs.npz")


def _run(strategy, tmp_path, cache, *extra):
    out = tmp_path / strategy
    return ensemble_cli.run(strategy, [*ARGS, "--out", str(out), "--cache-dir", str(cache),
                                       *extra]).run_dir_


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,members", [("ovo", 6), ("cascade", 2)])
def test_cli_end_to_end(strategy, members, tmp_path, cache):
    out = _run(strategy, tmp_path, cache, "--meta", "logreg")
    for name in FILES:
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["bundle"]["format_version"] == 1
    assert len(config["bundle"]["tasks"]["names"]) == members
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "roc_auc_macro", "ece", "ci95", "temperature_scaling"):
        assert key in metrics, key
    names = [v["name"] for v in metrics["variants"]]
    assert any(n.startswith("meta logreg") for n in names)
    if strategy == "cascade":
        assert any(n.startswith("cascade thresholded") for n in names)
    outputs = np.load(out / "outputs.npz")
    assert not np.isin(outputs["val_index"], outputs["train_indices"]).any()
    assert (out / "meta.json").is_file()


def test_cascade_without_healthy_class_fails_before_writing(tmp_path, cache):
    out = tmp_path / "cascade"
    with pytest.raises(ValueError, match="healthy class"):
        ensemble_cli.run("cascade", [*ARGS, "--classes",
                                     "covid,viral_pneumonia,bacterial_pneumonia", "--out", str(out),
                                     "--cache-dir", str(cache)])
    assert not out.exists()


def test_ovo_pair_too_small_fails_before_writing(tmp_path, cache):
    out = tmp_path / "ovo"
    with pytest.raises(ValueError, match="training examples per class"):
        ensemble_cli.run("ovo", [*ARGS, "--min-per-class", "1000", "--out", str(out),
                                 "--cache-dir", str(cache)])
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, cache):
    out = tmp_path / "ova"
    out.mkdir()
    (out / "report.md").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        ensemble_cli.run("ova", [*ARGS, "--out", str(out), "--cache-dir", str(cache)])
    assert (out / "report.md").read_text() == "keep me"


def test_main_prints_one_line_error(tmp_path, cache, capsys):
    code = ensemble_cli.main("cascade", "", [*ARGS, "--classes", "covid,viral_pneumonia",
                                             "--out", str(tmp_path / "x"),
                                             "--cache-dir", str(cache)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: cascade needs")
    assert "Traceback" not in err[0]


@pytest.mark.slow
def test_meta_on_out_of_fold_outputs(tmp_path, cache, monkeypatch):
    calls = []   # (folder, training ids) of every member training
    train_members = fitting.train_members

    def spy(plan, out, train_indices=None):
        calls.append((out, plan.data.train_indices if train_indices is None
                      else np.asarray(train_indices)))
        return train_members(plan, out, train_indices)

    monkeypatch.setattr(fitting, "train_members", spy)
    out = _run("ova", tmp_path, cache, "--meta", "logreg", "--meta-folds", "2")
    # each fold's members never trained on the ids they predict for the meta-classifier
    config = common.parse("ova", [*ARGS, "--meta", "logreg", "--meta-folds", "2",
                                  "--cache-dir", str(cache)])[0]
    data = build.build_data(config)
    train = np.unique(data.train_indices)
    folds = kfold_indices(data.dataset.labels[train], data.dataset.patient_ids[train], k=2,
                          seed=0)
    fold_calls = {c[0].name: c[1] for c in calls if c[0].parent.name == "oof"}
    assert sorted(fold_calls) == ["fold-0", "fold-1"]
    for f, (fit, held) in enumerate(folds):
        trained_on = fold_calls[f"fold-{f}"]
        assert not np.isin(trained_on, train[held]).any(), f
        np.testing.assert_array_equal(np.sort(trained_on), np.sort(train[fit]))
    metrics = json.loads((out / "metrics.json").read_text())
    meta = [v for v in metrics["variants"] if v["name"].startswith("meta logreg")]
    assert [v["name"] for v in meta] == ["meta logreg (fit on 2-fold out-of-fold member outputs)"]
    assert 0.0 <= meta[0]["macro_f1"] <= 1.0
    for f in (0, 1):   # one member training per fold, logged apart from the final members'
        records = (out / "oof" / f"fold-{f}" / "metrics.jsonl").read_text().splitlines()
        # --members auto: one after another on CPU, one record per member and epoch
        names = json.loads((out / "config.json").read_text())["member_names"]
        assert sorted(json.loads(r)["members"][0] for r in records) == sorted(names)
    assert (out / "meta.json").is_file()


@pytest.mark.slow
def test_head_epochs_trains_the_head_then_everything(tmp_path, cache, monkeypatch):
    calls = []   # (init_variables, result) of every train_group call, in order
    train_group = fitting.members_lib.train_group

    def spy(stack, **kw):
        result = train_group(stack, **kw)
        calls.append((kw.get("init_variables"), result))
        return result

    monkeypatch.setattr(fitting.members_lib, "train_group", spy)
    out = _run("ova", tmp_path, cache, "--head-epochs", "1", "--freeze", "full",
               "--seed", "3")
    (none, head), (init, final) = calls           # OvA: one stack, two phases
    assert none is None and init is head.variables
    # phase 1 changed only the head: its trunk is the fresh initialisation of each member
    config = common.parse("ova", [*ARGS, "--seed", "3", "--cache-dir", str(cache)])[0]
    data = build.build_data(config)
    make_state = build.make_state_fn(config, len(data.train_indices) // 16)
    keys = fitting.members_lib.member_keys(jax.random.PRNGKey(3), head.group.members)
    fresh = [make_state(2, k).params for k in keys]
    for m, params in enumerate(fresh):
        for name in params:
            same = [np.array_equal(a, b[m]) for a, b in zip(
                jax.tree.leaves(params[name]), jax.tree.leaves(head.variables["params"][name]))]
            assert all(same) if name != "head" else not any(same), (m, name)
    # phase 2 (--freeze full) moved the trunk on from there
    for name in ("block1_conv1", "block2_conv1"):
        assert not np.allclose(jax.tree.leaves(final.variables["params"][name])[0],
                               jax.tree.leaves(head.variables["params"][name])[0])
    head_log = [json.loads(r) for r in (out / "head" / "metrics.jsonl").read_text().splitlines()]
    assert len(head_log) == 4 and all(len(r["members"]) == 1 for r in head_log)
    assert (out / "head" / "checkpoints").is_dir() and (out / "head" / "curves.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head_phase"]["epochs"] == 1
    assert set(metrics["head_phase"]["best_epoch_per_member"]) == set(
        metrics["best_epoch_per_member"])
    assert "in two phases: the head alone for 1 epoch(s)" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra,message", [
    (["--meta-folds", "2"], "meta_folds needs a meta-classifier"),
    (["--meta", "logreg", "--meta-folds", "1"], "meta_folds needs a meta-classifier and K >= 2"),
    (["--meta", "logreg", "--meta-folds", "500"], "fewer than k=500 folds"),
    (["--head-epochs", "-1"], "head_epochs must be >= 0"),
    (["--head-epochs", "1", "--freeze", "last:9"], "the model has only 2 stages"),
])
def test_bad_meta_folds_and_two_phase_flags_fail_before_writing(extra, message, tmp_path,
                                                                 cache):
    out = tmp_path / "ova"
    with pytest.raises(ValueError, match=message):
        ensemble_cli.run("ova", [*ARGS, *extra, "--out", str(out), "--cache-dir", str(cache)])
    assert not out.exists()


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_a_refused_resume_changes_no_file(tmp_path, cache, capsys):
    out = tmp_path / "ova"
    argv = [*ARGS, "--out", str(out), "--cache-dir", str(cache)]
    assert ensemble_cli.main("ova", "", argv) == 0
    before = _snapshot(out)
    refusals = [
        ([*argv, "--resume", "--lr", "0.01"], "training.lr: 0.001 vs 0.01"),
        ([*argv, "--resume", "--image-size", "32", "--seed", "1"],
         "data.image_size: 16 vs 32; training.seed: 0 vs 1"),
        ([*argv, "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (argv, "exists and is not empty"),
        ([*ARGS, "--resume", "--out", str(tmp_path / "missing"), "--cache-dir", str(cache)],
         "nothing to resume"),
        ([*ARGS, "--resume", "--cache-dir", str(cache)], "--resume needs --out"),
    ]
    for bad, message in refusals:
        capsys.readouterr()
        assert ensemble_cli.main("ova", "", bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert not any("Traceback" in line for line in err)
        assert _snapshot(out) == before, bad
    assert not (tmp_path / "missing").exists()
    with runs.locked(out):   # another process is writing this run: a resume is refused
        assert ensemble_cli.main("ova", "", [*argv, "--resume"]) == 2
        assert "is in use by another run" in capsys.readouterr().err.strip().splitlines()[-1]
        assert _snapshot(out) == before
    # a resume of a finished run with its own settings retrains nothing and changes no result
    assert ensemble_cli.main("ova", "", [*argv, "--resume"]) == 0
    after = _snapshot(out)
    for name in ("metrics.json", "combiner.json", "outputs.npz", "metrics.jsonl"):
        assert after[name] == before[name], name
