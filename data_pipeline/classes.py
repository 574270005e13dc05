"""Canonical class names and the spellings each source uses for them.

Every dataset maps its folder names onto these canonical names so that a model trained
on one source can be evaluated on another (cross-dataset evaluation matches by name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from data_pipeline.image_source import DataError

COVID = "covid"
NORMAL = "normal"
VIRAL_PNEUMONIA = "viral_pneumonia"
BACTERIAL_PNEUMONIA = "bacterial_pneumonia"
LUNG_OPACITY = "lung_opacity"
PNEUMONIA = "pneumonia"  # Kermany's 2-class label: viral and bacterial together

CANONICAL: tuple[str, ...] = (
    COVID, NORMAL, VIRAL_PNEUMONIA, BACTERIAL_PNEUMONIA, LUNG_OPACITY, PNEUMONIA)

# The four classes of the mission, in the order every default run uses.
DEFAULT_CLASSES: tuple[str, ...] = (COVID, NORMAL, VIRAL_PNEUMONIA, BACTERIAL_PNEUMONIA)

_ALIASES: dict[str, str] = {
    "covid": COVID, "covid19": COVID, "covid_19": COVID, "sars_cov_2": COVID,
    "normal": NORMAL, "healthy": NORMAL, "no_finding": NORMAL,
    "viral_pneumonia": VIRAL_PNEUMONIA, "viral": VIRAL_PNEUMONIA, "virus": VIRAL_PNEUMONIA,
    "bacterial_pneumonia": BACTERIAL_PNEUMONIA, "bacterial": BACTERIAL_PNEUMONIA,
    "bacteria": BACTERIAL_PNEUMONIA,
    "lung_opacity": LUNG_OPACITY, "opacity": LUNG_OPACITY,
    "pneumonia": PNEUMONIA,
}


def _key(raw: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", raw.strip().lower()).strip("_")


def canonical_name(raw: str) -> str:
    """Map a source spelling (`COVID-19`, `Viral Pneumonia`, `NORMAL`, ...) to its canonical name.

    Raises DataError naming the unknown spelling and the accepted canonical names.
    """
    try:
        return _ALIASES[_key(raw)]
    except KeyError:
        raise DataError(
            f"unknown class name {raw!r}; known classes: {', '.join(CANONICAL)}") from None


def select_classes(available: Iterable[str], wanted: Sequence[str] | None) -> tuple[str, ...]:
    """Return the canonical classes to keep, in `wanted` order (or `available` order if None).

    Raises DataError if a wanted class is not present in the data.
    """
    available = tuple(canonical_name(c) for c in available)
    if wanted is None:
        return available
    chosen = tuple(canonical_name(c) for c in wanted)
    missing = [c for c in chosen if c not in available]
    if missing:
        raise DataError(
            f"class(es) {', '.join(missing)} not in this dataset; it has: {', '.join(available)}")
    if len(set(chosen)) != len(chosen):
        raise DataError(f"duplicate classes in selection: {', '.join(chosen)}")
    return chosen
