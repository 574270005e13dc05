"""How the CLIs end: the user's errors (the project's exception types, OSErrors about the
user's paths) as one `error: ...` line with exit code 2 and no usage dump, the closest valid
name suggested; anything else is a bug and keeps its traceback. --data-dir without --dataset
says which layout it took. The summary line names report.html."""

from __future__ import annotations

import errno
import types

import pytest

from backbones.training import TrainingDiverged
from data_pipeline.image_source import DecodeError
from ensembles import Ensemble
from ensembles.bundle.schema import BundleError
from ensembles.config import ConfigError
from experiments import common, ensemble_cli, reproduce, segment


def _main(argv, capsys):
    code = ensemble_cli.main("ova", "", argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.mark.parametrize("argv,line", [
    (["--backbone", "resnet5O"], "error: unknown backbone 'resnet5O'; did you mean resnet50?"),
    (["--optimizer", "adamm"], "error: unknown optimizer 'adamm'; did you mean adam?"),
    (["--split-recipe", "70/15"], "error: unknown split recipe '70/15'; did you mean 70/15/15?"),
    (["--epochz", "3"], "error: unrecognized arguments: --epochz 3; did you mean --epochs?"),
    (["--epochs", "x"], "error: argument --epochs: invalid int value: 'x'"),
    (["--lr", "0"], "error: lr must be in (0, 10]; got 0.0"),
])
def test_a_bad_flag_is_one_line_with_exit_code_2(argv, line, capsys):
    try:
        code = ensemble_cli.main("ova", "", argv)
    except SystemExit as exit_info:                 # argparse's errors end at parse
        code = exit_info.code
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [line]


def _fit_raising(error):
    def fit(self, *args, **kwargs):
        raise error
    return fit


@pytest.mark.parametrize("error", [
    ConfigError("bad setting"), BundleError("bad bundle"), DecodeError("bad image"),
    TrainingDiverged("member 0 diverged"),
    OSError(errno.ENOSPC, "No space left on device"),
    FileNotFoundError("--pretrained: weights.h5 is not a file"),
])
def test_the_users_errors_are_one_line_and_exit_code_2(error, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(Ensemble, "fit", _fit_raising(error))
    code, err, _ = _main(["--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err == [f"error: {error}"]


def test_an_oserror_about_the_users_path_is_the_users(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    error = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(out / "checkpoints"))
    monkeypatch.setattr(Ensemble, "fit", _fit_raising(error))
    code, err, _ = _main(["--out", str(out)], capsys)
    assert code == 2 and err == [f"error: {error}"]


@pytest.mark.parametrize("error", [
    ValueError("operands could not be broadcast together"), KeyError("logits"),
    TypeError("unsupported operand"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/opt/lib/missing.json"),
])
def test_a_bug_keeps_its_traceback(error, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(Ensemble, "fit", _fit_raising(error))
    with pytest.raises(type(error)) as raised:
        _main(["--out", str(tmp_path / "run")], capsys)
    assert raised.value is error
    assert "error:" not in capsys.readouterr().err


def test_user_error_classifies_oserrors_by_path():
    argv = ["--data-dir", "/data/cxr", "--out=/runs/a"]
    def at(path, code=errno.ENOENT):   # noqa: E306
        return OSError(code, "x", path)
    assert common.user_error(at("/data/cxr/COVID/1.png"), argv)
    assert common.user_error(at("/runs/a/config.json"), argv)
    assert not common.user_error(at("/usr/share/other"), argv)
    assert common.user_error(at("/usr/share/other", errno.EROFS), argv)
    assert not common.user_error(RuntimeError("x"), argv)


def test_the_summary_line_names_report_html(monkeypatch, capsys, tmp_path):
    metrics = {"accuracy": 0.5, "macro_f1": 0.5, "per_class": {"a": {"support": 1},
                                                                 "b": {"support": 1}}}
    def fit(self, *args, **kwargs):   # noqa: E306
        return types.SimpleNamespace(metrics_=metrics, run_dir_=tmp_path)
    monkeypatch.setattr(Ensemble, "fit", fit)
    code, _, out = _main(["--out", str(tmp_path)], capsys)
    assert code == 0 and out.strip().endswith(f"report: {tmp_path / 'report.html'}")


def test_data_dir_without_dataset_says_which_layout_it_took(tmp_path, capsys):
    for name in ("COVID", "Normal"):
        (tmp_path / name / "images").mkdir(parents=True)
    config, _ = common.parse("ova", ["--data-dir", str(tmp_path)])
    assert config.data.dataset == "covid19_radiography"
    assert capsys.readouterr().err.strip() == (
        f"--data-dir {tmp_path} holds the Kaggle COVID-19 Radiography layout "
        f"(<Class>/images/): --dataset covid19_radiography")


def test_the_issues_command_trains_on_the_folder_not_the_phantoms(shared_data, capsys):
    config, _ = common.parse("ova", ["--backbone", "simple_cnn", "--data-dir",
                                     str(shared_data / "cxr-mini")])
    assert (config.data.dataset, config.data.augment) == ("covid19_radiography", True)


def test_data_dir_of_an_unknown_layout_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    code, err, _ = _main(["--data-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: cannot tell the layout of data_dir {tmp_path}")
    code = segment.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "seg")])
    assert code == 2 and "cannot tell the layout" in capsys.readouterr().err


def test_reproduce_names_the_closest_recipe(capsys):
    assert reproduce.main(["resnet50-ova-ov"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown recipe 'resnet50-ova-ov'; did you mean resnet50-ova-ovo? "
                   "(--list)"]
