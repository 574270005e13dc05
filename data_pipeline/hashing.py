"""Find the same chest X-ray twice: image hashes and the duplicates they reveal.

Public chest X-ray collections copy each other, so a model evaluated on "another" dataset may
have trained on many of its images. Two hashes per decoded image (uint8 HxWx1) tell:

- `content_hash`: SHA-256 of the pixels and their shape. Equal for a lossless re-encoding
  (PNG -> PNG, another file name or folder), different after any pixel change: an *exact*
  duplicate.
- `perceptual_hash`: the 256-bit DCT hash of `imagehash.phash(hash_size=16)` as 4 uint64
  words. Copies that were resized, re-encoded as JPEG or slightly brightened stay within a
  few bits of the original: a *near* duplicate when the Hamming distance is <= `max_distance`
  (default `MAX_DISTANCE`).

Why a 256-bit phash and 20 bits: on real X-rays, resized, re-encoded or brightened copies stay
well under 20 bits and different images well over it, where a 64-bit phash (or dhash)
separated neither (docs/measured.md, perceptual-hash threshold). Different 32 px synthetic
phantoms, which share one anatomy, come no closer than 26.

`find_duplicates` compares every query with every reference (numpy: XOR of the words and
`np.bitwise_count`, in blocks; 10k x 10k in seconds); `duplicate_pairs` does so within one
set. `hash_dataset` hashes a built dataset once and caches the result beside its decode-once
stores (the build folder is keyed by content, so the cache cannot go stale).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from data_pipeline.per_example import chunks, save_npz

HASH_SIZE = 16                         # phash side: HASH_SIZE**2 = 256 bits
WORDS = HASH_SIZE * HASH_SIZE // 64    # uint64 words per perceptual hash
MAX_DISTANCE = 20                      # default near-duplicate threshold (bits of 256)
CACHE_VERSION = 1                      # bump when either hash changes what it computes
_BLOCK_WORDS = 1 << 22                 # query rows x reference rows x WORDS per block


@dataclasses.dataclass(frozen=True)
class ImageHashes:
    """Hashes of N images, row i describing paths[i]."""

    content: np.ndarray      # str [N], SHA-256 hex of shape + pixels
    perceptual: np.ndarray   # uint64 [N, WORDS], the 256-bit phash
    paths: np.ndarray        # str [N], where each image came from

    def __len__(self) -> int:
        return len(self.content)

    def take(self, rows: np.ndarray) -> ImageHashes:
        """The hashes of `rows`, in that order."""
        return ImageHashes(self.content[rows], self.perceptual[rows], self.paths[rows])


@dataclasses.dataclass(frozen=True)
class Matches:
    """Duplicates found: query row -> reference row, one entry per duplicated query row."""

    query: np.ndarray       # int [M], rows of the query hashes
    reference: np.ndarray   # int [M], rows of the reference hashes (the nearest)
    distance: np.ndarray    # int [M], Hamming distance of the perceptual hashes
    exact: np.ndarray       # bool [M], same pixels (content hashes equal)

    def __len__(self) -> int:
        return len(self.query)

    def kinds(self) -> list[str]:
        """"exact" or "near:<distance>" per match."""
        return ["exact" if e else f"near:{d}" for e, d in zip(self.exact, self.distance,
                                                               strict=True)]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                                and image.shape[-1] != 1):
        raise ValueError(f"expected a uint8 HxW or HxWx1 image, got {image.dtype} "
                         f"{list(image.shape)}")
    return image.reshape(image.shape[:2])


def content_hash(image: np.ndarray) -> str:
    """SHA-256 hex digest of the image's height, width and pixels (uint8 HxW[x1])."""
    image = np.ascontiguousarray(_check_image(image))
    digest = hashlib.sha256(np.asarray(image.shape, "<u8").tobytes())
    digest.update(image.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: np.ndarray) -> np.ndarray:
    """The 256-bit DCT perceptual hash (imagehash.phash, hash_size=16) as uint64 [WORDS]."""
    bits = imagehash.phash(Image.fromarray(_check_image(image)), hash_size=HASH_SIZE).hash
    return np.packbits(bits.ravel()).view(">u8").astype(np.uint64)


class Hasher:
    """Hashes images one at a time, as a decoding loop meets them."""

    def __init__(self):
        self._content: list[str] = []
        self._perceptual: list[np.ndarray] = []

    def add(self, image: np.ndarray) -> None:
        """Hash one image (uint8 HxW[x1])."""
        self._content.append(content_hash(image))
        self._perceptual.append(perceptual_hash(image))

    def result(self, paths: Sequence[str]) -> ImageHashes:
        """The hashes of the images added, in order; `paths` names them."""
        if len(paths) != len(self._content):
            raise ValueError(f"{len(self._content)} images hashed but {len(paths)} paths")
        return ImageHashes(np.asarray(self._content, dtype="U64"),
                           np.asarray(self._perceptual, np.uint64).reshape(-1, WORDS),
                           np.asarray(paths, dtype=str))


def hash_images(images: Iterable[np.ndarray], paths: Sequence[str]) -> ImageHashes:
    """Both hashes of each image (uint8 HxW[x1]); `paths` name them, in the same order."""
    hasher = Hasher()
    for image in images:
        hasher.add(image)
    return hasher.result(paths)


def hash_dataset(ds, indices: np.ndarray | None = None, *, progress: bool = True
                 ) -> ImageHashes:
    """Hashes of ds.source[indices] (default: every example), paths from ds.paths.

    Each example is hashed once per dataset build: the hashes are kept in
    `<ds.source.arrays_dir>/hashes-v<CACHE_VERSION>.npz` (updated under the build lock and
    replaced atomically), so a second call only reads them. A source without `arrays_dir`
    (in-memory examples) is hashed every time."""
    indices = np.arange(len(ds.source)) if indices is None else np.asarray(indices, np.int64)
    arrays_dir = getattr(ds.source, "arrays_dir", None)
    n = len(ds.source)
    if arrays_dir is None:
        content, perceptual = _hash_rows(ds.source, indices, progress)
        return ImageHashes(content, perceptual, np.asarray(ds.paths)[indices])
    from data_pipeline.datasets import build_lock  # the lock of the dataset builds

    path = Path(arrays_dir) / f"hashes-v{CACHE_VERSION}.npz"
    content, perceptual = _read_cache(path, n)
    if (content[indices] == "").any():
        with build_lock(path.with_suffix("")):
            content, perceptual = _read_cache(path, n)   # another process may have added
            todo = np.unique(indices[content[indices] == ""])
            if len(todo):
                content[todo], perceptual[todo] = _hash_rows(ds.source, todo, progress)
                save_npz(path, content=content, perceptual=perceptual)
    return ImageHashes(content[indices], perceptual[indices], np.asarray(ds.paths)[indices])


def _hash_rows(source, rows: np.ndarray, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    content = np.empty(len(rows), "U64")
    perceptual = np.empty((len(rows), WORDS), np.uint64)
    with tqdm(total=len(rows), desc=f"hashing {len(rows)} images", unit="img",
              disable=not progress) as bar:
        for start, examples in chunks(source, rows):
            for k, example in enumerate(examples, start):
                content[k] = content_hash(example["image"])
                perceptual[k] = perceptual_hash(example["image"])
            bar.update(len(examples))
    return content, perceptual


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(content, perceptual) of all n examples; "" / zeros where not hashed yet."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if f["content"].shape == (n,) and f["perceptual"].shape == (n, WORDS):
                return f["content"].astype("U64"), f["perceptual"].astype(np.uint64)
    return np.full(n, "", "U64"), np.zeros((n, WORDS), np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances [A, B] between perceptual hashes a [A, WORDS] and b [B, WORDS]."""
    d = np.zeros((len(a), len(b)), np.int64)
    for w in range(a.shape[1]):   # word by word: 2-D, contiguous, no [A, B, WORDS] temporary
        d += np.bitwise_count(a[:, w, None] ^ b[None, :, w])
    return d


def _blocks(n_query: int, n_reference: int) -> Iterable[slice]:
    step = max(1, _BLOCK_WORDS // max(1, n_reference * WORDS))
    return (slice(s, min(s + step, n_query)) for s in range(0, n_query, step))


def find_duplicates(query: ImageHashes, reference: ImageHashes, *,
                    max_distance: int = MAX_DISTANCE) -> Matches:
    """Each query image that duplicates a reference image, matched to one: a reference with
    the same pixels (exact) if any, else the perceptually nearest if within `max_distance`
    bits (near)."""
    first: dict[str, int] = {}
    for j, c in enumerate(reference.content.tolist()):
        first.setdefault(c, j)
    same = np.array([first.get(c, -1) for c in query.content.tolist()], np.int64)
    nearest = np.full(len(query), -1, np.int64)
    distance = np.zeros(len(query), np.int64)
    if len(reference):
        for rows in _blocks(len(query), len(reference)):
            d = hamming(query.perceptual[rows], reference.perceptual)
            nearest[rows] = d.argmin(1)
            distance[rows] = d[np.arange(len(d)), nearest[rows]]
    exact = same >= 0
    hit = exact | ((nearest >= 0) & (distance <= max_distance))
    matched = np.where(exact, same, nearest)
    return Matches(np.flatnonzero(hit), matched[hit],
                   np.where(exact, 0, distance)[hit], exact[hit])


def duplicate_pairs(hashes: ImageHashes, *, max_distance: int = MAX_DISTANCE) -> Matches:
    """Every pair i < j of duplicates within one set (same pixels, or within `max_distance`
    bits), as Matches with query = i and reference = j."""
    found = [np.zeros(0, np.int64)] * 3
    for rows in _blocks(len(hashes), len(hashes)):
        d = hamming(hashes.perceptual[rows], hashes.perceptual)
        r, j = np.nonzero(d <= max_distance)
        later = j > r + rows.start
        found = [np.concatenate([f, x]) for f, x in
                 zip(found, (r[later] + rows.start, j[later], d[r[later], j[later]]))]
    i, j, d = found
    exact = hashes.content[i] == hashes.content[j]
    return Matches(i, j, np.where(exact, 0, d), exact)
