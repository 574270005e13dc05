"""Augmentation: identity at zero strength, determinism, per-image draws, range, host == device."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from data_pipeline.augment import (
    AugmentConfig,
    AugmentParams,
    apply_params,
    apply_params_jax,
    augment_batch,
    augment_image,
    sample_params,
)

ZERO = AugmentConfig(rotation_deg=0, zoom=0, translate=0, brightness=0, contrast=0)
STRONG = AugmentConfig(rotation_deg=25, zoom=0.2, translate=0.1, brightness=0.2, contrast=0.3,
                       hflip=True)


def _images(b: int = 4, size: int = 24, c: int = 1, offset: float = 0.0) -> np.ndarray:
    """Structured images (gradient + blob) so that a transform visibly changes them."""
    yy, xx = np.mgrid[:size, :size] / (size - 1)
    base = 0.6 * xx + 0.3 * np.exp(-((yy - 0.3) ** 2 + (xx - 0.6) ** 2) / 0.02)
    imgs = np.stack([np.roll(base, i, axis=0) for i in range(b)])[..., None]
    return (np.repeat(imgs, c, axis=-1) + offset).astype(np.float32)


def test_default_config_has_no_flip():
    assert AugmentConfig().hflip is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        AugmentConfig().zoom = 0.5  # type: ignore[misc]


def test_config_rejects_negative_strength():
    with pytest.raises(ValueError, match="rotation_deg must be >= 0"):
        AugmentConfig(rotation_deg=-1)


@pytest.mark.parametrize("channels", [1, 3])
def test_zero_strength_is_identity_on_host_and_device(channels):
    imgs = _images(c=channels, offset=-0.5)  # a normalization with negative values
    host = augment_image(imgs[0], np.random.default_rng(0), ZERO)
    np.testing.assert_allclose(host, imgs[0], atol=1e-6)
    device = np.asarray(augment_batch(jax.random.key(0), imgs, ZERO))
    np.testing.assert_allclose(device, imgs, atol=1e-6)


def test_host_is_deterministic_given_seed():
    img = _images()[0]
    a = augment_image(img, np.random.default_rng(7), STRONG)
    b = augment_image(img, np.random.default_rng(7), STRONG)
    c = augment_image(img, np.random.default_rng(8), STRONG)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_device_is_deterministic_given_key_and_differs_per_image():
    same = np.repeat(_images(1), 4, axis=0)  # four copies of one image
    a = np.asarray(augment_batch(jax.random.key(1), same, STRONG))
    b = np.asarray(augment_batch(jax.random.key(1), same, STRONG))
    c = np.asarray(augment_batch(jax.random.key(2), same, STRONG))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # each copy got its own draw: all pairwise different
    diffs = [np.abs(a[i] - a[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(diffs) > 1e-3


@pytest.mark.parametrize("size", [24, 33])
def test_shape_dtype_range_kept(size):
    imgs = _images(size=size, c=3, offset=-0.2) * 4.0
    dev = np.asarray(augment_batch(jax.random.key(3), imgs, STRONG))
    host = np.stack([augment_image(im, np.random.default_rng(i), STRONG)
                     for i, im in enumerate(imgs)])
    for out in (dev, host):
        assert out.shape == imgs.shape and out.dtype == np.float32
        assert np.isfinite(out).all()
        for o, im in zip(out, imgs):
            assert o.min() >= im.min() - 1e-6 and o.max() <= im.max() + 1e-6


def test_host_and_device_apply_the_same_transform():
    rng = np.random.default_rng(0)
    img = _images(1, size=20, c=3)[0]
    for _ in range(5):
        p = sample_params(rng, STRONG)
        host = apply_params(img, p)
        dev = np.asarray(jax.jit(apply_params_jax)(img, AugmentParams(*(np.asarray(v) for v in p))))
        np.testing.assert_allclose(host, dev, atol=1e-4)


def test_known_transform_rotation_and_flip():
    img = np.zeros((5, 5, 1), np.float32)
    img[0, 2] = 1.0  # top-middle pixel
    # 90 degrees: output (r, c) samples input c + R (o - c); output (2, 4) reads input (0, 2)
    p = AugmentParams(angle=np.pi / 2, scale=1.0, shift_y=0.0, shift_x=0.0, flip=False,
                      brightness=0.0, contrast=1.0)
    out = apply_params(img, p)
    assert out[2, 4, 0] == pytest.approx(1.0, abs=1e-5) and out.sum() == pytest.approx(1.0)
    eye = np.eye(5, dtype=np.float32)[..., None]
    flipped = apply_params(eye, p._replace(angle=0.0, flip=True))
    np.testing.assert_allclose(flipped[..., 0], np.eye(5)[:, ::-1], atol=1e-6)


def test_brightness_and_contrast_are_relative_to_the_image():
    img = _images(1, c=1)[0] * 100.0 - 30.0  # arbitrary scale
    p = AugmentParams(0.0, 1.0, 0.0, 0.0, False, brightness=0.0, contrast=0.5)
    out = apply_params(img, p)
    np.testing.assert_allclose(out, (img - img.mean()) * 0.5 + img.mean(), rtol=1e-5, atol=1e-4)
    shifted = apply_params(img, p._replace(contrast=1.0, brightness=0.1))
    span = img.max() - img.min()
    np.testing.assert_allclose(shifted, np.minimum(img + 0.1 * span, img.max()), atol=1e-4)
