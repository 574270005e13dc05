"""benchmarks/first_run.py runs the CLI as a user does and reports what the run wrote."""

from __future__ import annotations

import json

import pytest

from benchmarks import first_run


@pytest.mark.slow
def test_first_run_benchmark_reports_the_runs_own_metrics(tmp_path, capsys):
    """Tiny CPU run (simple_cnn, 16 px): the table and JSON carry each run's metrics.json."""
    extra = "--count 80 --epochs 1 --image-size 16 --n-bootstrap 20"
    out = tmp_path / "bench.json"
    assert first_run.main(["--strategies", "cascade", "--backbone", "simple_cnn",
                           "--seeds", "0,1", "--extra", extra, "--keep", str(tmp_path / "runs"),
                           "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for run in report["runs"]:
        metrics = json.loads((tmp_path / "runs" / f"cascade-{run['seed']}" / "metrics.json")
                             .read_text())
        assert run["macro_f1"] == metrics["macro_f1"] and run["wall_s"] > 0
        assert run["member_epochs"] >= 1
    (row,) = report["rows"]
    f1s = sorted(r["macro_f1"] for r in report["runs"])
    assert row["macro_f1_range"] == f1s and row["seeds"] == 2
    assert row["macro_f1_median"] == pytest.approx(sum(f1s) / 2)
    table = capsys.readouterr().out
    assert f"`python -m experiments.cascade --backbone simple_cnn {extra}` | 2 |" in table
    assert f"{row['macro_f1_median']:.3f}" in table
