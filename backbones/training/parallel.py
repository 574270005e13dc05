"""Data parallelism behind one flag: `shard_map` (jit over a 1-D Mesh, default) or `pmap`.

The wrapper takes ANY per-shard function `f(state, batch)` that reduces over the axis
"batch" (the train step, the eval step, or either vmapped over ensemble members) plus where
the batch axis sits in each batch leaf (`batch_axes`, a pytree prefix of the batch: 0 for
[B, ...], 1 for labels stacked as [M, B]). The state is replicated on every device: under
shard_map as one array with a replicated sharding, under pmap with a leading device axis.
`compiler_options` go to XLA with the shard_map steps; by default `EIGEN_CONV_OPTIONS` on CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PARALLEL_MODES = ("shard_map", "pmap")
AXIS = "batch"

# XLA:CPU hands convolutions to YNNPACK, which computes a filter gradient (a convolution whose
# window is the whole feature map) 2-5x slower than XLA's own (Eigen) convolution. These options
# keep YNNPACK for dots and reductions only, and are the CPU default: Eigen's convolutions train
# faster on CPU (`benchmarks/throughput.py --levers`; figures in docs/measured.md) and give the
# same numbers within float tolerance (tests/backbones/test_cpu_fast_path.py).
EIGEN_CONV_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def default_compiler_options() -> tuple[tuple[str, str], ...]:
    """`EIGEN_CONV_OPTIONS` on the CPU backend, nothing on accelerators."""
    return tuple(EIGEN_CONV_OPTIONS.items()) if jax.default_backend() == "cpu" else ()


def _spec(axis: int | None) -> P:
    return P() if axis is None else P(*([None] * axis), AXIS)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """One parallel mode over `devices` (default: every process's devices, in process order,
    so a global batch is the processes' local batches concatenated)."""

    mode: str = "shard_map"
    devices: tuple[Any, ...] = ()
    # hashable (option, value) pairs; None: default_compiler_options()
    compiler_options: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self):
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"unknown parallel mode {self.mode!r}; choose one of "
                             f"{', '.join(PARALLEL_MODES)}")
        if self.mode == "pmap" and jax.process_count() > 1:
            raise ValueError("--parallel pmap runs within one process; use shard_map across "
                             "processes")
        if not self.devices:
            object.__setattr__(self, "devices", tuple(sorted(
                jax.devices(), key=lambda d: (d.process_index, d.id))))
        if self.compiler_options is None:
            object.__setattr__(self, "compiler_options", default_compiler_options())

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def mesh(self) -> Mesh:
        return Mesh(np.asarray(self.devices), (AXIS,))

    def check_batch_size(self, batch_size: int) -> None:
        """Stop with a clear error, before anything compiles, if the batch cannot be split."""
        if batch_size % self.num_devices:
            raise ValueError(
                f"batch size {batch_size} does not divide by the {self.num_devices} devices "
                f"({self.mode}); choose a multiple of {self.num_devices}")

    # -- state placement ------------------------------------------------------------------
    def replicate(self, tree: Any) -> Any:
        """Put a copy of a pytree (e.g. the train state) on every device.

        The copy goes through the host, so donating the result never deletes `tree`.
        """
        tree = jax.device_get(tree)
        if self.mode == "pmap":
            return jax.tree.map(
                lambda x: np.broadcast_to(x, (self.num_devices, *np.shape(x))), tree)
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def unreplicate(self, tree: Any) -> Any:
        """One copy of a replicated pytree, as host-independent device arrays."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], tree)
        return tree

    # -- wrapping per-shard functions -----------------------------------------------------
    def _batch_size(self, batch: Any, batch_axes: Any) -> int:
        sizes = jax.tree.leaves(jax.tree.map(
            lambda a, sub: jax.tree.map(lambda x: x.shape[a], sub), batch_axes, batch))
        return int(sizes[0])

    def _split(self, batch: Any, batch_axes: Any) -> Any:
        """pmap: [.., B, ..] -> [.., D, B/D, ..] at each leaf's batch axis."""
        d = self.num_devices
        return jax.tree.map(lambda a, sub: jax.tree.map(
            lambda x: x.reshape(*x.shape[:a], d, x.shape[a] // d, *x.shape[a + 1:]), sub),
            batch_axes, batch)

    def _place(self, batch: Any, batch_axes: Any) -> Any:
        """shard_map: put each batch leaf on the mesh, sharded on its batch axis."""
        return jax.tree.map(lambda a, sub: jax.device_put(
            sub, NamedSharding(self.mesh, _spec(a))), batch_axes, batch)

    def _options(self, override: tuple[tuple[str, str], ...] | None) -> dict[str, str] | None:
        """XLA options for one shard_map step: `override`, else this wrapper's; None if empty."""
        return dict(self.compiler_options if override is None else override) or None

    def train(self, step_fn: Callable, *, batch_axes: Any = 0, donate: bool = True,
              compiler_options: tuple[tuple[str, str], ...] | None = None
              ) -> Callable[[Any, Any], tuple[Any, Any]]:
        """Wrap `step_fn(state, batch) -> (state, metrics)`; metrics come back as one copy.

        `compiler_options` replace this wrapper's for this step only (shard_map).
        """
        donate_argnums = (0,) if donate else ()
        if self.mode == "pmap":
            mapped = jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, batch_axes), out_axes=0,
                              devices=self.devices, donate_argnums=donate_argnums)

            def run(state, batch):
                self.check_batch_size(self._batch_size(batch, batch_axes))
                state, metrics = mapped(state, self._split(batch, batch_axes))
                return state, jax.tree.map(lambda x: x[0], metrics)
        else:
            mapped = jax.jit(jax.shard_map(
                step_fn, mesh=self.mesh, in_specs=(P(), jax.tree.map(_spec, batch_axes)),
                out_specs=(P(), P()), check_vma=False), donate_argnums=donate_argnums,
                compiler_options=self._options(compiler_options))

            def run(state, batch):
                self.check_batch_size(self._batch_size(batch, batch_axes))
                return mapped(state, self._place(batch, batch_axes))
        return run

    def predict(self, eval_fn: Callable, *, batch_axes: Any = 0, out_axis: int = 0,
                compiler_options: tuple[tuple[str, str], ...] | None = None
                ) -> Callable[[Any, Any], jax.Array]:
        """Wrap `eval_fn(state, batch) -> outputs` sharded on `out_axis` (`compiler_options`:
        as in `train`).

        Batches that do not divide by the device count (a last evaluation batch) are
        padded by repeating their last example and the padding is cut from the output.
        """
        if self.mode == "pmap":
            mapped = jax.pmap(eval_fn, axis_name=AXIS, in_axes=(0, batch_axes),
                              out_axes=out_axis, devices=self.devices)

            def call(state, batch):
                out = mapped(state, self._split(batch, batch_axes))
                return out.reshape(*out.shape[:out_axis], -1, *out.shape[out_axis + 2:])
        else:
            mapped = jax.jit(jax.shard_map(
                eval_fn, mesh=self.mesh, in_specs=(P(), jax.tree.map(_spec, batch_axes)),
                out_specs=_spec(out_axis), check_vma=False),
                compiler_options=self._options(compiler_options))

            def call(state, batch):
                return mapped(state, self._place(batch, batch_axes))

        def run(state, batch):
            n = self._batch_size(batch, batch_axes)
            pad = -n % self.num_devices
            if pad:
                batch = jax.tree.map(lambda a, sub: jax.tree.map(
                    lambda x: np.concatenate([x, np.repeat(np.take(x, [-1], axis=a), pad, a)],
                                             axis=a), sub), batch_axes, batch)
            out = call(state, batch)
            return jax.lax.slice_in_dim(out, 0, n, axis=out_axis) if pad else out
        return run


def data_parallel(mode: str = "shard_map", devices: Sequence[Any] | None = None,
                  compiler_options: dict[str, str] | None = None) -> DataParallel:
    """The DataParallel for `--parallel MODE` over `devices` (default all processes'
    devices), compiled with `compiler_options` (default: `default_compiler_options()`)."""
    options = None if compiler_options is None else tuple(compiler_options.items())
    return DataParallel(mode, tuple(devices or ()), options)
