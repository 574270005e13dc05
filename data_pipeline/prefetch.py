"""Batches moved to the device ahead of use: a queue of global device batches.

With one process a host batch is the whole batch and goes out with `jax.device_put`; with
several, each process holds its own share (its block of the global batch) and
`jax.make_array_from_process_local_data` assembles the global array (`to_global`). Either
returns at once and copies in the background, so while a step runs on batch
k, the next `size - 1` batches are already travelling to the device (Flax's
`prefetch_to_device`, with a sharding instead of a device list). A Grain iterator keeps its
checkpoint protocol: `get_state()` is the position of the next batch the *consumer* gets, not
of the read-ahead, so a checkpoint taken with batches in the queue resumes without skipping
them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax


def to_global(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """A pytree of host arrays as arrays on `sharding`: `jax.device_put` when this process
    holds every device of it, else each leaf is this process's rows of the global array."""
    if sharding.is_fully_addressable:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class DevicePrefetch:
    """Iterator over `iterator`'s batches put on `sharding`, `size` batches read ahead."""

    def __init__(self, iterator: Iterator[Any], sharding: jax.sharding.Sharding, size: int):
        self._iterator = iterator
        self._sharding = sharding
        self._size = size
        self._queue: collections.deque[tuple[Any, Any]] = collections.deque()

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> Any:
        while len(self._queue) < self._size:
            position = self._position()
            try:
                batch = next(self._iterator)
            except StopIteration:
                break
            self._queue.append((position, to_global(batch, self._sharding)))
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()[1]

    def _position(self) -> Any:
        return None


class CheckpointableDevicePrefetch(DevicePrefetch):
    """A `DevicePrefetch` over an iterator with `get_state`/`set_state` (Grain's)."""

    def _position(self) -> Any:
        return self._iterator.get_state()

    def get_state(self) -> Any:
        """The wrapped iterator's state before the first batch not yet handed out."""
        return self._queue[0][0] if self._queue else self._iterator.get_state()

    def set_state(self, state: Any) -> None:
        """Drop the read-ahead and move the wrapped iterator to `state`."""
        self._queue.clear()
        self._iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Let the wrapped iterator start reading; Grain's checkpoint handler calls this
        after a restore."""
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()


def prefetch_to_device(iterator: Iterator[Any], sharding: jax.sharding.Sharding,
                       size: int = 2) -> DevicePrefetch:
    """`iterator`'s batches (pytrees of host arrays; with several processes each process's
    share) as global device arrays on `sharding` (e.g. `NamedSharding(mesh, P("batch"))`:
    every leaf split on its first axis), `size` >= 1
    batches ahead; checkpointable when `iterator` is."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    stateful = hasattr(iterator, "get_state") and hasattr(iterator, "set_state")
    cls = CheckpointableDevicePrefetch if stateful else DevicePrefetch
    return cls(iterator, sharding, size)
