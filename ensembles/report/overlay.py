"""Grad-CAM overlays: a colour map over the gray X-ray, with the decided class and its
probability in the top-left corner.

`bundle_overlays` takes raw uint8 images (as decoded), preprocesses them as the bundle does,
computes `ensembles.report.saliency.ensemble_gradcam` and renders each image's combined map (the
ensemble's decision) over the image as the model saw it: resized to a square with the
bundle's resize mode ("pad" letterboxes, "crop" takes the centred square), so map and image
share one geometry; shown at `size` px (default max(model input, 256)), the map upsampled
bilinearly and scaled to [0, 1] per image. `write_png` writes a file whole or not at all.
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from backbones.gradcam import normalise, upsample
from data_pipeline.atomic import atomic_write
from data_pipeline.loader import pad_batch
from data_pipeline.preprocess import preprocess, resize
from ensembles.bundle import Bundle
from ensembles.report.saliency import EnsembleCams, ensemble_gradcam

MIN_DISPLAY = 256  # default overlay side: the model input, at least this many pixels


def render(gray: np.ndarray, heat: np.ndarray, text: str, *, alpha: float = 0.4,
           cmap: str = "jet") -> np.ndarray:
    """uint8 RGB [H, W, 3]: `heat` [H, W] in [0, 1] through the matplotlib colour map
    `cmap`, alpha-blended over the uint8 `gray` [H, W], `text` on a dark box top left."""
    if gray.shape != heat.shape:
        raise ValueError(f"image {gray.shape} and map {heat.shape} differ in size")
    colours = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    base = np.repeat(gray[..., None].astype(np.float64), 3, axis=-1)
    image = Image.fromarray(np.round((1 - alpha) * base + alpha * colours).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, gray.shape[0] // 20))
    left, top, right, bottom = draw.textbbox((3, 2), text, font=font)
    draw.rectangle((0, 0, right + 3, bottom + 3), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def _concat(parts: list[EnsembleCams]) -> EnsembleCams:
    first = parts[0]
    return EnsembleCams(
        np.concatenate([p.member_maps for p in parts], axis=1),
        np.concatenate([p.member_classes for p in parts], axis=1),
        *(np.concatenate([getattr(p, f) for p in parts])
          for f in ("combined", "decisions", "proba")), first.method)


def bundle_gradcam(bundle: Bundle, images: Sequence[np.ndarray], *, batch_size: int = 32,
                   masks: Sequence[np.ndarray | None] | None = None) -> EnsembleCams:
    """ensemble_gradcam of raw uint8 HxWx1 images, preprocessed as the bundle was trained
    (lung masks: `Bundle.lung_masks`), in batches of `batch_size` (the last one padded, so
    one shape compiles)."""
    if not len(images):
        raise ValueError("no images to explain")
    masks = bundle.lung_masks(images, masks) or [None] * len(images)
    x = np.stack([preprocess(im, bundle.preprocess, m) for im, m in zip(images, masks,
                                                                         strict=True)])
    parts = []
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        out = ensemble_gradcam(bundle, pad_batch(chunk, batch_size))
        n = len(chunk)
        parts.append(EnsembleCams(out.member_maps[:, :n], out.member_classes[:, :n],
                                  out.combined[:n], out.decisions[:n], out.proba[:n],
                                  out.method))
    return _concat(parts)


def bundle_overlays(bundle: Bundle, images: Sequence[np.ndarray], *, size: int | None = None,
                    batch_size: int = 32, alpha: float = 0.4,
                    masks: Sequence[np.ndarray | None] | None = None
                    ) -> tuple[EnsembleCams, list[np.ndarray]]:
    """(the maps, one uint8 RGB [size, size, 3] overlay per raw uint8 HxWx1 image) for the
    ensemble's decisions; the corner text is "<class> <probability>"."""
    cams = bundle_gradcam(bundle, images, batch_size=batch_size, masks=masks)
    side = size or max(bundle.preprocess.image_size, MIN_DISPLAY)
    heat = np.asarray(normalise(upsample(cams.combined, (side, side))))
    overlays = []
    for image, h, d, p in zip(images, heat, cams.decisions, cams.proba, strict=True):
        gray = resize(image[..., 0].astype(np.float32), side, bundle.preprocess.resize)
        text = f"{bundle.class_names[d]} {p[d]:.2f}"
        overlays.append(render(np.clip(np.round(gray), 0, 255).astype(np.uint8), h, text,
                               alpha=alpha))
    return cams, overlays


def overlay_names(paths: Sequence[str | Path]) -> list[str]:
    """A distinct PNG file name per input path: "<stem>.png" (characters other than letters,
    digits, ".", "-", "_" replaced by "_"), with "-<8 hex digits of the path's SHA-256>"
    added where stems would collide (same name in two folders)."""
    stems = [re.sub(r"[^A-Za-z0-9._-]", "_", Path(p).stem) or "image" for p in paths]
    counts = collections.Counter(stems)
    names = [f"{s}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}.png" if counts[s] > 1
             else f"{s}.png" for s, p in zip(stems, paths, strict=True)]
    if len(set(names)) != len(names):
        raise ValueError("overlay file names collide; rename the inputs")
    return names


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write `rgb` as a PNG through a temporary file in the same folder renamed over `path`:
    the file is the whole image or absent (or what it was before), never a part."""
    with atomic_write(path, "wb") as fh:
        Image.fromarray(rgb).save(fh, format="PNG")
