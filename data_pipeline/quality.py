"""BRISQUE, a no-reference image quality score, and the quality filter built on it.

BRISQUE (Mittal, Moorthy and Bovik, "No-Reference Image Quality Assessment in the Spatial
Domain", IEEE TIP 2012) describes an image by 36 natural-scene statistics and maps them to a
score with a support vector regressor trained on the LIVE database: about 0 for a pristine
image, higher for a more distorted one (blur, noise, compression). One study this project
reproduces dropped radiographs by that score before training.

The features, per scale (the image, then halved as OpenCV's `resize(INTER_CUBIC)` does):
MSCN coefficients (the image minus its local Gaussian mean, over its local deviation; 7x7
window, sigma 7/6, C = 1/255 on [0, 1] intensities); a generalised Gaussian fit of them (shape,
variance); and an asymmetric generalised Gaussian fit (shape, mean, left and right variance)
of their products with the horizontal, vertical and two diagonal neighbours. The fits match
moments over the paper's shape grid 0.2:0.001:10. The borders follow OpenCV's quality module
(reflect-101 around the Gaussian window, neighbour products only where both pixels exist).

The regressor is the LIVE model of the paper's release as the `brisque` package (Apache-2.0)
ships it: `brisque_live/svm.txt` (libsvm epsilon-SVR, RBF kernel, unchanged) and
`brisque_live/ranges.json` (the feature ranges scaled to [-1, 1], from its normalize.pickle);
evaluated here with numpy, so neither libsvm nor OpenCV is needed.

`score_dataset` scores a built dataset once and caches the scores beside its decode-once
stores, as `data_pipeline.hashing.hash_dataset` does for the hashes. `quality_filter` picks
what `--quality-max` / `--quality-drop-worst` drop. An image without a score (NaN: a flat image
has no statistics to fit) counts as the worst.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage, special
from tqdm.auto import tqdm

from data_pipeline.per_example import chunks, save_npz

MODEL_DIR = Path(__file__).with_name("brisque_live")
CACHE_VERSION = 1                     # bump when the score changes what it computes
NUM_FEATURES = 36
_SIGMA = 7 / 6                        # Gaussian window of the local mean and deviation
_RADIUS = 3                           # 7x7 window
_C = 1 / 255                          # stabilises the division on [0, 1] intensities
_SHAPES = np.arange(0.2, 10, 0.001)   # the paper's grid of GGD / AGGD shapes


def _gray(image: np.ndarray) -> np.ndarray:
    """uint8 HxW[x1] -> float64 HxW in [0, 1]; ValueError for anything else."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3
                                                                and image.shape[-1] != 1):
        raise ValueError(f"expected a uint8 HxW or HxWx1 image, got {image.dtype} "
                         f"{list(image.shape)}")
    return image.reshape(image.shape[:2]).astype(np.float64) / 255.0


def mscn(image: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a float image in [0, 1]."""
    blur = functools.partial(ndimage.gaussian_filter, sigma=_SIGMA, mode="mirror",
                             truncate=_RADIUS / _SIGMA)
    mu = blur(image)
    sigma = np.sqrt(np.abs(blur(image * image) - mu * mu))
    return (image - mu) / (sigma + _C)


def ggd_fit(x: np.ndarray) -> tuple[float, float]:
    """(shape, variance) of a zero-mean generalised Gaussian matching x's moments."""
    x = np.ravel(x)
    variance = float(np.mean(x * x))
    rho = variance / np.mean(np.abs(x)) ** 2
    ratio = special.gamma(1 / _SHAPES) * special.gamma(3 / _SHAPES) / special.gamma(
        2 / _SHAPES) ** 2
    return float(_SHAPES[np.argmin(np.abs(rho - ratio))]), variance


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """(shape, mean, left variance, right variance) of an asymmetric generalised Gaussian
    matching x's moments."""
    x = np.ravel(x)
    left, right = np.mean(x[x < 0] ** 2), np.mean(x[x > 0] ** 2)
    g = np.sqrt(left / right)
    r = np.mean(np.abs(x)) ** 2 / np.mean(x * x)
    r_norm = r * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    ratio = special.gamma(2 / _SHAPES) ** 2 / (special.gamma(1 / _SHAPES)
                                               * special.gamma(3 / _SHAPES))
    shape = float(_SHAPES[np.argmin(np.abs(r_norm - ratio))])
    mean = ((np.sqrt(right) - np.sqrt(left)) * special.gamma(2 / shape) / special.gamma(1 / shape)
            * np.sqrt(special.gamma(1 / shape) / special.gamma(3 / shape)))
    return shape, float(mean), float(left), float(right)


def _halving_matrix(n_in: int) -> np.ndarray:
    """[round(n_in / 2), n_in] weights of OpenCV's bicubic resize by fx = 0.5 (Keys kernel,
    a = -0.75; source pixel 2x + 0.5; edges clamped)."""
    a, n_out = -0.75, int(np.rint(n_in / 2))
    src = (np.arange(n_out) + 0.5) * 2 - 0.5
    left = np.floor(src).astype(int)
    m = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        d = np.abs(src - (left + k))
        w = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                     ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
        np.add.at(m, (np.arange(n_out), np.clip(left + k, 0, n_in - 1)), w)
    return m


def halve(image: np.ndarray) -> np.ndarray:
    """The image at half size, as `cv2.resize(image, None, fx=0.5, fy=0.5, INTER_CUBIC)`."""
    return _halving_matrix(image.shape[0]) @ image @ _halving_matrix(image.shape[1]).T


def features(image: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a uint8 HxW[x1] image (18 per scale, two scales)."""
    gray = _gray(image)
    out = []
    for _ in range(2):
        m = mscn(gray)
        out += ggd_fit(m)
        for pair in (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :],         # horizontal, vertical
                     m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]):  # both diagonals
            out += aggd_fit(pair)
        gray = halve(gray)
    return np.asarray(out, np.float64)


@dataclasses.dataclass(frozen=True)
class SVR:
    """A libsvm epsilon-SVR with an RBF kernel, and the feature ranges it was trained on."""

    support: np.ndarray    # [S, F] support vectors (scaled features)
    coef: np.ndarray       # [S] dual coefficients
    gamma: float
    rho: float
    low: np.ndarray        # [F] feature minima, mapped to -1
    high: np.ndarray       # [F] feature maxima, mapped to +1

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Scores [N] of raw features [N, F]: sum_i coef_i exp(-gamma |sv_i - x'|^2) - rho
        with x' the features scaled to [-1, 1] by the training ranges."""
        scaled = -1 + 2 * (np.atleast_2d(x) - self.low) / (self.high - self.low)
        d2 = ((scaled[:, None, :] - self.support[None]) ** 2).sum(-1)
        return np.exp(-self.gamma * d2) @ self.coef - self.rho


def read_libsvm_model(text: str, num_features: int) -> tuple[np.ndarray, np.ndarray,
                                                               float, float]:
    """(support, coef, gamma, rho) of a single-output RBF model in libsvm's text format."""
    header, _, body = text.partition("\nSV\n")
    fields = dict(line.split(" ", 1) for line in header.splitlines())
    if fields.get("kernel_type") != "rbf" or fields.get("svm_type") != "epsilon_svr":
        raise ValueError("expected a libsvm epsilon_svr model with an rbf kernel")
    rows = [line.split() for line in body.splitlines() if line.strip()]
    support = np.zeros((len(rows), num_features))
    for r, row in enumerate(rows):
        for item in row[1:]:
            index, value = item.split(":")
            support[r, int(index) - 1] = float(value)    # libsvm indices start at 1
    coef = np.array([float(row[0]) for row in rows])
    return support, coef, float(fields["gamma"]), float(fields["rho"])


@functools.cache
def live_model() -> SVR:
    """The LIVE-trained BRISQUE regressor shipped in `brisque_live/`."""
    support, coef, gamma, rho = read_libsvm_model((MODEL_DIR / "svm.txt").read_text(),
                                                  NUM_FEATURES)
    ranges = json.loads((MODEL_DIR / "ranges.json").read_text())
    return SVR(support, coef, gamma, rho, np.asarray(ranges["min"]), np.asarray(ranges["max"]))


def brisque(image: np.ndarray) -> float:
    """The BRISQUE score of a uint8 HxW[x1] image: lower is better; NaN for a flat image."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)   # a flat image: empty means
        f = features(image)
    return float(live_model().predict(f)[0]) if np.isfinite(f).all() else float("nan")


def score_dataset(ds, indices: np.ndarray | None = None, *, progress: bool = True
                  ) -> np.ndarray:
    """BRISQUE scores [len(indices)] of ds.source[indices] (default: every example).

    Each example is scored once per dataset build: the scores are kept in
    `<ds.source.arrays_dir>/brisque-v<CACHE_VERSION>.npz` (updated under the build lock and
    replaced atomically), so a second call only reads them. A source without `arrays_dir`
    (in-memory examples) is scored every time."""
    n = len(ds.source)
    indices = np.arange(n) if indices is None else np.asarray(indices, np.int64)
    arrays_dir = getattr(ds.source, "arrays_dir", None)
    if arrays_dir is None:
        return _score_rows(ds.source, indices, progress)
    from data_pipeline.datasets import build_lock  # the lock of the dataset builds

    path = Path(arrays_dir) / f"brisque-v{CACHE_VERSION}.npz"
    scores, done = _read_cache(path, n)
    if not done[indices].all():
        with build_lock(path.with_suffix("")):
            scores, done = _read_cache(path, n)   # another process may have added
            todo = np.unique(indices[~done[indices]])
            scores[todo] = _score_rows(ds.source, todo, progress)
            done[todo] = True
            save_npz(path, scores=scores, done=done)
    return scores[indices]


def _score_rows(source, rows: np.ndarray, progress: bool) -> np.ndarray:
    scores = np.empty(len(rows))
    with tqdm(total=len(rows), desc=f"BRISQUE of {len(rows)} images", unit="img",
              disable=not progress) as bar:
        for start, examples in chunks(source, rows):
            scores[start:start + len(examples)] = [brisque(e["image"]) for e in examples]
            bar.update(len(examples))
    return scores


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, done) of all n examples; done is False where not scored yet."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            if f["scores"].shape == (n,) and f["done"].shape == (n,):
                return f["scores"].astype(np.float64), f["done"].astype(bool)
    return np.full(n, np.nan), np.zeros(n, bool)


def quality_filter(scores: np.ndarray, *, quality_max: float | None = None,
                   drop_worst: float | None = None) -> np.ndarray:
    """A keep mask [N]: False for a score above `quality_max` and for the round(drop_worst * N)
    worst scores (highest first; ties by position; NaN counts as the worst)."""
    scores = np.asarray(scores, np.float64)
    worst = np.where(np.isnan(scores), np.inf, scores)
    keep = np.ones(len(scores), bool)
    if quality_max is not None:
        keep &= worst <= quality_max
    if drop_worst is not None:
        if not 0 <= drop_worst < 1:
            raise ValueError(f"drop_worst must be in [0, 1); got {drop_worst}")
        keep[np.argsort(-worst, kind="stable")[:round(drop_worst * len(scores))]] = False
    return keep
