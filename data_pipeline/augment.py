"""Random affine + photometric augmentation, once in numpy (host workers) and once in JAX (device).

Both implementations draw the same kind of parameters and apply the same transform, so they
are interchangeable (a test checks they agree for equal parameters):

- affine about the image centre: rotation, isotropic zoom, translation (fraction of the
  size), optional horizontal flip; bilinear sampling with edge replication, so no border of
  an arbitrary fill value appears and values stay inside the input's range;
- photometric: contrast scales around the image mean, brightness shifts by a fraction of the
  image's value span; the result is clipped to the input's [min, max].

Working in the image's own range makes the transform independent of the normalization
(unit, caffe, tf, torch, ...) that preprocessing applied before it. Horizontal flip is off
by default: chest anatomy is not left-right symmetric (heart on the left).

Default place: on device (`augment_batch` under jit; `DEFAULT_ON_DEVICE`): on CPU an order of
magnitude faster than the scipy host path, which would also about halve the Grain loader
(`benchmarks/input_pipeline.py`; figures in docs/measured.md). On an accelerator the device
transform is cheaper still and leaves the host cores to decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

# Where training augments by default: True = on device with `augment_batch` (the loader only
# decodes + preprocesses); False = in the Grain workers with `augment_image`.
DEFAULT_ON_DEVICE = True


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strength of each random transform; every draw is uniform in [-x, x] (or [1-x, 1+x])."""

    rotation_deg: float = 10.0
    zoom: float = 0.1        # scale factor in [1 - zoom, 1 + zoom]
    translate: float = 0.05  # shift, as a fraction of height / width
    brightness: float = 0.1  # shift, as a fraction of the image's value span
    contrast: float = 0.1    # factor in [1 - contrast, 1 + contrast] around the mean
    hflip: bool = False      # flip with probability 1/2 when True

    def __post_init__(self):
        for name in ("rotation_deg", "zoom", "translate", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1 or self.contrast >= 1:
            raise ValueError("AugmentConfig.zoom and .contrast must be < 1")


class AugmentParams(NamedTuple):
    """One image's draw: angle (radians), zoom, shift (rows, cols; fractions), flip, photometric."""

    angle: float
    scale: float
    shift_y: float
    shift_x: float
    flip: bool
    brightness: float
    contrast: float


def sample_params(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentParams:
    """Draw one image's parameters; always draws 7 numbers so streams stay aligned."""
    u = rng.uniform(-1.0, 1.0, size=6)
    flip = bool(rng.random() < 0.5) and cfg.hflip
    return AugmentParams(
        angle=float(np.deg2rad(cfg.rotation_deg) * u[0]), scale=float(1.0 + cfg.zoom * u[1]),
        shift_y=float(cfg.translate * u[2]), shift_x=float(cfg.translate * u[3]), flip=flip,
        brightness=float(cfg.brightness * u[4]), contrast=float(1.0 + cfg.contrast * u[5]))


def _affine(angle, scale, shift_y, shift_x, height: int, width: int, xp):
    """Matrix and offset mapping output (row, col) to input (row, col), as scipy expects."""
    cos, sin = xp.cos(angle) / scale, xp.sin(angle) / scale
    matrix = xp.stack([xp.stack([cos, -sin]), xp.stack([sin, cos])])
    centre = xp.array([(height - 1) / 2.0, (width - 1) / 2.0])
    shift = xp.stack([shift_y * height, shift_x * width])
    return matrix, centre - matrix @ (centre + shift)


def _photometric(image, brightness, contrast, lo, hi, xp):
    mean = image.mean()
    out = (image - mean) * contrast + mean + brightness * (hi - lo)
    return xp.clip(out, lo, hi)


def apply_params(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """Apply one draw to a float32 HxWxC image with numpy/scipy."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = image.min(), image.max()
    if p.flip:
        image = image[:, ::-1]
    h, w = image.shape[:2]
    matrix, offset = _affine(np.float64(p.angle), p.scale, p.shift_y, p.shift_x, h, w, np)
    out = np.stack([ndimage.affine_transform(image[..., c], matrix, offset, order=1,
                                             mode="nearest") for c in range(image.shape[-1])],
                   axis=-1)
    return _photometric(out, np.float32(p.brightness), np.float32(p.contrast), lo, hi,
                        np).astype(np.float32)


def augment_image(image: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig) -> np.ndarray:
    """Augment one float32 HxWxC image on the host (for Grain workers)."""
    if image.ndim != 3:
        raise ValueError(f"augment_image expects HxWxC, got shape {image.shape}")
    return apply_params(image, sample_params(rng, cfg))


def _sample_params_jax(key: jax.Array, cfg: AugmentConfig) -> AugmentParams:
    u = jax.random.uniform(key, (7,), minval=-1.0, maxval=1.0)
    flip = jnp.logical_and(u[6] < 0.0, cfg.hflip)
    return AugmentParams(
        angle=jnp.deg2rad(cfg.rotation_deg) * u[0], scale=1.0 + cfg.zoom * u[1],
        shift_y=cfg.translate * u[2], shift_x=cfg.translate * u[3], flip=flip,
        brightness=cfg.brightness * u[4], contrast=1.0 + cfg.contrast * u[5])


def apply_params_jax(image: jax.Array, p: AugmentParams) -> jax.Array:
    """Apply one draw to an HxWxC image with JAX (traceable; same maths as `apply_params`)."""
    lo, hi = image.min(), image.max()
    image = jnp.where(p.flip, image[:, ::-1], image)
    h, w = image.shape[:2]
    matrix, offset = _affine(p.angle, p.scale, p.shift_y, p.shift_x, h, w, jnp)
    grid = jnp.stack(jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                                  jnp.arange(w, dtype=jnp.float32), indexing="ij"))
    coords = jnp.einsum("ij,jhw->ihw", matrix, grid) + offset[:, None, None]
    sample = functools.partial(jax.scipy.ndimage.map_coordinates, coordinates=list(coords),
                               order=1, mode="nearest")
    out = jax.vmap(sample, in_axes=-1, out_axes=-1)(image)
    return _photometric(out, p.brightness, p.contrast, lo, hi, jnp).astype(image.dtype)


@functools.partial(jax.jit, static_argnames="cfg")
def augment_batch(key: jax.Array, images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """Augment a [B, H, W, C] batch on device, one independent draw per image (key split B ways)."""
    if images.ndim != 4:
        raise ValueError(f"augment_batch expects [B, H, W, C], got shape {images.shape}")
    keys = jax.random.split(key, images.shape[0])
    params = jax.vmap(_sample_params_jax, in_axes=(0, None))(keys, cfg)
    return jax.vmap(apply_params_jax)(images, params)
