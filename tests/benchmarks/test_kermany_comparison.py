"""benchmarks.kermany_comparison: the comparison's one command and its learning-curve table."""

from __future__ import annotations

import pytest

from benchmarks import kermany_comparison as kc


def test_compare_runs_the_library_comparison_with_the_chosen_settings(tmp_path, monkeypatch):
    seen = {}

    def run(planned, out, *, reuse, cross):
        seen.update(planned=planned, out=out, reuse=reuse, cross=cross)
        (out / "compare.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text("# table\n")
        return {}

    monkeypatch.setattr(kc.compare, "run", run)
    monkeypatch.setattr(kc, "load_dataset", lambda name, **kw: (name, kw["data_dir"]))
    out = tmp_path / "cmp"
    assert kc.main(["compare", "--data-dir", str(tmp_path), "--seeds", "1", "--reuse",
                    "--backbones", "simple_cnn,cnn16", "--compare-out", str(out)]) == 0
    assert seen["reuse"] and seen["out"] == out
    assert seen["cross"] == ("chest_xray_pneumonia", str(kc.CROSS_DIR))
    planned = seen["planned"]
    assert [(p.strategy, p.backbone, p.seed) for p in planned] == [
        (s, b, 0) for b in ("simple_cnn", "cnn16")
        for s in ("single", "ova", "ovo", "cascade", "stack")]
    for p in planned:
        if p.config is None:
            continue
        c = p.config
        assert c.data.split_recipe == "source" and c.data.image_size == 32
        assert c.training.epochs == 20 and c.training.early_stopping_patience == 20
        assert c.data.data_dir == str(tmp_path) and c.training.members == "sequential"
        assert (c.ensemble.strategy, c.model.backbone) == (p.strategy, p.backbone)


def test_unknown_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        kc.main(["compare", "--data-dir", str(tmp_path), "--lr", "0.1"])
    assert exit_.value.code == 2


def test_a_missing_data_dir_is_one_line_and_exit_2(tmp_path, capsys):
    assert kc.main(["curves", "--data-dir", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data-dir") and "\n" not in err


def test_curves_table_and_figure(tmp_path):
    records = [{"epoch": e, "val_loss": [1.0 / e], "val_macro_f1": [0.5 + e / 100],
                "seconds": 2.0} for e in range(1, 6)]
    rows = [{"backbone": "simple_cnn", "image_size": 32, "records": records,
             "macro_f1": 0.7591, "ci95": [0.70, 0.80], "best_epoch": 5, "train_s": 10.0}]
    kc.write_curves(rows, tmp_path)
    table = (tmp_path / "curves.md").read_text().splitlines()
    assert table[2] == "| simple_cnn | 32 px | 5 | 0.759 [0.700, 0.800] | 10 |"
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert kc._settings(tmp_path, 48)["image_size"] == 48
    assert kc._settings(tmp_path)["data_dir"] == str(tmp_path)
