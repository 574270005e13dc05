"""Per-image preprocessing: equalisation, lung masking, resize, channels, normalisation.

Pure numpy functions of one example, cheap enough to run inside Grain workers. The steps run
in a fixed order -- contrast equalisation (CLAHE or local histogram equalisation) on the
source image, lung masking, resize to a square, gray -> 3 channels, normalisation -- and work
on 0-255 float values until the last step, so the pretrained-model presets match
`keras.applications.*.preprocess_input` on the same RGB (gray repeated) image:

- "caffe" (ResNet50, VGG): RGB -> BGR, subtract the ImageNet means [103.939, 116.779, 123.68];
- "tf" (Xception, InceptionV3): x / 127.5 - 1;
- "torch" (DenseNet121): (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image
from skimage import exposure
from skimage.filters import rank
from skimage.morphology import disk

NORMALIZATIONS = ("unit", "caffe", "tf", "torch", "dataset", "xray")
RESIZES = ("pad", "crop")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
_RGB_ONLY = ("caffe", "torch")  # per-channel ImageNet constants: need 3 channels


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How one uint8 HxWx1 image becomes a float32 [S, S, C] model input.

    resize: "pad" keeps the aspect ratio and letterboxes with black (0) pixels; "crop" keeps
    it and takes the centred square. normalization: see the module docstring, plus "unit"
    ([0, 1]), "dataset" ((x / 255 - mean) / std, see `dataset_mean_std`) and "xray"
    (x / 255 * 2048 - 1024, the [-1024, 1024] convention of torchxrayvision). CLAHE
    (`clahe_clip` is skimage's clip_limit) and local histogram equalisation in a disk of
    `local_equalize_radius` source pixels are exclusive. lung_mask zeroes pixels outside the
    lung mask, which `preprocess` then requires.
    """

    image_size: int = 128
    channels: int = 1
    resize: str = "pad"
    normalization: str = "unit"
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    clahe: bool = False
    clahe_clip: float = 0.01
    local_equalize: bool = False
    local_equalize_radius: int = 16
    lung_mask: bool = False

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.normalization in _RGB_ONLY and self.channels != 3:
            raise ValueError(f"normalization {self.normalization!r} is an ImageNet RGB preset "
                             f"and needs channels=3, got channels={self.channels}")
        if self.clahe and self.local_equalize:
            raise ValueError("clahe and local_equalize are exclusive; choose one")
        if not 0 < self.clahe_clip <= 1:
            raise ValueError(f"clahe_clip must be in (0, 1], got {self.clahe_clip!r}")
        if self.local_equalize_radius < 1:
            raise ValueError(
                f"local_equalize_radius must be >= 1 pixel, got {self.local_equalize_radius!r}")
        self._check_stats()

    def _check_stats(self):
        if self.normalization != "dataset":
            if self.mean is not None or self.std is not None:
                raise ValueError(f"mean/std are only used by normalization='dataset', "
                                 f"not {self.normalization!r}")
            return
        if self.mean is None or self.std is None:
            raise ValueError("normalization='dataset' needs mean and std "
                             "(compute them with dataset_mean_std)")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in np.atleast_1d(getattr(self, name)))
            if len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs one value per channel ({self.channels}) or a "
                                 f"single value, got {len(values)}")
            object.__setattr__(self, name, values)  # hashable, stable repr in run configs
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")


def preprocess(image: np.ndarray, cfg: PreprocessConfig,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Turn one uint8 HxWx1 image (and optional uint8 HxWx1 lung mask) into float32 [S,S,C]."""
    _check_uint8_hw1(image, "image")
    x = equalize(image[..., 0], cfg)
    if cfg.lung_mask:
        if mask is None:
            raise ValueError("cfg.lung_mask is set but no mask was given for this image")
        _check_uint8_hw1(mask, "mask")
        x = apply_lung_mask(x, mask[..., 0])
    x = resize(x, cfg.image_size, cfg.resize)
    x = np.repeat(x[..., None], cfg.channels, axis=-1)
    return normalize(x, cfg)


def equalize(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Contrast equalisation of a uint8 HxW image -> float32 HxW on the 0-255 scale."""
    if cfg.clahe:
        return (exposure.equalize_adapthist(image, clip_limit=cfg.clahe_clip) * 255).astype(
            np.float32)
    if cfg.local_equalize:
        return rank.equalize(image, footprint=disk(cfg.local_equalize_radius)).astype(np.float32)
    return image.astype(np.float32)


def apply_lung_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero an HxW image outside the lung (mask > 127); a mask of another size is resized."""
    if mask.shape != image.shape:
        mask = np.asarray(Image.fromarray(mask).resize(image.shape[::-1], Image.Resampling.NEAREST))
    return np.where(mask > 127, image, 0).astype(np.float32)


def resize(image: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Bilinear resize of a float32 HxW image to size x size, keeping the aspect ratio.

    "pad" fits the longer side and centres the image between black (0) bars; "crop" takes
    the centred square of side min(H, W).
    """
    h, w = image.shape
    if mode == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _bilinear(image[top:top + side, left:left + side], size, size)
    if mode != "pad":
        raise ValueError(f"resize mode must be one of {RESIZES}, got {mode!r}")
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = _bilinear(image, nh, nw)
    return out


def _bilinear(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape == (h, w):
        return image.astype(np.float32)
    resized = Image.fromarray(image.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32)


def normalize(x: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Map 0-255 float values [..., C] to the model's input range (cfg.normalization)."""
    mode = cfg.normalization
    if mode == "unit":
        out = x / 255.0
    elif mode == "caffe":
        out = x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN)
    elif mode == "tf":
        out = x / 127.5 - 1.0
    elif mode == "torch":
        out = (x / 255.0 - np.asarray(TORCH_MEAN)) / np.asarray(TORCH_STD)
    elif mode == "dataset":
        out = (x / 255.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
    else:  # "xray"
        out = x / 255.0 * 2048.0 - 1024.0
    return out.astype(np.float32)


def dataset_mean_std(images: Iterable[np.ndarray], cfg: PreprocessConfig,
                     masks: Iterable[np.ndarray] | None = None,
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images preprocessed by `cfg` on the [0, 1] scale.

    Use the result as `dataclasses.replace(cfg, normalization="dataset", mean=m, std=s)`;
    compute it on training images only.
    """
    unit = dataclasses.replace(cfg, normalization="unit", mean=None, std=None)
    masks = iter(masks) if masks is not None else None
    total, total_sq, count = np.zeros(unit.channels), np.zeros(unit.channels), 0
    for image in images:
        x = preprocess(image, unit, next(masks) if masks is not None else None)
        flat = x.reshape(-1, unit.channels).astype(np.float64)
        total += flat.sum(0)
        total_sq += np.square(flat).sum(0)
        count += len(flat)
    if count == 0:
        raise ValueError("dataset_mean_std needs at least one image")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_uint8_hw1(array: np.ndarray, name: str) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 \
            or array.shape[-1] != 1:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ValueError(f"{name} must be a uint8 array of shape HxWx1, got {dtype} {shape}")
