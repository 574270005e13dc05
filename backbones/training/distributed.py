"""Joining a multi-process JAX run, and the few host-side collectives the library needs.

One process per host (or per GPU) runs the same program; `initialize` connects them through a
coordinator before JAX starts its backend, after which `jax.devices()` lists every process's
devices and one `jit` runs over all of them. Without settings a single process runs as
always, except under SLURM (more than one task) or on a Cloud TPU VM, where JAX's own cluster
detection (`jax.distributed.initialize()` without arguments) finds the coordinator. On CPU
the cross-process collectives are gloo (jax_cpu_collectives_implementation's default since
jax 0.4.3x; nothing to set).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

_joined: tuple[str | None, int | None, int | None] | None = None


def cluster_detected() -> bool:
    """Whether this process was started as one task of a SLURM job with several tasks, or on
    a Cloud TPU VM (libtpu installed and a TPU device present)."""
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu = (importlib.util.find_spec("libtpu") is not None
           and bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")))
    return slurm or tpu


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the run of `num_processes` processes coordinated at `coordinator` (HOST:PORT;
    process 0 serves it) as process `process_id`; with none given, join a detected SLURM or
    Cloud TPU cluster, else stay a single process. Call it before any JAX computation;
    calling it again with the same settings does nothing."""
    global _joined
    settings = (coordinator, num_processes, process_id)
    if _joined is not None:
        if settings not in (_joined, (None, None, None)):
            raise ValueError(f"this process already joined a run as {_joined} (coordinator, "
                             f"processes, id); it cannot join {settings}")
        return
    given = [s is not None for s in settings]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together "
                         "(or none of them, to run alone or be detected under SLURM / TPU)")
    if all(given) and not 0 <= process_id < num_processes:
        raise ValueError(f"process id must be in [0, {num_processes}); got {process_id}")
    if all(given) and num_processes > 1:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif not any(given) and cluster_detected():
        jax.distributed.initialize()
    _joined = settings


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files and reports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (nothing to wait for alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather(x) -> np.ndarray:
    """A host copy of `x`, concatenated on axis 0 over the processes in process order: a
    global jax.Array whole, a process-local NumPy array as every process's rows."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_copy(tree):
    """A NumPy copy of a pytree of replicated arrays; on several processes each leaf is read
    from this process's own copy (`jax.device_get` refuses arrays spanning processes)."""
    def copy(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"host_copy needs replicated arrays; got {x.sharding}")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(copy, tree)
