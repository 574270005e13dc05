"""Procedural chest radiograph phantoms: a labelled dataset that needs no download.

Each example is a frontal (PA) chest film drawn from simple anatomy -- soft tissue, two dark
lung fields, a bright mediastinum with a heart shadow to the patient's left, ribs, clavicles,
spine and diaphragm domes -- under varying acquisition (exposure, gamma, noise, blur, patient
pose) with class-independent artefacts (side marker, ECG wires). Findings are drawn inside the
lung mask with a per-example severity whose range overlaps between classes, so the task is
learnable but not trivially separable:

- viral_pneumonia: bilateral, perihilar reticular (fine network) pattern;
- covid: bilateral ground-glass patches at the lateral, lower lung periphery;
- bacterial_pneumonia: one dense, homogeneous lobar consolidation in one lung, sometimes with
  dark air-bronchogram lines;
- normal: none, although some normals show faint texture or a faint patch.

Every random draw of example ``i`` comes from its own generator seeded by ``(seed, i)``, so
growing ``count`` keeps earlier examples unchanged; rendering is vectorised over chunks.
Coordinates are normalised to [-1, 1] (x left to right on the image, y top to bottom), so
the same example can be drawn at any size; images under 64 px are rendered larger and
block-averaged so fine texture is integrated rather than aliased.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_pipeline import classes as cls

_CHUNK_PIXELS = 64 * 128 * 128  # pixels rendered together: ~4 MB per float32 map
_MIN_RENDER = 64       # smaller images are supersampled from at least this size
_VESSEL_GRID = 12      # control points across the image for each smooth noise field
_RETICULAR_GRID = 22
_BRONCHUS_GRID = 10
_MAX_BLOBS = 8
_MAX_WIRES = 3
_SUPPORTED = (cls.COVID, cls.NORMAL, cls.VIRAL_PNEUMONIA, cls.BACTERIAL_PNEUMONIA)
# 5x3 bitmaps of the side-marker letters.
_LETTERS = np.array([
    [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]],   # L
    [[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 0, 1]],   # R
], dtype=np.float32)


def generate_phantoms(count: int, *, image_size: int = 128,
                      classes: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Draw `count` labelled phantom radiographs.

    Returns {"image": uint8 [N,S,S,1], "mask": uint8 [N,S,S,1] (255 = lung field),
    "label": int64 [N] (index into class_names), "patient_id": str [N],
    "class_names": tuple[str, ...]}. Labels are balanced: each consecutive block of
    len(class_names) examples holds every class once, in a seeded random order.
    """
    class_names = _check_classes(classes)
    if count < 0 or seed < 0:
        raise ValueError(f"count and seed must be >= 0, got count={count}, seed={seed}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    labels = _labels(count, len(class_names), seed)
    factor = -(-_MIN_RENDER // image_size) if image_size < _MIN_RENDER else 1
    render = image_size * factor
    images = np.empty((count, image_size, image_size, 1), np.uint8)
    masks = np.empty((count, image_size, image_size, 1), np.uint8)
    chunk = max(1, _CHUNK_PIXELS // render ** 2)
    for start in range(0, count, chunk):
        idx = range(start, min(start + chunk, count))
        params = _stack([_draw(np.random.default_rng([seed, 0, i]), class_names[labels[i]],
                               render) for i in idx])
        img, lung = _render(params, render)
        if factor > 1:
            img, lung = _block_mean(img, factor), _block_mean(lung, factor)
        images[idx.start:idx.stop, ..., 0] = np.round(img * 255)
        masks[idx.start:idx.stop, ..., 0] = np.where(lung > 0.5, 255, 0)
    return {
        "image": images,
        "mask": masks,
        "label": labels.astype(np.int64),
        "patient_id": np.array([f"synthetic-{i:06d}" for i in range(count)]),
        "class_names": class_names,
    }


def _check_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        return cls.DEFAULT_CLASSES
    if isinstance(classes, str):
        raise ValueError(f"classes must be a sequence of names, got the string {classes!r}")
    chosen = cls.select_classes(_SUPPORTED, classes)
    if not chosen:
        raise ValueError("classes must name at least one class")
    return chosen


def _labels(count: int, num_classes: int, seed: int) -> np.ndarray:
    """Balanced labels that never change for an index: block b is a seeded permutation."""
    blocks = -(-count // num_classes)
    perms = [np.random.default_rng([seed, 1, b]).permutation(num_classes) for b in range(blocks)]
    return np.concatenate(perms or [np.zeros(0, int)])[:count]


# ----------------------------------------------------------------------------------------
# Per-example parameters: every random draw of one example, in a fixed order.

# name: (low, high) of a uniform draw, in normalised image units unless stated.
_SCALARS: dict[str, tuple[float, float]] = {
    # patient pose
    "angle": (-5.0, 5.0), "tx": (-0.06, 0.06), "ty": (-0.05, 0.07), "scale": (0.88, 1.04),
    # anatomy
    "width": (0.9, 1.05), "height": (0.92, 1.05), "heart_x": (0.12, 0.2),
    "heart_rx": (0.32, 0.4), "heart_ry": (0.26, 0.34), "dome_r": (0.4, 0.52),
    "dome_gap": (0.02, 0.08), "rib_phase": (0.0, 1.0), "rib_pitch": (0.9, 1.1),
    "clav_y": (-0.66, -0.54), "tissue": (0.55, 0.85), "lung_air": (0.45, 0.6),
    # acquisition
    "exposure": (1.4, 2.2), "gamma": (0.75, 1.3), "noise": (0.005, 0.03),
    "blur": (0.0, 0.008), "black": (0.0, 0.08), "white": (0.9, 1.0),
    # side marker
    "marker_x": (-0.9, 0.6), "marker_y": (-0.92, -0.75), "marker_size": (0.08, 0.12),
    # lobar consolidation geometry
    "lobe_cut": (-0.15, 0.15), "lobe_tilt": (-0.4, 0.4), "lobe_extent": (0.25, 0.55),
    "lobe_center": (0.35, 0.6),
}
# name: probability of a yes/no draw (class-independent).
_FLAGS: dict[str, float] = {"gas": 0.4, "marker": 0.5, "marker_letter": 0.5,
                            "lobe_right": 0.5, "lobe_upper": 0.35, "bronchogram": 0.5}
_WIRE = {"amp": (0.15, 0.35), "y": (-0.6, 0.6), "bend": (-0.4, 0.4), "freq": (1.0, 4.0),
         "phase": (0.0, 2 * np.pi)}
_WIRE_PROB = 0.25
_BLOB = {"u": (0.45, 0.72), "v": (-0.05, 0.5), "r": (0.12, 0.24)}
_BLOB_PROB = 0.7
_SEVERITIES = ("sev_reticular", "sev_ggo", "sev_consolidation")
_NAMES = (*_SCALARS, *_FLAGS, *_SEVERITIES)


def _uniform(rng: np.random.Generator, table: dict[str, tuple[float, float]],
             n: int | None = None) -> np.ndarray:
    low, high = np.array(list(table.values())).T
    shape = None if n is None else (n, len(table))
    return rng.uniform(low, high, shape).T if n else rng.uniform(low, high)


def _draw(rng: np.random.Generator, label: str, render: int) -> dict[str, np.ndarray]:
    """All random draws of one example: scalars, blob/wire tables, noise grids."""
    scalars = _uniform(rng, _SCALARS)
    flags = rng.random(len(_FLAGS)) < np.array(list(_FLAGS.values()))
    wires = _uniform(rng, _WIRE, _MAX_WIRES)
    wires[0] *= rng.random(_MAX_WIRES) < _WIRE_PROB
    blobs = np.concatenate([_uniform(rng, _BLOB, _MAX_BLOBS),
                            (rng.random((1, _MAX_BLOBS)) < _BLOB_PROB)])
    blobs[3, rng.integers(_MAX_BLOBS, size=2)] = 1.0     # at least two patches ...
    side = np.where(rng.random(_MAX_BLOBS) < 0.5, -1.0, 1.0)
    side[:2] = (-1.0, 1.0)                                # ... on both sides
    blobs[0] *= side
    grids = [rng.standard_normal((n, n), dtype=np.float32)
             for n in (_VESSEL_GRID, _RETICULAR_GRID, _BRONCHUS_GRID)]
    noise = rng.standard_normal((render, render), dtype=np.float32)
    return {"scalars": np.concatenate([scalars, flags, _severities(rng, label)]),
            "wires": wires, "blobs": blobs, "vessels": grids[0], "reticular": grids[1],
            "bronchi": grids[2], "pixel_noise": noise}


def _severities(rng: np.random.Generator, label: str) -> np.ndarray:
    """Finding strengths in [0, 1]; ranges overlap so mild cases look nearly normal."""
    draw = rng.uniform(size=6)
    faint = lambda k, prob, hi: draw[k] * hi if draw[k + 3] < prob else 0.0  # noqa: E731
    ret, ggo, cons = faint(0, 0.3, 0.25), faint(1, 0.15, 0.25), 0.0
    strong = 0.35 + 0.65 * rng.uniform()
    if label == cls.VIRAL_PNEUMONIA:
        ret, ggo = strong, faint(1, 0.3, 0.3)
    elif label == cls.COVID:
        ggo, ret = strong, faint(0, 0.4, 0.3)
    elif label == cls.BACTERIAL_PNEUMONIA:
        cons, ret = strong, faint(0, 0.2, 0.25)
    return np.array([ret, ggo, cons])


def _stack(params: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack a chunk; each named scalar becomes float32 [B, 1, 1] to broadcast over pixels."""
    out = {k: np.stack([p[k] for p in params]).astype(np.float32) for k in params[0]}
    scalars = out.pop("scalars")[..., None, None]
    out.update(zip(_NAMES, np.moveaxis(scalars, 1, 0), strict=True))
    out["angle"] = np.deg2rad(out["angle"])
    return out


# ----------------------------------------------------------------------------------------
# Rendering, vectorised over a chunk of examples.


def _step(z: np.ndarray) -> np.ndarray:
    """A cheap sigmoid: linear ramp from 0 (z <= -2) to 1 (z >= 2)."""
    z = z * 0.25
    z += 0.5
    return np.clip(z, 0.0, 1.0, out=z)


def _band(d: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Gaussian profile exp(-(d / width)^2), computed in place on one temporary."""
    z = np.square(d / width)
    np.negative(z, out=z)
    return np.exp(z, out=z)


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(a^2 + b^2); several times faster than np.hypot on float32."""
    return np.sqrt(np.square(a) + np.square(b))


def _smooth_field(grid: np.ndarray, size: int) -> np.ndarray:
    """Upsample [B, n, n] white noise to a smooth, unit-variance [B, size, size] field."""
    n = grid.shape[-1]
    offsets = ((np.arange(size) + 0.5) / size)[:, None] - ((np.arange(n) + 0.5) / n)[None]
    weights = np.exp(-np.square(offsets * n))
    weights = (weights / np.sqrt(np.square(weights).sum(1, keepdims=True))).astype(np.float32)
    return weights @ grid @ weights.T


def _render(p: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render a chunk: (image float32 [B,S,S] in [0,1], lung mask float32 [B,S,S] in {0,1})."""
    atten, lung = _attenuation(p, size)
    return _acquire(p, atten, size), lung


def _attenuation(p: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map (bright = dense) and hard lung mask of a chunk, before acquisition."""
    grid = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1
    x, y = grid[None, None, :], grid[:, None][None]
    # Patient coordinates (u, v): undo the pose (rotation, shift, scale) of the image.
    cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
    xs, ys = x - p["tx"], y - p["ty"]
    uu = (cos * xs + sin * ys) / (p["scale"] * p["width"])
    v = (-sin * xs + cos * ys) / (p["scale"] * p["height"])
    au = np.abs(uu)
    soft = 1.5 / size  # edge ramp half-width in normalised units: 1.5 pixels

    body = _step((1 - np.square(uu / 0.98) - np.square((v - 0.25) / 1.35)) / 0.02)
    neck = _step((0.24 - au) / 0.01) * _step((-0.7 - v) / 0.015)
    shoulders = _step((v + 0.72 + 0.35 * np.square(au - 0.2)) / 0.025)
    tissue = np.maximum(body * shoulders, neck) * p["tissue"]

    # Lungs: inside the rib cage, outside the mediastinum and heart, above the domes.
    cage = 1 - np.square(uu / 0.8) - np.square((v - 0.12) / 0.92)
    mediast_half = 0.09 + 0.05 * np.clip(v + 0.8, 0, 1)
    hx, hy = p["heart_x"], p["dome_r"] - 0.5 * p["heart_ry"]
    across = 1 - np.square((uu - hx) / p["heart_rx"])
    # taller below its centre, so the heart sits on the diaphragm
    heart = across - np.square((v - hy) / (p["heart_ry"] * (1 + 1.5 * (v >= hy))))
    dome_base = p["dome_r"] + p["dome_gap"] * (uu >= 0)
    dome = dome_base + 1.1 * np.square(au - 0.38)
    lung_soft = (_step(cage / (2 * soft)) * _step((au - mediast_half) / soft)
                 * _step(-heart / (3 * soft)) * _step((dome - v) / soft))
    lung = (lung_soft > 0.5).astype(np.float32)

    heart_shadow = _step(heart / (3 * soft))
    mediast = _step((mediast_half + 0.02 - au) / soft) * _step((v + 0.95) / 0.025)
    abdomen = _step((v - dome) / soft) * body
    spine_col = _step((0.065 - au) / 0.005)
    vertebra = 0.6 + 0.4 * np.square(np.cos(2 * np.pi * (v * 7.5 + 0.3)))
    spine = spine_col * vertebra * _step((v + 0.95) / 0.015)
    trachea = _step((0.035 - au) / 0.005) * _step((-0.05 - v) / 0.02)
    # Posterior ribs: bands along arcs that leave the spine and sweep down laterally.
    phase = np.pi * ((v + 0.15 * au - 0.8 * np.square(au) + 0.9) * 6.5 * p["rib_pitch"]
                     + p["rib_phase"])
    wave = np.sin(phase)
    in_cage = _step(cage / 0.02)
    ribs = ((0.7 * _band(wave, 0.45) + 0.5 * _band(np.abs(wave) - 0.35, 0.1))
            * in_cage * _step((au - 0.07) / 0.01) * _step((0.75 - v) / 0.025))
    # Anterior ribs: fainter, sloping down towards the sternum.
    ant_ribs = (_band(np.sin(np.pi * (v - 0.35 * au + 0.9) * 5.0 * p["rib_pitch"]), 0.6)
                * in_cage * _step((au - 0.15) / 0.025) * _step((0.2 - v) / 0.05))
    clav_d = v - (p["clav_y"] - 0.18 * (au - 0.1) + 0.3 * np.square(au - 0.35))
    clavicles = _band(clav_d, 0.045) * _step((au - 0.05) / 0.01) * _step((0.75 - au) / 0.015)
    gas = p["gas"] * _band(_norm((uu - 0.4) / 0.12, (v - dome_base - 0.2) / 0.08), 1.0)

    # Normal lung markings: smooth vessel texture and hilar shadows.
    hilum_d = _norm(au - 0.2, (v - 0.05) * 1.2)
    vessels = (_smooth_field(p["vessels"], size) * 0.04 * _band(hilum_d, 0.35)
               + 0.1 * _band(hilum_d, 0.15))
    air = p["lung_air"] * (1.0 - 0.15 * _step((v - 0.25) / 0.1))
    findings = _findings(p, size, x, y, uu, v, au, hilum_d) * lung
    atten = (tissue + 0.35 * abdomen * (1 - lung_soft) + 0.35 * heart_shadow + 0.4 * mediast
             + 0.25 * spine + 0.13 * ribs + 0.05 * ant_ribs + 0.35 * clavicles
             + 0.15 * (1 - lung_soft) * spine_col - 0.3 * gas - 0.2 * trachea
             + lung_soft * (vessels - air) + findings)
    return np.maximum(atten + _artefacts(p, size), 0), lung


def _findings(p: dict[str, np.ndarray], size: int, x: np.ndarray, y: np.ndarray,
              uu: np.ndarray, v: np.ndarray, au: np.ndarray,
              hilum_d: np.ndarray) -> np.ndarray:
    """Extra attenuation of the findings; the caller confines it to the lung mask."""
    out = np.zeros(uu.shape, np.float32)
    # Reticular: thin lines where a fine smooth noise field crosses zero; bilateral, perihilar.
    rows = np.flatnonzero(p["sev_reticular"].ravel() > 0)
    if rows.size:
        network = _band(_smooth_field(p["reticular"][rows], size), 0.35)
        perihilar = 0.45 + 0.55 * _band(hilum_d[rows], 0.4)
        out[rows] += p["sev_reticular"][rows] * perihilar * (0.4 * network + 0.15)
    # Ground glass: soft patches near the lateral, lower edges of both lungs. Gaussians are
    # separable, so the patches are an outer product of 1-D profiles in image coordinates.
    rows = np.flatnonzero(p["sev_ggo"].ravel() > 0)
    if rows.size:
        q = {k: p[k][rows][:, 0] for k in ("angle", "tx", "ty", "scale", "width", "height")}
        bu = p["blobs"][rows, 0] * q["scale"] * q["width"]
        bv = p["blobs"][rows, 1] * q["scale"] * q["height"]
        cx = np.cos(q["angle"]) * bu - np.sin(q["angle"]) * bv + q["tx"]
        cy = np.sin(q["angle"]) * bu + np.cos(q["angle"]) * bv + q["ty"]
        r = p["blobs"][rows, 2]
        gx = _band(x[0] - cx[..., None], (r * q["scale"] * q["width"])[..., None])
        gy = _band(y[0, :, 0] - cy[..., None], (r * q["scale"] * q["height"])[..., None])
        patches = np.minimum((gy * p["blobs"][rows, 3, :, None]).transpose(0, 2, 1) @ gx, 1.2)
        # patchiness from the transposed vessel noise: a different field, no extra draw
        patchy = 0.75 + 0.25 * np.tanh(_smooth_field(p["vessels"][rows].transpose(0, 2, 1), size))
        out[rows] += p["sev_ggo"][rows] * 0.5 * patches * patchy
    # Consolidation: one lobe-like region of one lung, bounded by a fissure-like line.
    rows = np.flatnonzero(p["sev_consolidation"].ravel() > 0)
    if rows.size:
        q = {k: p[k][rows] for k in ("lobe_right", "lobe_upper", "lobe_cut", "lobe_tilt",
                                    "lobe_extent", "lobe_center", "bronchogram")}
        ur, vr, ar = uu[rows], v[rows], au[rows]
        side = np.where(q["lobe_right"] > 0, 1.0, -1.0)
        fissure = q["lobe_cut"] + q["lobe_tilt"] * (ar - 0.45)
        below = _step((vr - fissure) / 0.015)
        lobe = below + q["lobe_upper"] * (1 - 2 * below)
        core = _step((q["lobe_extent"] - _norm(ar - q["lobe_center"], (vr - fissure) * 0.7))
                     / 0.025)
        bronchi = q["bronchogram"] * _band(_smooth_field(p["bronchi"][rows], size), 0.12)
        out[rows] += (p["sev_consolidation"][rows] * 0.85 * _step((ur * side - 0.05) / 0.01)
                      * lobe * core * (1 - 0.5 * bronchi))
    return out


def _artefacts(p: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Side marker (bright square with a dark letter) and ECG wires, in image pixels."""
    b = p["pixel_noise"].shape[0]
    out = np.zeros((b, size, size), np.float32)
    m = {k: p[k].ravel() for k in ("marker", "marker_size", "marker_x", "marker_y",
                                   "marker_letter")}
    for i in np.flatnonzero(m["marker"] > 0):
        side = max(int(m["marker_size"][i] * size / 2), 4)
        r0, c0 = int((m["marker_y"][i] + 1) / 2 * size), int((m["marker_x"][i] + 1) / 2 * size)
        letter = np.pad(_LETTERS[int(m["marker_letter"][i])], 1)
        rows, cols = np.arange(side) * 7 // side, np.arange(side) * 5 // side
        out[i, r0:r0 + side, c0:c0 + side] += 1.2 - 0.9 * letter[rows[:, None], cols[None]]
    # Wires: one anti-aliased curve row per column, drawn with a weighted bincount.
    amp, wy, bend, freq, phase = (p["wires"][:, k, :, None] for k in range(5))
    xs = ((np.arange(size) + 0.5) / size) * 2 - 1
    ypix = ((wy + bend * xs ** 2 + 0.08 * np.sin(freq * np.pi * xs + phase)) + 1) / 2 * size
    y0 = np.floor(ypix - 0.5).astype(int)
    frac = (ypix - 0.5 - y0).astype(np.float32)
    batch = np.arange(b)[:, None, None]
    cols = np.arange(size)[None, None]
    flat, weights = [], []
    for dy, w in ((0, 1 - frac), (1, frac)):
        yy = y0 + dy
        ok = (yy >= 0) & (yy < size) & (amp > 0)
        flat.append(((batch * size + yy) * size + cols)[ok])
        weights.append((amp * w)[ok])
    out += np.bincount(np.concatenate(flat), np.concatenate(weights),
                       minlength=b * size * size).reshape(b, size, size).astype(np.float32)
    return out


def _acquire(p: dict[str, np.ndarray], atten: np.ndarray, size: int) -> np.ndarray:
    """Film response: exposure, window, gamma, blur and noise -> [0, 1]."""
    film = 1 - np.exp(-p["exposure"] * atten)
    film = np.clip((film - p["black"]) / (p["white"] - p["black"]), 0, 1) ** p["gamma"]
    for f, sigma in zip(film, p["blur"].ravel() * size / 2, strict=True):
        if sigma > 0.3:
            ndimage.gaussian_filter(f, sigma, output=f, truncate=3.0)
    return np.clip(film + p["noise"] * p["pixel_noise"], 0, 1)


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    b, h, w = a.shape
    return a.reshape(b, h // k, k, w // k, k).mean(axis=(2, 4))
