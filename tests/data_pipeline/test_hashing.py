"""The near-duplicate threshold is inclusive: a Hamming distance of exactly `max_distance`
bits is a duplicate, one bit more is not, in `find_duplicates` (one set against another) and
in `duplicate_pairs` (within one set). The perceptual hashes are built bit by bit, so every
distance is exact; the content hashes all differ, so no match is an exact one."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import hashing
from data_pipeline.hashing import ImageHashes, duplicate_pairs, find_duplicates

BITS = hashing.HASH_SIZE * hashing.HASH_SIZE   # 256


def words(bits: np.ndarray) -> np.ndarray:
    """bool [BITS] -> uint64 [WORDS], the layout `hashing.perceptual_hash` uses."""
    return np.packbits(bits).view(">u8").astype(np.uint64)


def bit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Differing bits of two uint64 [WORDS] hashes, counted without `hashing.hamming`."""
    unpack = lambda w: np.unpackbits(w.astype(">u8").view(np.uint8))  # noqa: E731
    return int((unpack(a) != unpack(b)).sum())


def flipped(base: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`base` (bool [BITS]) with k of its bits flipped, spread over all words."""
    out = base.copy()
    where = np.random.default_rng(seed).permutation(BITS)[:k]
    out[where] = ~out[where]
    return out


def hashes(*bit_rows: np.ndarray, tag: str) -> ImageHashes:
    n = len(bit_rows)
    return ImageHashes(content=np.asarray([f"{tag}{i}" for i in range(n)], dtype="U64"),
                       perceptual=np.stack([words(b) for b in bit_rows]),
                       paths=np.asarray([f"{tag}/{i}.png" for i in range(n)]))


BASE = np.random.default_rng(0).integers(0, 2, BITS).astype(bool)
# (threshold passed, or None for the default MAX_DISTANCE); 255 + 1 flips every bit
THRESHOLDS = [0, 1, 7, None, 64, 255]


def threshold_of(max_distance: int | None) -> tuple[int, dict]:
    if max_distance is None:
        return hashing.MAX_DISTANCE, {}
    return max_distance, {"max_distance": max_distance}


@pytest.mark.parametrize("max_distance", THRESHOLDS, ids=lambda t: f"t{t}")
def test_find_duplicates_counts_the_threshold_itself(max_distance):
    t, kwargs = threshold_of(max_distance)
    reference = hashes(BASE, tag="ref")
    query = hashes(flipped(BASE, t, seed=1), flipped(BASE, t + 1, seed=2), tag="query")
    assert [bit_distance(q, reference.perceptual[0]) for q in query.perceptual] == [t, t + 1]

    found = find_duplicates(query, reference, **kwargs)
    assert found.query.tolist() == [0]            # distance t: a hit; t + 1: none
    assert found.reference.tolist() == [0]
    assert found.distance.tolist() == [t]
    assert found.exact.tolist() == [False] and found.kinds() == [f"near:{t}"]
    # each alone, too (no other row to be nearer)
    assert len(find_duplicates(query.take(np.array([0])), reference, **kwargs)) == 1
    assert len(find_duplicates(query.take(np.array([1])), reference, **kwargs)) == 0


@pytest.mark.parametrize("max_distance", THRESHOLDS, ids=lambda t: f"t{t}")
def test_duplicate_pairs_counts_the_threshold_itself(max_distance):
    t, kwargs = threshold_of(max_distance)
    at = hashes(BASE, flipped(BASE, t, seed=3), tag="at")
    past = hashes(BASE, flipped(BASE, t + 1, seed=4), tag="past")
    assert bit_distance(*at.perceptual) == t and bit_distance(*past.perceptual) == t + 1

    pairs = duplicate_pairs(at, **kwargs)
    assert (pairs.query.tolist(), pairs.reference.tolist()) == ([0], [1])
    assert pairs.distance.tolist() == [t] and pairs.exact.tolist() == [False]
    assert len(duplicate_pairs(past, **kwargs)) == 0


def test_duplicate_pairs_in_a_mixed_set():
    """One set: a pair at the threshold, a pair one bit past it, and far-apart others."""
    t = 5
    other = ~BASE  # 256 bits from BASE, and at least 256 - 2 (t + 1) from BASE's neighbours
    rows = hashes(BASE, other, flipped(BASE, t, seed=5), flipped(other, t + 1, seed=6),
                  tag="mixed")
    pairs = duplicate_pairs(rows, max_distance=t)
    assert (pairs.query.tolist(), pairs.reference.tolist(), pairs.distance.tolist()) == (
        [0], [2], [t])
    assert (duplicate_pairs(rows, max_distance=t + 1).reference.tolist()) == [2, 3]
