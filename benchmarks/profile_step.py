"""Where a CPU train step spends its time: sub-function timings and an XLA op profile.

    python -m benchmarks.profile_step --backbone resnet50 --batch-size 16 --image-size 64 \
        [--precision fp32] [--convolutions default|ynnpack|eigen] [--steps 3] [--repeats 3]

Times, interleaved in one process so that load changes hit each alike: the forward pass
(train mode, + loss), forward + backward (`jax.grad`), the optimiser update alone, and the
engine's full step (`DataParallel.train`: jit + shard_map + donation); with torch installed,
the PyTorch twin's forward, forward + backward and full step beside them. Then one traced
run of the full step (`jax.profiler`) whose per-op times are grouped by phase (forward,
backward, update) and kind (convolution, BatchNorm, pooling, ...) from the compiled HLO's
op_name metadata. Op times are summed over XLA's worker threads, so they can exceed the
step's wall time; the shares are what the table is for. Eigen convolutions run
asynchronously and appear as the executor's wait for them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import backbones
from backbones import training
from backbones.training.parallel import DataParallel
from benchmarks.throughput import CONVOLUTIONS, torch_twin

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\(")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SHAPE = re.compile(r"\[([\d,]*)\]")
# XLA:CPU runs Eigen convolutions asynchronously: the trace shows only their dispatch, and
# the executor's wait for them under this name.
_WAIT = "ThunkExecutor::Execute (wait for completion)"


def _dims(shape: str) -> tuple[int, ...]:
    """The sorted dimensions of an HLO array shape: a kernel's gradient has its kernel's."""
    dims = _SHAPE.search(shape)
    return tuple(sorted(int(d) for d in dims.group(1).split(",") if d)) if dims else ()


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Map each top-level HLO instruction name to 'phase/kind' from its op_name metadata.

    phase: fwd (under jvp), bwd (under transpose), update (the rest). kind: conv (bwd split
    into conv-input and conv-filter: a filter gradient has a kernel's dimensions), bn,
    pool, head, eltwise, all-reduce, copy. An instruction that XLA made without metadata
    (e.g. the iotas of the max-pool gradient's select-and-scatter expansion) takes the
    op_name of its nearest user that has one; a convolution without one is a filter gradient.
    """
    computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
    current = ""
    entry: dict[str, tuple[str, str, str, str]] = {}
    users: dict[str, list[str]] = collections.defaultdict(list)
    kernels: set[tuple[int, ...]] = set()
    for line in hlo_text.splitlines():
        if line and not line.startswith(" "):
            current = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            if current == "ENTRY":
                kernels = {_dims(s) for s in re.findall(r"kernel__\.\d+: (f32\[[\d,]+\])",
                                                            line)}
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        found = _OP_NAME.search(line)
        op_name = found.group(1) if found else ""
        computations[current].append((opcode, op_name, shape))
        if current == "ENTRY":
            calls = _CALLS.search(line)
            entry[name] = (shape, opcode, op_name, calls.group(1) if calls else "")
            for operand in re.findall(r"%([\w.-]+)", line.split("calls=")[0])[1:]:
                users[operand].append(name)

    def inherited(name: str) -> str:
        seen, queue = {name}, collections.deque(users[name])
        while queue:
            user = queue.popleft()
            if entry.get(user, ("", "", ""))[2]:
                return entry[user][2]
            queue.extend(u for u in users[user] if u not in seen)
            seen.update(users[user])
        return ""

    kinds = {}
    for name, (shape, opcode, op_name, callee) in entry.items():
        inner = computations.get(callee, [])
        has_conv = opcode == "convolution" or any(o == "convolution" for o, _, _ in inner)
        names = [op_name] + [n for _, n, _ in inner if n]
        label = (next((n for n in names if "conv_general_dilated" in n), names[0]) if has_conv
                 else op_name or inherited(name))
        phase = "bwd" if "transpose(" in label else "fwd" if "jvp(" in label else "update"
        if opcode == "all-reduce":
            kind = "all-reduce"
        elif has_conv or "im2col_conv" in label:
            phase = "fwd" if phase == "fwd" else "bwd"
            kind = ("conv" if phase == "fwd" else
                    "conv-filter" if _dims(shape) in kernels else "conv-input")
        elif re.search(r"_bn/|BatchNorm", label):
            kind = "bn"
        elif re.search(r"max_pool|reduce_window|select_and_scatter|/pad", label):
            kind = "pool"
        elif "head/" in label or "log_softmax" in label:
            kind = "head"
        elif opcode in ("copy", "transpose") or "copy" in name or "transpose" in name:
            kind = "copy"
        else:
            kind = "eltwise"
        kinds[name] = f"{phase}/{kind}"
    return kinds


def trace_ops(call: Callable[[], object], steps: int, hlo_text: str) -> dict[str, float]:
    """Milliseconds per step summed by 'phase/kind' over `steps` traced calls."""
    kinds = op_kinds(hlo_text)
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(steps):
                call()
        path, = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in kinds:
            totals[kinds[e["name"]]] += e.get("dur", 0.0) / 1e3 / steps
        elif e.get("ph") == "X" and e.get("name") == _WAIT:
            totals["wait on async ops (Eigen convolutions)"] += e.get("dur", 0.0) / 1e3 / steps
    return dict(totals)


def interleaved(calls: dict[str, Callable[[], object]], steps: int, repeats: int
                ) -> dict[str, float]:
    """Median seconds per call of each blocking callable, timed in turn `repeats` times."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for k, call in calls.items():
            start = time.perf_counter()
            for _ in range(steps):
                call()
            times[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def jax_calls(args: argparse.Namespace) -> tuple[dict[str, Callable[[], object]], str]:
    """The JAX sub-functions to time and the compiled full step's HLO text."""
    model = backbones.create(args.backbone, num_classes=args.num_classes, head="linear",
                             dtype=training.compute_dtype(args.precision), axis_name="batch")
    shape = (args.batch_size, args.image_size, args.image_size, 3)
    tx = training.make_optimizer(training.OptimConfig(optimizer="sgd", learning_rate=1e-3))
    state = training.create_train_state(model, tx, jax.random.PRNGKey(0), (1, *shape[1:]))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=shape).astype(np.float32),
             "label": (np.arange(args.batch_size) % args.num_classes).astype(np.int32),
             "weight": np.ones(args.batch_size, np.float32)}
    dp = DataParallel("shard_map", tuple(jax.devices()[:1]), CONVOLUTIONS[args.convolutions])
    options = dict(dp.compiler_options) or None
    step_fn = training.make_train_step()
    hlo = jax.jit(jax.shard_map(
        step_fn, mesh=dp.mesh, in_specs=(P(), P("batch")), out_specs=(P(), P()),
        check_vma=False), compiler_options=options).lower(state, batch).compile().as_text()

    local = model.clone(axis_name=None)  # no named axis outside shard_map

    def loss(params, images):
        logits, _ = local.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                train=True, mutable=["batch_stats"])
        return jax.nn.log_softmax(logits.astype(np.float32))[:, 0].mean()

    forward = jax.jit(loss, compiler_options=options)
    grad = jax.jit(jax.grad(loss), compiler_options=options)
    grads = grad(state.params, batch["image"])
    update = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
    run = dp.train(step_fn)
    images = jax.device_put(batch["image"])
    box = {"step": dp.replicate(state), "update": dp.replicate(state)}

    def step():
        box["step"], metrics = run(box["step"], batch)
        jax.block_until_ready(metrics)

    def upd():
        box["update"] = jax.block_until_ready(update(box["update"], grads))

    return {"jax forward": lambda: jax.block_until_ready(forward(state.params, images)),
            "jax fwd+bwd": lambda: jax.block_until_ready(grad(state.params, images)),
            "jax update": upd, "jax step": step}, hlo


def torch_calls(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The PyTorch twin's forward, forward + backward and SGD step (empty without torch)."""
    try:
        import torch
    except ImportError:
        return {}
    model = torch_twin(args.backbone, 3, args.num_classes).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.arange(args.batch_size) % args.num_classes
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def forward():
        with torch.no_grad():
            loss_fn(model(x), y)

    def backward():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return {"torch forward": forward, "torch fwd+bwd": backward, "torch step": step}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, choices=backbones.names())
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=training.PRECISIONS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--convolutions", default="default", choices=tuple(CONVOLUTIONS),
                        help="XLA:CPU's convolution library (default: the engine's, Eigen on CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    calls, hlo = jax_calls(args)
    calls.update(torch_calls(args))
    load = os.getloadavg()[0]
    seconds = interleaved(calls, args.steps, args.repeats)
    print(f"{args.backbone} b={args.batch_size} {args.image_size}px {args.precision}, "
          f"{args.convolutions} convolutions, "
          f"load {load:.1f}->{os.getloadavg()[0]:.1f}")
    print("| part | ms | images/s |\n|---|---:|---:|")
    for k, s in seconds.items():
        print(f"| {k} | {1e3 * s:.1f} | {args.batch_size / s:.1f} |")
    ops = trace_ops(calls["jax step"], args.steps, hlo)
    total = sum(ops.values())
    print(f"\nXLA ops of the jax step (ms per step, summed over threads; total {total:.1f})")
    print("| phase/kind | ms | share |\n|---|---:|---:|")
    for k, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {ms:.1f} | {100 * ms / total:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
