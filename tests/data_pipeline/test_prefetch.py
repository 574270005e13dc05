"""Device prefetch: same batches, on the sharding, bounded read-ahead, checkpoint positions."""

from __future__ import annotations

import grain
import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipeline.loader import make_loader
from data_pipeline.prefetch import prefetch_to_device
from data_pipeline.preprocess import PreprocessConfig

SHARDING = NamedSharding(Mesh(np.asarray(jax.local_devices()), ("batch",)), P("batch"))


class Source:
    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full((6, 6, 1), i, np.uint8), "label": i % 3}

    def __repr__(self) -> str:
        return "Source()"


def _loader():
    return make_loader(Source(), np.arange(20), batch_size=4, preprocess=PreprocessConfig(
        image_size=6), seed=1, num_epochs=2)


def test_batches_arrive_on_the_sharding_unchanged():
    host = list(_loader())
    device = list(prefetch_to_device(iter(_loader()), SHARDING))
    assert len(device) == len(host) == 10
    for a, b in zip(host, device):
        assert isinstance(b["image"], jax.Array) and b["image"].sharding == SHARDING
        for key in a:
            np.testing.assert_array_equal(a[key], np.asarray(b[key]))


def test_reads_at_most_size_batches_ahead():
    pulled = []

    def batches():
        for i in range(6):
            pulled.append(i)
            yield {"x": np.full(4, i)}
    it = prefetch_to_device(batches(), SHARDING, size=2)
    assert not hasattr(it, "get_state")   # a plain iterator has no position to save
    assert int(next(it)["x"][0]) == 0 and len(pulled) == 2
    assert int(next(it)["x"][0]) == 1 and len(pulled) == 3
    assert [int(b["x"][0]) for b in it] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="size"):
        prefetch_to_device(batches(), SHARDING, size=0)


def test_state_is_the_consumers_position_not_the_read_ahead(tmp_path):
    it = prefetch_to_device(iter(_loader()), SHARDING, size=3)
    for _ in range(3):
        next(it)
    state = it.get_state()           # three batches handed out, more read ahead
    handler = grain.checkpoint.CheckpointHandler()   # what the engine's checkpoints use
    handler.save(epath.Path(tmp_path), item=it)
    rest = [np.asarray(b["index"]) for b in it]
    resumed = handler.restore(epath.Path(tmp_path),
                              item=prefetch_to_device(iter(_loader()), SHARDING))
    again = [np.asarray(b["index"]) for b in resumed]
    assert len(rest) == len(again) == 7
    for a, b in zip(rest, again):
        np.testing.assert_array_equal(a, b)
    plain = iter(_loader())
    for _ in range(3):
        next(plain)
    assert state == plain.get_state()
