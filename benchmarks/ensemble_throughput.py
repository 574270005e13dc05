"""Images/s of stacked (vmapped) vs sequential ensemble-member training steps.

`python -m benchmarks.ensemble_throughput [--backbones simple_cnn,cnn16,resnet50]
[--members 3,6] [--image-size 32] [--batch-size 16] [--steps 5] [--repeats 3] [--json OUT]`

One "image" is one input image through all K members (a stacked step trains K members on B
images; sequential runs K plain steps on the same B images). Compile time is excluded (one
warm-up step per mode); the figure is the median over `repeats` of B * steps / seconds.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np
import optax

import backbones
from backbones import training
from ensembles.training import members


def _time(step, state, batches, steps: int, repeats: int) -> tuple[float, object]:
    state, m = step(state, batches[0])                      # compile + warm-up
    jax.block_until_ready(m)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        rates.append(len(batches[0]["label"]) * steps / (time.perf_counter() - t0))
    return statistics.median(rates), state


def measure(backbone: str, k: int, *, image_size: int, batch_size: int, steps: int,
            repeats: int) -> dict:
    """Stacked and sequential images/s for k binary (OvA-style) members of `backbone`."""
    head = "imagenet" if backbone in ("simple_cnn", "cnn16") else "linear"
    model = backbones.create(backbone, num_classes=2, head=head,
                             axis_name=training.parallel.AXIS)
    shape = (1, image_size, image_size, 1)
    tx = optax.adam(1e-3)
    make = jax.jit(lambda key: training.create_train_state(model, tx, key, shape))
    table = np.eye(k, dtype=np.int32)
    weights = np.ones((k, 2), np.float32)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.random((batch_size, image_size, image_size, 1), np.float32),
                "label": rng.integers(0, k, batch_size).astype(np.int32)} for _ in range(2)]
    dp = training.data_parallel("shard_map")
    step = training.make_train_step()
    keys = members.member_keys(jax.random.PRNGKey(0), range(k))
    stacked_state = dp.replicate(jax.jit(jax.vmap(make))(keys))
    stacked = dp.train(members.stacked_train_step(step, table, weights))
    stacked_rate, _ = _time(stacked, stacked_state, batches, steps, repeats)
    plain = dp.train(step)
    per_member = []
    for m in range(k):
        one = members.relabel_for_member(plain, table[m], weights[m])
        rate, _ = _time(one, dp.replicate(make(keys[m])), batches, steps, repeats)
        per_member.append(rate)
    sequential_rate = 1.0 / sum(1.0 / r for r in per_member)
    return {"backbone": backbone, "members": k, "image_size": image_size,
            "batch_size": batch_size, "stacked_images_per_s": stacked_rate,
            "sequential_images_per_s": sequential_rate,
            "speedup": stacked_rate / sequential_rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensemble_throughput",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="simple_cnn,cnn16,resnet50")
    parser.add_argument("--members", default="3,6")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [measure(b, int(k), image_size=args.image_size, batch_size=args.batch_size,
                    steps=args.steps, repeats=args.repeats)
            for b in args.backbones.split(",") for k in args.members.split(",")]
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, image "
          f"{args.image_size} px, batch {args.batch_size}, median of {args.repeats}")
    print("| backbone | K | stacked img/s | sequential img/s | stacked / sequential |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['members']} | {r['stacked_images_per_s']:.1f} | "
              f"{r['sequential_images_per_s']:.1f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].platform, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
