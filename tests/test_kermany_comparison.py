"""benchmarks.kermany_comparison: the comparison's one command and its learning-curve table."""

from __future__ import annotations

from benchmarks import kermany_comparison as kc


def test_compare_runs_experiments_compare_with_the_chosen_settings(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(kc.compare, "main", lambda argv: seen.append(argv) or 0)
    assert kc.main(["compare", "--data-dir", str(tmp_path), "--seeds", "1", "--reuse"]) == 0
    argv = seen[0]
    flags = {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--")}   # last one wins
    assert flags["--split-recipe"] == "source" and flags["--image-size"] == "32"
    assert flags["--epochs"] == "20" and flags["--early-stopping-patience"] == "20"
    assert flags["--data-dir"] == str(tmp_path)
    assert flags["--cross-data-dir"] == str(kc.CROSS_DIR)
    # the caller's flags come after the defaults, so argparse keeps them
    assert flags["--seeds"] == "1" and argv[-1] == "--reuse"


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
    assert kc._flags(tmp_path, 48)[kc._flags(tmp_path, 48).index("--image-size") + 1] == "48"
