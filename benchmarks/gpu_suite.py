"""The GPU benchmark suite: one command, one GPU, at most `--budget-s` seconds (default 480).

    python -m benchmarks.gpu_suite [--json OUT] [--budget-s 480] [--only ROW,ROW] [--tiny]

Rows:
  train   ResNet50 and DenseNet121 at 224 px, bf16 and fp32: training images/s of the engine's
          own train step (JAX) beside a PyTorch twin on the same device, set up as a user
          would (torch.compile, channels_last, cuDNN autotuning, AMP bf16 autocast for the bf16
          rows, plain fp32 for the fp32 rows).
  ova     one-vs-all with K = 4 members of simple_cnn and of ResNet50: the vmapped member group (`--members stacked`) vs the
          same members one after another (one image = one image through all K members).
  input   the Grain loader reading the decode-once array store (uint8 out), when it exists.
Each figure is the median images/s over repeats after a warm-up step; the first step minus
a steady one is the compile time; peak memory is the device's peak bytes in use.

Every cell (one framework or mode of a row) has its own time budget and runs only if that
budget still fits in what is left of `--budget-s`; otherwise it is reported as skipped with
the reason, so the suite never overruns. At full scale each cell runs in its own process,
killed at its budget (clean per-cell peak memory; an OOM or crash stays in its row); cells
run highest priority first, rows print in a fixed order. `--tiny` runs tiny stand-ins (small
CNNs, 32 px, a few steps, in-process) so the same rows run on a CPU in seconds: it checks the
script, it does not measure. Prints markdown tables (progress goes to stderr) and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

NUM_CLASSES = 4
OVA_MEMBERS = 4
GOAL_JAX_OVER_TORCH = 1.1
GOAL_RESNET50_BF16 = 5000.0
GOAL_STACKED_OVER_SEQUENTIAL = 2.5
GOAL_DEVICES = ("H100", "H200")
GIB = 2.0 ** 30

Result = dict[str, Any]


# Seconds each cell may take at full scale on one H200 (process start, compile, timing);
# keys are "<cell part>:<row model>".
FULL_BUDGET_S = {"jax:resnet50": 90.0, "torch:resnet50": 120.0, "jax:densenet121": 120.0,
                 "torch:densenet121": 150.0, "stacked:simple_cnn": 45.0,
                 "sequential:simple_cnn": 45.0, "stacked:resnet50": 120.0,
                 "sequential:resnet50": 90.0, "loader:grain": 60.0}


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one scale: `full` for a GPU, `tiny` to check the script on a CPU."""

    image_size: int
    train_batch: int
    ova_batch: dict[str, int]
    steps: int
    repeats: int
    stand_in: str | None            # the model every row runs instead of its own (tiny)
    torch_backend: str              # torch.compile backend
    pipeline: dict[str, int]
    budget_s: dict[str, float]      # FULL_BUDGET_S's keys
    isolate: bool                   # one process per cell


SCALES = {
    "full": Scale(
        image_size=224, train_batch=256, ova_batch={"simple_cnn": 256, "resnet50": 128},
        steps=10, repeats=5, stand_in=None, torch_backend="inductor",
        pipeline={"count": 512, "source_size": 256, "batch": 64, "epochs": 4, "workers": 4},
        budget_s=FULL_BUDGET_S, isolate=True),
    "tiny": Scale(
        image_size=32, train_batch=4, ova_batch={"simple_cnn": 4, "resnet50": 4},
        steps=2, repeats=2, stand_in="simple_cnn", torch_backend="eager",
        pipeline={"count": 32, "source_size": 48, "batch": 8, "epochs": 2, "workers": 0},
        budget_s=dict.fromkeys(FULL_BUDGET_S, 30.0), isolate=False),
}

# Row ids in print order; the number is the run priority (0 first) of each of the row's cells.
TRAIN_ROWS = {"resnet50_bf16": (0, 1), "resnet50_fp32": (9, 10),
              "densenet121_bf16": (7, 8), "densenet121_fp32": (11, 12)}
OVA_ROWS = {"ova_simple_cnn": (2, 3), "ova_resnet50": (5, 6)}
INPUT_ROWS = {"input_cached": (4,)}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: `kind` names the function in MEASURES, `params` its arguments."""

    row: str
    part: str
    kind: str
    params: dict[str, Any]
    budget_s: float
    priority: int


# -- the plan ---------------------------------------------------------------------------


def plan(scale: Scale, device: str) -> list[dict[str, Any]]:
    """The rows of the suite (print order), each with its cells and row-level facts."""
    rows = []
    for row_id, priorities in TRAIN_ROWS.items():
        model, precision = row_id.split("_")
        run = scale.stand_in or model
        params = {"model": run, "precision": precision, "batch": scale.train_batch,
                  "size": scale.image_size, "channels": 3, "steps": scale.steps,
                  "repeats": scale.repeats, "device": device,
                  "torch_backend": scale.torch_backend}
        cells = [Cell(row_id, part, f"{part}_train", params, scale.budget_s[f"{part}:{model}"],
                      priority) for part, priority in zip(("jax", "torch"), priorities)]
        rows.append(_row(row_id, "train", model, run, params, cells))
    for row_id, priorities in OVA_ROWS.items():
        model = row_id.removeprefix("ova_")
        run = scale.stand_in or model
        params = {"model": run, "precision": "bf16", "batch": scale.ova_batch[model],
                  "size": scale.image_size, "channels": 1, "members": OVA_MEMBERS,
                  "steps": scale.steps, "repeats": scale.repeats}
        cells = [Cell(row_id, part, f"ova_{part}", params, scale.budget_s[f"{part}:{model}"],
                      priority) for part, priority in zip(("stacked", "sequential"), priorities)]
        rows.append(_row(row_id, "ova", model, run, params, cells))
    for row_id, priorities in INPUT_ROWS.items():
        params = {**scale.pipeline, "size": scale.image_size, "channels": 1,
                  "repeats": scale.repeats}
        cells = [Cell(row_id, "loader", "input_cached", params, scale.budget_s["loader:grain"],
                      priorities[0])]
        rows.append(_row(row_id, "input", "grain loader", "grain loader", params, cells))
    return rows


def _row(row_id: str, section: str, model: str, run: str, params: dict,
         cells: list[Cell]) -> dict[str, Any]:
    return {"id": row_id, "section": section, "model": model,
            "stand_in": run if run != model else None,
            "config": {k: v for k, v in params.items() if k not in ("device",)},
            "cells": {c.part: c for c in cells}}


# -- timing helpers ---------------------------------------------------------------------


def time_steps(step: Callable[[], None], sync: Callable[[], None], *, images_per_step: int,
               steps: int, repeats: int, deadline: float) -> Result:
    """Median images/s of `repeats` timings of `steps` steps after a compile and a warm-up
    step; stops repeating (keeping at least one timing) once `deadline` has passed."""
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    step()
    sync()
    times: list[float] = []
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times) / steps
    return {"images_per_s": images_per_step / step_s, "step_ms": 1e3 * step_s,
            "compile_s": max(first - step_s, 0.0), "repeats": len(times), "steps": steps}


def jax_peak_bytes() -> int | None:
    """Peak bytes in use on the first local device, where the backend reports it."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _count(tree: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# -- JAX cells --------------------------------------------------------------------------
# Project modules are imported inside the cells: a missing dependency fails its rows only.


def _one_device_parallel():
    from backbones import training
    return training.data_parallel("shard_map", jax.devices()[:1])


def _on_device(dp, tree: Any) -> Any:
    """Put a batch on the device, split on its leading axis as the parallel step expects."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from backbones.training.parallel import AXIS
    return jax.device_put(tree, NamedSharding(dp.mesh, P(AXIS)))


def _images(p: dict) -> np.ndarray:
    shape = (p["batch"], p["size"], p["size"], p["channels"])
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def time_jax_step(run: Callable, state: Any, batch: Any, p: dict, deadline: float,
                  parameters: int) -> Result:
    """`time_steps` of a wrapped train step `run(state, batch) -> (state, metrics)`, with the
    device's peak memory."""
    carry = [state, None]

    def step() -> None:
        carry[0], carry[1] = run(carry[0], batch)

    timing = time_steps(step, lambda: jax.block_until_ready(carry), images_per_step=p["batch"],
                        steps=p["steps"], repeats=p["repeats"], deadline=deadline)
    return {**timing, "peak_bytes": jax_peak_bytes(), "parameters": parameters,
            "framework": f"jax {jax.__version__}", "device": jax.devices()[0].device_kind}


def jax_train(p: dict, deadline: float) -> Result:
    """The engine's train step (Adam) on one device: what `python -m experiments.*` runs."""
    import backbones
    from backbones import training

    model = backbones.create(p["model"], num_classes=NUM_CLASSES, head="linear",
                             dtype=training.compute_dtype(p["precision"]),
                             axis_name=training.parallel.AXIS)
    tx = training.make_optimizer(training.OptimConfig(optimizer="adam", learning_rate=1e-3))
    input_shape = (1, p["size"], p["size"], p["channels"])
    dp = _one_device_parallel()
    state = dp.replicate(jax.jit(lambda key: training.create_train_state(
        model, tx, key, input_shape))(jax.random.PRNGKey(0)))
    batch = _on_device(dp, {"image": _images(p),
                            "label": np.arange(p["batch"], dtype=np.int32) % NUM_CLASSES,
                            "weight": np.ones(p["batch"], np.float32)})
    return time_jax_step(dp.train(training.make_train_step()), state, batch, p, deadline,
                         _count((state.params, state.batch_stats)))


def _ova_setup(p: dict):
    """Model, state factory, relabel table, class weights, member keys and the batch."""
    import optax

    import backbones
    from backbones import training
    from backbones.registry import resolve_head
    from ensembles.training import members
    model = backbones.create(p["model"], num_classes=2, head=resolve_head("auto", p["model"]),
                             dtype=training.compute_dtype(p["precision"]),
                             axis_name=training.parallel.AXIS)
    shape = (1, p["size"], p["size"], p["channels"])
    make = jax.jit(lambda key: training.create_train_state(model, optax.adam(1e-3), key, shape))
    k = p["members"]
    labels = (np.arange(p["batch"]) % k).astype(np.int32)
    return (make, np.eye(k, dtype=np.int32), np.ones((k, 2), np.float32),
            members.member_keys(jax.random.PRNGKey(0), range(k)), _images(p), labels)


def ova_stacked(p: dict, deadline: float) -> Result:
    """K members as one vmapped member group (`ensembles.training.members.stacked_train_step`)."""
    from backbones import training
    from ensembles.training import members
    make, table, weights, keys, images, labels = _ova_setup(p)
    dp = _one_device_parallel()
    state = dp.replicate(jax.jit(jax.vmap(make))(keys))
    run = dp.train(members.stacked_train_step(training.make_train_step(), table, weights))
    return time_jax_step(run, state, _on_device(dp, {"image": images, "label": labels}), p,
                         deadline, _count((state.params, state.batch_stats)))


def ova_sequential(p: dict, deadline: float) -> Result:
    """The same K members one after another with the plain step (`--members sequential`):
    one step here is one step of every member, so images/s compares with the stacked mode."""
    from backbones import training
    from ensembles.training import members
    make, table, weights, keys, images, labels = _ova_setup(p)
    dp = _one_device_parallel()
    states = [dp.replicate(make(keys[m])) for m in range(p["members"])]
    plain = dp.train(training.make_train_step())
    runs = [members.relabel_for_member(plain, table[m], weights[m])
            for m in range(p["members"])]

    def every_member(states: list, batch: dict) -> tuple[list, Any]:
        done = [run(state, batch) for run, state in zip(runs, states, strict=True)]
        return [state for state, _ in done], [metrics for _, metrics in done]

    return time_jax_step(every_member, states, {"image": _on_device(dp, images),
                                                "label": labels}, p, deadline,
                         sum(_count((s.params, s.batch_stats)) for s in states))


# -- PyTorch cells ----------------------------------------------------------------------


def densenet121_twin(channels: int, num_classes: int):
    """DenseNet121 in PyTorch mirroring backbones/densenet.py (linear head): torchvision is
    not a dependency. Concatenating per layer, as the JAX model does."""
    import torch
    from torch import nn

    from backbones.densenet import BLOCKS, BN_EPSILON, GROWTH_RATE

    def bn_relu(c: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(c, eps=BN_EPSILON), nn.ReLU()]

    class DenseLayer(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.body = nn.Sequential(
                *bn_relu(c), nn.Conv2d(c, 4 * GROWTH_RATE, 1, bias=False),
                *bn_relu(4 * GROWTH_RATE), nn.Conv2d(4 * GROWTH_RATE, GROWTH_RATE, 3,
                                                     padding=1, bias=False))

        def forward(self, x):
            return torch.cat([x, self.body(x)], 1)

    layers: list[nn.Module] = [nn.Conv2d(channels, 64, 7, 2, padding=3, bias=False),
                               *bn_relu(64), nn.ZeroPad2d(1), nn.MaxPool2d(3, 2)]
    c = 64
    for stage, num_blocks in enumerate(BLOCKS):
        for _ in range(num_blocks):
            layers.append(DenseLayer(c))
            c += GROWTH_RATE
        if stage < len(BLOCKS) - 1:
            layers += [*bn_relu(c), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
    layers += [*bn_relu(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def torch_model(name: str, channels: int, num_classes: int):
    """The PyTorch twin of backbone `name` (DenseNet121 here, the others in throughput.py)."""
    if name == "densenet121":
        return densenet121_twin(channels, num_classes)
    from benchmarks.throughput import torch_twin
    return torch_twin(name, channels, num_classes)


def torch_parameters(model) -> int:
    """Parameters plus BatchNorm running statistics: JAX's params + batch_stats."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "running" in n)


def torch_train(p: dict, deadline: float) -> Result:
    """The PyTorch twin's train step (Adam) as a user sets it up for speed."""
    import torch
    import torch.nn.functional as F

    device = "cuda" if p["device"] == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return skipped(f"torch {torch.__version__} sees no CUDA device")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    model = torch_model(p["model"], p["channels"], NUM_CLASSES).to(
        device, memory_format=torch.channels_last)
    compiled = torch.compile(model, backend=p["torch_backend"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(_images(p)).permute(0, 3, 1, 2).to(
        device, memory_format=torch.channels_last)
    y = torch.arange(p["batch"], device=device) % NUM_CLASSES
    amp = p["precision"] == "bf16"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timing = time_steps(step, sync, images_per_step=p["batch"], steps=p["steps"],
                        repeats=p["repeats"], deadline=deadline)
    cuda = device == "cuda"
    return {**timing, "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "parameters": torch_parameters(model), "framework": f"torch {torch.__version__}",
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn": torch.backends.cudnn.allow_tf32}}


# -- the input pipeline -----------------------------------------------------------------


def input_cached(p: dict, deadline: float) -> Result:
    """Images/s of the Grain loader over the decode-once array store, uint8 out (the device
    finishes), after the first batch; the synthetic dataset and the store are built first."""
    try:
        from data_pipeline.array_cache import cached_source
    except ImportError as e:
        return skipped(f"no cached array path in this checkout ({e})")
    from data_pipeline.datasets import load_dataset
    from data_pipeline.loader import make_loader
    from data_pipeline.preprocess import PreprocessConfig

    start = time.perf_counter()
    ds = load_dataset("synthetic_cxr", cache_dir=Path(tempfile.gettempdir()) / "cxr-gpu-suite",
                      count=p["count"], image_size=p["source_size"], seed=0)
    cfg = PreprocessConfig(image_size=p["size"], channels=p["channels"])
    if cached_source(ds.source, cfg) is None:
        return skipped("the synthetic dataset has no array store")
    build_s = time.perf_counter() - start
    rates: list[float] = []
    while len(rates) < p["repeats"] and (not rates or time.perf_counter() < deadline):
        loader = make_loader(ds.source, np.arange(len(ds.source)), batch_size=p["batch"],
                             preprocess=cfg, seed=len(rates), num_epochs=p["epochs"],
                             worker_count=p["workers"], cache_arrays=True,
                             finish_on_host=False)
        batches = iter(loader)
        next(batches)  # worker start-up and first reads are not throughput
        start, n = time.perf_counter(), 0
        for batch in batches:
            n += len(batch["label"])
        rates.append(n / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "build_s": build_s,
            "repeats": len(rates), "examples": len(ds.source)}


MEASURES: dict[str, Callable[[dict, float], Result]] = {
    "jax_train": jax_train, "torch_train": torch_train, "ova_stacked": ova_stacked,
    "ova_sequential": ova_sequential, "input_cached": input_cached}


# -- running cells within the budget ----------------------------------------------------


def skipped(reason: str) -> Result:
    return {"status": "skipped", "reason": reason}


def failed(reason: str) -> Result:
    return {"status": "failed", "reason": reason}


def _error_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:300]


def run_here(cell: Cell, limit_s: float) -> Result:
    """Run a cell in this process; its failure (OOM, a missing module) becomes its result.
    The budget is soft here: only the repeats stop at it."""
    try:
        result = MEASURES[cell.kind](cell.params, time.perf_counter() + limit_s)
    except Exception as e:  # noqa: BLE001 -- each row reports its own failure
        return failed(_error_line(e))
    return {"status": "ok", **result} if "status" not in result else result


def run_isolated(cell: Cell, limit_s: float) -> Result:
    """Run a cell in a fresh process of its own, killed (with its children) at `limit_s`."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        command = [sys.executable, "-m", "benchmarks.gpu_suite", "--cell",
                   json.dumps(dataclasses.asdict(cell)), "--cell-out", str(out),
                   "--cell-limit-s", str(0.9 * limit_s)]
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        with open(log, "w") as log_file:
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env, cwd=root, start_new_session=True)
            try:
                proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return failed(f"timed out: killed at its budget of {limit_s:g} s")
        if out.exists():
            return json.loads(out.read_text())
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        return failed(f"process exited {proc.returncode}: {' '.join(tail)[:300]}")


def cell_main(spec: str, out: str, limit_s: float) -> int:
    """Child side of `run_isolated`: run one cell here and write its result to `out`."""
    fields = json.loads(spec)
    Path(out).write_text(json.dumps(run_here(Cell(**fields), limit_s)))
    return 0


def run_cells(rows: list[dict], *, budget_s: float, start: float, isolate: bool,
              has_torch: bool) -> None:
    """Replace every row's cells by their results, highest priority first, within budget."""
    cells = sorted((c for r in rows for c in r["cells"].values()), key=lambda c: c.priority)
    results: dict[tuple[str, str], Result] = {}
    for cell in cells:
        left = budget_s - (time.perf_counter() - start)
        if cell.kind == "torch_train" and not has_torch:
            result = skipped("not installed")
        elif left < cell.budget_s:
            result = skipped(f"needs up to {cell.budget_s:.0f} s; {max(left, 0):.0f} s of "
                             f"--budget-s {budget_s:g} left")
        else:
            began = time.perf_counter()
            result = (run_isolated if isolate else run_here)(cell, cell.budget_s)
            result["wall_s"] = time.perf_counter() - began
        result["budget_s"] = cell.budget_s
        results[cell.row, cell.part] = result
        print(f"[gpu_suite {time.perf_counter() - start:.0f} s] {cell.row}/{cell.part}: "
              f"{_progress(result)}", file=sys.stderr, flush=True)
    for row in rows:
        row["cells"] = {part: results[row["id"], part] for part in row["cells"]}


def _progress(result: Result) -> str:
    if result["status"] != "ok":
        return f"{result['status']}: {result['reason']}"
    return f"{result['images_per_s']:.1f} img/s in {result.get('wall_s', 0):.1f} s"


# -- ratios and goals -------------------------------------------------------------------


def _rate(cell: Result) -> float | None:
    return cell.get("images_per_s") if cell["status"] == "ok" else None


def _ratio(a: Result, b: Result) -> float | None:
    ra, rb = _rate(a), _rate(b)
    return ra / rb if ra and rb else None


def _goal(name: str, value: float | None, target: float, not_applicable: str | None
          ) -> dict[str, Any]:
    """A goal beside its figure; `not_applicable` says why it does not apply here."""
    met = None if not_applicable or value is None else value >= target
    return {"goal": name, "target": target, "value": value, "met": met,
            "not_applicable": not_applicable}


def score(rows: list[dict], device: dict[str, Any], tiny: bool) -> None:
    """Add each row's ratio and goals; the goals are GPU goals (ResNet50's an H100/H200 one)."""
    kind = device["jax_device_kind"]
    off = "tiny mode" if tiny else "no GPU" if device["jax_backend"] == "cpu" else None
    big_gpu = off or (None if any(d in kind for d in GOAL_DEVICES)
                      else f"not an H100/H200 ({kind})")
    for row in rows:
        cells = row["cells"]
        if row["section"] == "train":
            row["ratio"] = _ratio(cells["jax"], cells["torch"])
            row["goals"] = [_goal(f"JAX >= {GOAL_JAX_OVER_TORCH}x PyTorch", row["ratio"],
                                  GOAL_JAX_OVER_TORCH, off)]
            if row["id"] == "resnet50_bf16":
                row["goals"].append(_goal(f"JAX >= {GOAL_RESNET50_BF16:.0f} img/s",
                                          _rate(cells["jax"]), GOAL_RESNET50_BF16, big_gpu))
        elif row["section"] == "ova":
            row["ratio"] = _ratio(cells["stacked"], cells["sequential"])
            row["goals"] = ([_goal(f"stacked >= {GOAL_STACKED_OVER_SEQUENTIAL}x sequential",
                                   row["ratio"], GOAL_STACKED_OVER_SEQUENTIAL, off)]
                            if row["model"] == "simple_cnn" else [])
        else:
            row["ratio"], row["goals"] = None, []


# -- the report -------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def cell_text(cell: Result, key: str, digits: int = 1, scale: float = 1.0) -> str:
    """One figure of a cell, or its status when it did not run."""
    if cell["status"] != "ok":
        return "not installed" if cell["reason"] == "not installed" else cell["status"]
    value = cell.get(key)
    return fmt(None if value is None else value / scale, digits)


def goal_mark(goal: dict) -> str:
    """met / missed / n/a (does not apply here) / - (no figure)."""
    if goal["not_applicable"]:
        return "n/a"
    return {True: "met", False: "missed", None: "-"}[goal["met"]]


def goals_text(row: dict) -> str:
    return "; ".join(f"{g['goal']}: {goal_mark(g)}" for g in row["goals"]) or "-"


def notes_text(row: dict) -> str:
    """Stand-in, why a cell did not run, and a warning when the two sides' sizes differ."""
    cells = row["cells"]
    notes = [f"tiny stand-in: {row['stand_in']}"] if row["stand_in"] else []
    notes += [f"{part}: {c['reason']}" for part, c in cells.items() if c["status"] != "ok"]
    counts = {part: c["parameters"] for part, c in cells.items() if c.get("parameters")}
    if len(set(counts.values())) > 1:
        notes.append("parameter counts differ: " + ", ".join(f"{p} {n}" for p, n in
                                                             counts.items()))
    return "; ".join(notes).replace("|", "\\|") or "-"


def _config(row: dict) -> str:
    c = row["config"]
    return f"{c['size']} px, batch {c['batch']}" + (f", {c['precision']}" if "precision" in c
                                                     else f", {c['workers']} workers")


def _pair_columns(a: str, a_name: str, b: str, b_name: str, ratio: str) -> list[tuple]:
    """Columns for a row that compares cell `a` with cell `b`."""
    columns = []
    for part, name in ((a, a_name), (b, b_name)):
        columns += [(f"{name} img/s", lambda r, p=part: cell_text(r["cells"][p], "images_per_s")),
                    (f"{name} compile s", lambda r, p=part: cell_text(r["cells"][p], "compile_s")),
                    (f"{name} peak GiB",
                     lambda r, p=part: cell_text(r["cells"][p], "peak_bytes", 2, GIB))]
    return columns + [(ratio, lambda r: fmt(r["ratio"], 2) + ("x" if r["ratio"] else ""))]


SECTIONS = {
    "train": ("Training step, JAX engine vs PyTorch twin",
              _pair_columns("jax", "JAX", "torch", "PyTorch", "JAX / PyTorch")),
    "ova": (f"One-vs-all, K = {OVA_MEMBERS}: stacked (vmapped) vs sequential members",
            _pair_columns("stacked", "stacked", "sequential", "sequential",
                          "stacked / sequential")),
    "input": ("Input pipeline from the array store (host, uint8 out)",
              [("img/s", lambda r: cell_text(r["cells"]["loader"], "images_per_s")),
               ("build s", lambda r: cell_text(r["cells"]["loader"], "build_s"))]),
}


def table(rows: list[dict], section: str) -> list[str]:
    """The markdown table of one section."""
    title, columns = SECTIONS[section]
    head = ["row", "model", "config", *(name for name, _ in columns), "goals", "notes"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for row in (r for r in rows if r["section"] == section):
        values = [row["id"], row["model"], _config(row), *(get(row) for _, get in columns),
                  goals_text(row), notes_text(row)]
        lines.append("| " + " | ".join(values) + " |")
    return lines + [""]


def header(report: dict) -> list[str]:
    """What ran where, under which budget, and the warnings."""
    d = report["device"]
    torch_cells = [c for r in report["rows"] for p, c in r["cells"].items()
                   if p == "torch" and c["status"] == "ok"]
    torch_line = (f"{torch_cells[0]['framework']} on {torch_cells[0]['device']}" if torch_cells
                  else "no PyTorch figures")
    lines = [f"## cxr-ensembles GPU suite ({report['scale']})", "",
             f"- JAX {d['jax_version']} on {d['jax_backend']}: {d['jax_device_kind']} "
             f"({d['jax_devices']} device(s)); PyTorch: {torch_line}",
             f"- PyTorch setup: torch.compile (backend {report['torch_backend']}), channels_last, "
             "cudnn.benchmark, AMP bf16 autocast in bf16 rows, plain fp32 in fp32 rows; Adam "
             "in both frameworks",
             f"- budget {report['budget_s']:g} s, used {report['elapsed_s']:.0f} s; one process "
             f"per cell: {'yes' if report['isolate'] else 'no'}; img/s is the median after a "
             "warm-up step",
             f"- goals: JAX >= {GOAL_JAX_OVER_TORCH}x PyTorch on the same GPU; ResNet50 bf16 >= "
             f"{GOAL_RESNET50_BF16:,.0f} img/s on one H100/H200; stacked OvA >= "
             f"{GOAL_STACKED_OVER_SEQUENTIAL}x sequential for small CNNs", ""]
    return lines + [f"**WARNING: {w}**" for w in report["warnings"]] + [""]


def render(report: dict) -> str:
    lines = header(report)
    for section in SECTIONS:
        lines += table(report["rows"], section)
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the whole suite's wall-clock budget; cells that do not fit skip")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated row ids ({', '.join(_row_ids())})")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny stand-ins on CPU in seconds: checks the script, no figures")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="one process per cell (auto: yes at full scale, no with --tiny)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--cell-out", help=argparse.SUPPRESS)
    parser.add_argument("--cell-limit-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set((args.only or "").split(",")) - set(_row_ids()) - {""}
    if unknown:
        parser.error(f"unknown row(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(_row_ids())}")
    return args


def _row_ids() -> list[str]:
    return [*TRAIN_ROWS, *OVA_ROWS, *INPUT_ROWS]


def torch_installed() -> bool:
    """Whether torch can be imported (without importing it: that costs seconds)."""
    return importlib.util.find_spec("torch") is not None


def device_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {"jax_version": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_device_kind": dev.device_kind, "jax_devices": jax.device_count(),
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


def run_suite(args: argparse.Namespace) -> dict:
    """Plan, run within the budget, score: the report as a JSON-able dict."""
    start = time.perf_counter()
    # JAX must not take 75% of the GPU up front: this process only plans, the cells (and
    # PyTorch) need the memory. Cell processes inherit the setting.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    scale = SCALES["tiny" if args.tiny else "full"]
    device = device_info()
    rows = plan(scale, "cpu" if device["jax_backend"] == "cpu" else "gpu")
    if args.only:
        rows = [r for r in rows if r["id"] in args.only.split(",")]
    isolate = scale.isolate if args.isolate == "auto" else args.isolate == "yes"
    run_cells(rows, budget_s=args.budget_s, start=start, isolate=isolate,
              has_torch=torch_installed())
    score(rows, device, args.tiny)
    warnings = []
    if device["jax_backend"] == "cpu" and not args.tiny:
        warnings.append("no GPU: JAX runs on the CPU, so these are CPU figures, not GPU ones")
    if args.tiny:
        warnings.append("--tiny: tiny stand-ins on tiny inputs check the script; the figures "
                        "measure nothing")
    return {"scale": "tiny" if args.tiny else "full", "budget_s": args.budget_s,
            "elapsed_s": time.perf_counter() - start, "isolate": isolate,
            "torch_backend": scale.torch_backend, "device": device, "warnings": warnings,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell:
        return cell_main(args.cell, args.cell_out, args.cell_limit_s)
    report = run_suite(args)
    print(render(report), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
