"""benchmarks/gpu_suite.py: the rows, the table against the JSON, the budget, failures kept in
their rows, cell processes, and the PyTorch DenseNet121 twin. The suite runs in --tiny mode
(small stand-ins on a CPU); figures are not checked, only that they exist and agree."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_suite

ROOT = Path(__file__).resolve().parents[2]
ROW_IDS = ["resnet50_bf16", "resnet50_fp32", "densenet121_bf16", "densenet121_fp32",
           "ova_simple_cnn", "ova_resnet50", "input_cached"]
JAX_PARTS = {"train": ("jax",), "ova": ("stacked", "sequential")}


def parse_tables(markdown: str) -> dict[str, dict[str, str]]:
    """Every markdown table row, keyed by its first cell, as {column name: cell text}."""
    rows, header = {}, None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
        elif not set(line) <= set("|-"):
            rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def run_main(argv: list[str], tmp_path: Path, capsys) -> tuple[dict, dict]:
    """Run the suite in this process: (JSON report, parsed table)."""
    out = tmp_path / "suite.json"
    assert gpu_suite.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), parse_tables(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, dict, str]:
    """The whole suite in --tiny mode, run as the command a user types. A compile cache
    (fresh, this run only) lets the identical stand-in rows compile once."""
    tmp = tmp_path_factory.mktemp("gpu_suite")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--tiny", "--json",
                           str(tmp / "suite.json")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "suite.json").read_text()), parse_tables(done.stdout), done.stdout


@pytest.mark.slow
def test_tiny_suite_has_every_row_with_finite_jax_figures(tiny):
    report, table, _ = tiny
    assert [r["id"] for r in report["rows"]] == ROW_IDS
    assert set(ROW_IDS) <= set(table)
    assert report["scale"] == "tiny" and not report["isolate"]
    for row in report["rows"]:
        for part in JAX_PARTS.get(row["section"], ()):
            cell = row["cells"][part]
            assert cell["status"] == "ok", (row["id"], part, cell)
            assert math.isfinite(cell["images_per_s"]) and cell["images_per_s"] > 0
            assert cell["compile_s"] >= 0 and cell["repeats"] >= 1
        assert row["stand_in"] == (None if row["model"] in ("simple_cnn", "grain loader")
                                   else "simple_cnn")
    loader = report["rows"][-1]["cells"]["loader"]
    assert loader["status"] == "ok" and loader["images_per_s"] > 0


@pytest.mark.slow
def test_tiny_table_prints_what_the_json_holds(tiny):
    report, table, stdout = tiny
    rows = {r["id"]: r for r in report["rows"]}
    jax_row, ova_row = rows["resnet50_bf16"], rows["ova_simple_cnn"]
    assert table["resnet50_bf16"]["JAX img/s"] == f"{jax_row['cells']['jax']['images_per_s']:.1f}"
    assert table["resnet50_bf16"]["JAX compile s"] == f"{jax_row['cells']['jax']['compile_s']:.1f}"
    assert table["ova_simple_cnn"]["sequential img/s"] == \
        f"{ova_row['cells']['sequential']['images_per_s']:.1f}"
    assert table["ova_simple_cnn"]["stacked / sequential"] == f"{ova_row['ratio']:.2f}x"
    assert ova_row["ratio"] == pytest.approx(ova_row["cells"]["stacked"]["images_per_s"]
                                             / ova_row["cells"]["sequential"]["images_per_s"])
    assert table["input_cached"]["img/s"] == \
        f"{rows['input_cached']['cells']['loader']['images_per_s']:.1f}"
    torch_cell = jax_row["cells"]["torch"]
    if torch_cell["status"] == "ok":
        assert table["resnet50_bf16"]["PyTorch img/s"] == f"{torch_cell['images_per_s']:.1f}"
        assert table["resnet50_bf16"]["JAX / PyTorch"] == f"{jax_row['ratio']:.2f}x"
        assert torch_cell["parameters"] == jax_row["cells"]["jax"]["parameters"]
    else:
        assert torch_cell["reason"] == "not installed"
    assert table["resnet50_bf16"]["goals"] == ("JAX >= 1.1x PyTorch: n/a; "
                                               "JAX >= 5000 img/s: n/a")
    dense_torch = rows["densenet121_fp32"]["cells"]["torch"]
    assert table["densenet121_fp32"]["notes"] == "tiny stand-in: simple_cnn" + (
        "" if dense_torch["status"] == "ok" else f"; torch: {dense_torch['reason']}")
    assert "WARNING: --tiny" in stdout


def test_tiny_budget_skips_every_cell_with_its_reason(tmp_path, capsys):
    report, table = run_main(["--tiny", "--budget-s", "0.001"], tmp_path, capsys)
    assert [r["id"] for r in report["rows"]] == ROW_IDS
    for row in report["rows"]:
        for part, cell in row["cells"].items():
            assert cell["status"] == "skipped", (row["id"], part)
            if cell["reason"] != "not installed":
                assert "of --budget-s 0.001 left" in cell["reason"]
        assert row["ratio"] is None
    assert table["resnet50_bf16"]["JAX img/s"] == "skipped"
    assert table["ova_resnet50"]["stacked img/s"] == "skipped"
    assert "jax: needs up to 30 s" in table["resnet50_bf16"]["notes"]


def test_budget_runs_the_cells_that_fit_and_skips_the_rest(tmp_path, capsys, monkeypatch):
    budgets = {**gpu_suite.SCALES["tiny"].budget_s, "loader:grain": 1.0,
               "jax:resnet50": 1000.0}
    monkeypatch.setitem(gpu_suite.SCALES, "tiny",
                        dataclasses.replace(gpu_suite.SCALES["tiny"], budget_s=budgets))
    report, table = run_main(["--tiny", "--only", "input_cached,resnet50_fp32",
                              "--budget-s", "100"], tmp_path, capsys)
    assert [r["id"] for r in report["rows"]] == ["resnet50_fp32", "input_cached"]
    cells = {r["id"]: r["cells"] for r in report["rows"]}
    assert cells["input_cached"]["loader"]["status"] == "ok"
    assert cells["resnet50_fp32"]["jax"]["status"] == "skipped"
    assert cells["resnet50_fp32"]["jax"]["reason"].startswith("needs up to 1000 s")
    assert table["resnet50_fp32"]["JAX img/s"] == "skipped"


def test_a_failing_cell_stays_in_its_row(tmp_path, capsys, monkeypatch):
    def out_of_memory(params, deadline):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB\nmore text")

    monkeypatch.setitem(gpu_suite.MEASURES, "jax_train", out_of_memory)
    monkeypatch.setattr(gpu_suite, "torch_installed", lambda: False)
    report, table = run_main(["--tiny", "--only", "resnet50_bf16,input_cached"], tmp_path,
                             capsys)
    row = report["rows"][0]
    assert row["cells"]["jax"] == {
        "status": "failed", "reason": "RuntimeError: RESOURCE_EXHAUSTED: Out of memory "
        "allocating 9 GiB", "budget_s": 30.0, "wall_s": pytest.approx(0, abs=1)}
    assert table["resnet50_bf16"]["JAX img/s"] == "failed"
    assert table["resnet50_bf16"]["PyTorch img/s"] == "not installed"
    assert "jax: RuntimeError: RESOURCE_EXHAUSTED" in table["resnet50_bf16"]["notes"]
    assert report["rows"][1]["cells"]["loader"]["status"] == "ok"


def test_full_scale_on_cpu_warns_that_figures_are_cpu_figures(tmp_path, capsys):
    report, _ = run_main(["--budget-s", "0.001", "--only", "resnet50_bf16"], tmp_path, capsys)
    assert report["scale"] == "full" and report["isolate"]
    assert any("CPU figures" in w for w in report["warnings"])
    assert [g["not_applicable"] for g in report["rows"][0]["goals"]] == ["no GPU", "no GPU"]
    assert report["rows"][0]["config"]["batch"] == 256
    assert report["rows"][0]["config"]["size"] == 224


def test_a_cell_in_its_own_process_runs_and_is_killed_at_its_budget():
    params = {**gpu_suite.SCALES["tiny"].pipeline, "size": 32, "channels": 1, "repeats": 1}
    cell = gpu_suite.Cell("input_cached", "loader", "input_cached", params, 60.0, 0)
    result = gpu_suite.run_isolated(cell, 120.0)
    assert result["status"] == "ok" and result["images_per_s"] > 0
    killed = gpu_suite.run_isolated(cell, 0.3)
    assert killed == {"status": "failed", "reason": "timed out: killed at its budget of 0.3 s"}


def test_densenet121_twin_matches_the_jax_model():
    torch = pytest.importorskip("torch")
    import jax

    import backbones

    model = backbones.create("densenet121", num_classes=4, head="linear")
    shapes = jax.eval_shape(lambda key: model.init(key, np.zeros((1, 32, 32, 3), np.float32)),
                            jax.random.PRNGKey(0))
    twin = gpu_suite.densenet121_twin(3, 4)
    assert gpu_suite.torch_parameters(twin) == sum(
        math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert twin(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
