"""Training / inference throughput of one backbone: images/s, compile time, TFLOP/s.

    python -m benchmarks.throughput --backbone resnet50 --batch-size 16 --image-size 64 \
        [--precision fp32] [--parallel shard_map] [--mode train|infer] [--steps 5] \
        [--reference torch] [--json OUT]
    python -m benchmarks.throughput --rows     # the three reference rows against torch
    python -m benchmarks.throughput --levers   # the rows: fp32 against bf16, remat, YNNPACK

Images/s is the median over --repeats timings of --steps steps after a warm-up; compile
time (the first call minus one steady step) is reported apart; FLOPs come from XLA's cost
analysis of the compiled per-device program. `--reference torch` times a plain-PyTorch twin
of the same architecture (simple_cnn, cnn16, resnet50; linear head; SGD with momentum as the
JAX side) in the same process, alternating JAX and torch timings so that a change of load
hits both, and prints the JAX / torch ratio with the load average; without torch installed
it prints a skip. Both sides use every core of the process (torch's default threads).

`--remat nothing|dots` wraps the model in `jax.checkpoint` (recompute every activation, or keep
only matmul outputs, in the backward pass); `--convolutions ynnpack|eigen` forces one CPU
convolution library (default: the engine's, `parallel.default_compiler_options()`: Eigen on
CPU); `--levers` times, per row, the default fp32 step against the bf16-compute, remat and
YNNPACK-convolution variants in one process, alternating, as ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import backbones
from backbones import training
from backbones.training.parallel import EIGEN_CONV_OPTIONS, DataParallel

# --convolutions: the engine's default (None), or XLA:CPU's YNNPACK or Eigen convolutions.
CONVOLUTIONS = {"default": None, "ynnpack": (), "eigen": tuple(EIGEN_CONV_OPTIONS.items())}

# Plain conv stacks of backbones/cnns.py (3x3 'same' conv + ReLU, 2x2 max-pool per block while
# the map allows it) and Keras-style ResNet50 (stride on the block's first 1x1, convs with
# bias, BN eps 1.001e-5), each with the "linear" head: global average pool + Linear.
TWINS = {"simple_cnn": (32, 64), "cnn16": (64, 64, 128, 128, 256, 256), "resnet50": None}
REMAT = {"none": None, "nothing": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.checkpoint_dots}


def torch_twin(name: str, channels: int, num_classes: int):
    """The PyTorch twin of backbone `name` (torch imported here: it is optional)."""
    from torch import nn

    class PlainCNN(nn.Module):
        def __init__(self, widths):
            super().__init__()
            self.convs = nn.ModuleList()
            c = channels
            for w in widths:
                self.convs.append(nn.Conv2d(c, w, 3, padding=1))
                c = w
            self.head = nn.Linear(c, num_classes)

        def forward(self, x):
            for conv in self.convs:
                x = nn.functional.relu(conv(x))
                if min(x.shape[-2:]) >= 2:
                    x = nn.functional.max_pool2d(x, 2)
            return self.head(x.mean((2, 3)))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1.001e-5, momentum=0.01)

    class Bottleneck(nn.Module):
        def __init__(self, c_in, filters, stride):
            super().__init__()
            self.shortcut = None
            if stride != 1 or c_in != 4 * filters:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, 4 * filters, 1, stride),
                                              bn(4 * filters))
            self.body = nn.Sequential(
                nn.Conv2d(c_in, filters, 1, stride), bn(filters), nn.ReLU(),
                nn.Conv2d(filters, filters, 3, padding=1), bn(filters), nn.ReLU(),
                nn.Conv2d(filters, 4 * filters, 1), bn(4 * filters))

        def forward(self, x):
            shortcut = x if self.shortcut is None else self.shortcut(x)
            return nn.functional.relu(shortcut + self.body(x))

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            layers = [nn.Conv2d(channels, 64, 7, 2, padding=3), bn(64), nn.ReLU(),
                      nn.ZeroPad2d(1), nn.MaxPool2d(3, 2)]
            c = 64
            for stage, blocks in enumerate((3, 4, 6, 3)):
                filters = 64 * 2 ** stage
                for b in range(blocks):
                    layers.append(Bottleneck(c, filters, 2 if b == 0 and stage > 0 else 1))
                    c = 4 * filters
            self.trunk = nn.Sequential(*layers)
            self.head = nn.Linear(c, num_classes)

        def forward(self, x):
            return self.head(self.trunk(x).mean((2, 3)))

    return ResNet50() if name == "resnet50" else PlainCNN(TWINS[name])


Call = Callable[[], object]


def _time(call: Call, steps: int) -> float:
    """Seconds per call over `steps` calls (`call` must block until done)."""
    start = time.perf_counter()
    for _ in range(steps):
        call()
    return (time.perf_counter() - start) / steps


def jax_setup(args: argparse.Namespace) -> tuple[Call, dict]:
    """The engine's own parallel train (or eval) step for one backbone, compiled and warm."""
    model = backbones.create(args.backbone, num_classes=args.num_classes, head="linear",
                             dtype=training.compute_dtype(args.precision), axis_name="batch")
    shape = (args.batch_size, args.image_size, args.image_size, args.channels)
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=1e-3))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, *shape[1:]))
    if REMAT[args.remat] is not None:
        state = state.replace(apply_fn=functools.partial(_remat_apply, model.apply,
                                                         REMAT[args.remat]))
    dp = DataParallel(args.parallel, compiler_options=CONVOLUTIONS[args.convolutions])
    dp.check_batch_size(args.batch_size)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=shape).astype(np.float32),
             "label": (np.arange(args.batch_size) % args.num_classes).astype(np.int32),
             "weight": np.ones(args.batch_size, np.float32)}
    step_fn = (training.make_train_step() if args.mode == "train"
               else training.make_eval_step())
    per_device = jax.jit(jax.shard_map(
        step_fn, mesh=training.data_parallel("shard_map", jax.devices()[:1]).mesh,
        in_specs=(P(), P("batch")),
        out_specs=(P(), P()) if args.mode == "train" else P("batch"), check_vma=False),
        compiler_options=dict(dp.compiler_options) or None)
    local = {k: v[:args.batch_size // dp.num_devices] for k, v in batch.items()}
    cost = per_device.lower(state, local).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) * dp.num_devices

    replicated = [dp.replicate(state)]
    if args.mode == "train":
        run = dp.train(step_fn)

        def call():
            replicated[0], metrics = run(replicated[0], batch)
            jax.block_until_ready(metrics)
    else:
        run = dp.predict(step_fn)
        image = {"image": batch["image"]}

        def call():
            jax.block_until_ready(run(replicated[0], image))

    first = _time(call, 1)
    step_s = _time(call, 1)  # one more warm-up step
    return call, {"framework": "jax", "compile_s": max(first - step_s, 0.0),
                  "gflop_per_step": flops / 1e9, "flops": flops,
                  "device": str(jax.devices()[0].device_kind), "devices": dp.num_devices,
                  "parameters": sum(int(np.size(x)) for x in jax.tree.leaves(
                      (state.params, state.batch_stats)))}


def _remat_apply(apply: Callable, policy: Callable, variables, images, **kw):
    """`apply(variables, images, **kw)` under jax.checkpoint with `policy`."""
    return jax.checkpoint(functools.partial(apply, **kw), policy=policy)(variables, images)


def torch_setup(args: argparse.Namespace) -> tuple[Call, dict] | None:
    """The PyTorch twin's step (SGD, momentum 0.9 as the JAX side), warm; None without torch."""
    try:
        import torch
    except ImportError:
        print("skip --reference torch: torch is not installed (pip install torch)")
        return None
    model = torch_twin(args.backbone, args.channels, args.num_classes)
    x = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size)
    y = torch.arange(args.batch_size) % args.num_classes
    if args.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def call():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    else:
        model.eval()

        def call():
            with torch.no_grad():
                model(x)
    call()
    call()
    return call, {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                  "parameters": sum(p.numel() for p in model.parameters()) + sum(
                      b.numel() for n, b in model.named_buffers() if "running" in n)}


def _alternate(setups: dict[str, tuple[Call, dict]], repeats: int, steps: int
               ) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per step of every setup, `repeats` timings each, taken in turn so that a change
    of load hits all of them; and the 1-minute load average before and after."""
    times: dict[str, list[float]] = {k: [] for k in setups}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for name, (call, _) in setups.items():
            times[name].append(_time(call, steps))
    load.append(os.getloadavg()[0])
    return times, load


def measure(args: argparse.Namespace) -> dict:
    """Time the JAX step (and the torch twin), alternating their timings so load hits both.

    Images/s is the median over --repeats timings of --steps steps; `load` is the 1-minute
    load average before and after.
    """
    setups = {"jax": jax_setup(args)}
    if args.reference:
        setups["torch"] = torch_setup(args)
    setups = {k: v for k, v in setups.items() if v}
    times, load = _alternate(setups, args.repeats, args.steps)
    results: dict = {"config": vars(args), "load": load, "cores": len(os.sched_getaffinity(0))}
    for name, (_, info) in setups.items():
        step_s = statistics.median(times[name])
        results[name] = {**info, "images_per_s": args.batch_size / step_s,
                         "step_ms": 1e3 * step_s}
    jax_row = results["jax"]
    jax_row["tflop_per_s"] = jax_row.pop("flops") / (1e-3 * jax_row["step_ms"]) / 1e12
    if "torch" in results:
        if results["torch"]["parameters"] != jax_row["parameters"]:
            print(f"warning: parameter counts differ (jax {jax_row['parameters']}, "
                  f"torch {results['torch']['parameters']}): not the same architecture")
        results["jax_over_torch"] = jax_row["images_per_s"] / results["torch"]["images_per_s"]
    return results


def print_table(args: argparse.Namespace, results: dict) -> None:
    rows = [r for r in (results["jax"], results.get("torch")) if r]
    print(f"| {args.backbone} {args.mode} b={args.batch_size} {args.image_size}px "
          f"{args.precision} | images/s | step ms | compile s | TFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        tflops = f"{r['tflop_per_s']:.3f}" if "tflop_per_s" in r else "-"
        print(f"| {r['framework']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
              f"{compile_s} | {tflops} |")
    if "jax_over_torch" in results:
        print(f"JAX / torch images/s: {results['jax_over_torch']:.2f} "
              f"(torch threads {results['torch']['threads']}, {results['cores']} cores, "
              f"load {results['load'][0]:.1f} -> {results['load'][1]:.1f})")


# The reference rows: (backbone, batch size) at 64 px, trained, fp32.
ROWS = (("resnet50", 16), ("simple_cnn", 32), ("cnn16", 32))


LEVERS = {"fp32": {}, "bf16": {"precision": "bf16"}, "remat nothing": {"remat": "nothing"},
          "remat dots": {"remat": "dots"}, "ynnpack conv": {"convolutions": "ynnpack"}}


def run_levers(args: argparse.Namespace) -> list[dict]:
    """Per row of ROWS, each lever's JAX step against the plain fp32 one, timings alternated
    in one process; one markdown table of images/s and ratios."""
    out = []
    for backbone, batch_size in ROWS:
        base = {**vars(args), "backbone": backbone, "batch_size": batch_size, "image_size": 64,
                "mode": "train", "precision": "fp32", "remat": "none",
                "convolutions": "default"}
        setups = {name: jax_setup(argparse.Namespace(**{**base, **change}))
                  for name, change in LEVERS.items()}
        times, load = _alternate(setups, args.repeats, args.steps)
        ips = {k: batch_size / statistics.median(v) for k, v in times.items()}
        out.append({"backbone": backbone, "batch_size": batch_size, "images_per_s": ips,
                    "load": load})
    print("| row | " + " | ".join(f"{k} img/s" for k in LEVERS) + " | "
          + " | ".join(f"{k} / fp32" for k in list(LEVERS)[1:]) + " | load avg (1 min) |")
    print("|---|" + "---:|" * (2 * len(LEVERS) - 1) + "---|")
    for r in out:
        ips = r["images_per_s"]
        print(f"| {r['backbone']} 64px b={r['batch_size']} | "
              + " | ".join(f"{ips[k]:.1f}" for k in LEVERS) + " | "
              + " | ".join(f"{ips[k] / ips['fp32']:.2f}" for k in list(LEVERS)[1:])
              + f" | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    return out


def run_rows(args: argparse.Namespace) -> list[dict]:
    """Measure ROWS against the torch twins, one after another; print one markdown table."""
    out = []
    for backbone, batch_size in ROWS:
        row_args = argparse.Namespace(**{**vars(args), "backbone": backbone,
                                         "batch_size": batch_size, "image_size": 64,
                                         "mode": "train", "reference": "torch"})
        out.append(measure(row_args))
    print("| row | JAX img/s | torch img/s | JAX / torch | load avg (1 min) |")
    print("|---|---:|---:|---:|---|")
    for r in out:
        c = r["config"]
        torch_ips = r["torch"]["images_per_s"] if "torch" in r else float("nan")
        print(f"| {c['backbone']} 64px b={c['batch_size']} {c['precision']} | "
              f"{r['jax']['images_per_s']:.1f} | {torch_ips:.1f} | "
              f"{r.get('jax_over_torch', float('nan')):.2f} | "
              f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", choices=backbones.names())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=training.PRECISIONS)
    parser.add_argument("--remat", default="none", choices=tuple(REMAT),
                        help="jax.checkpoint policy around the model (a CPU lever)")
    parser.add_argument("--convolutions", default="default", choices=tuple(CONVOLUTIONS),
                        help="XLA:CPU's convolution library (a CPU lever)")
    parser.add_argument("--parallel", default="shard_map", choices=training.PARALLEL_MODES)
    parser.add_argument("--mode", default="train", choices=("train", "infer"))
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings; the median is kept")
    parser.add_argument("--reference", choices=("torch",), default=None)
    parser.add_argument("--rows", action="store_true",
                        help="the three reference rows (resnet50 b16, simple_cnn b32, cnn16 b32, "
                             "64 px) against torch, one table")
    parser.add_argument("--levers", action="store_true",
                        help="the three rows: fp32 against bf16 compute, remat and YNNPACK "
                             "convolutions, one table")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not (args.rows or args.levers) and not args.backbone:
        parser.error("--backbone is required (or --rows / --levers)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.levers:
        results = run_levers(args)
    elif args.rows:
        results = run_rows(args)
    else:
        if args.reference and args.backbone not in TWINS:
            raise SystemExit(f"error: --reference torch has twins for {', '.join(TWINS)}, "
                             f"not {args.backbone}")
        results = measure(args)
        print_table(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
