"""How the per-class operating thresholds do on a split: sensitivity and specificity of the
flags with bootstrap CIs over patients, and the report section."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ensembles.combine.operating_points import flag
from ensembles.evaluate.metrics import bootstrap_weights, ci95, resampling_units
from ensembles.evaluate.tables import fmt_ci, markdown_table


def rates(y: np.ndarray, proba: np.ndarray, thresholds: Sequence[float | None],
          class_names: Sequence[str], *, patient_ids: np.ndarray | None = None, seed: int = 0,
          n_bootstrap: int = 1000) -> dict[str, dict]:
    """Per class: threshold, sensitivity and specificity of the flags on (y, proba), with
    95% percentile-bootstrap CIs over patients (as the metrics' CIs), and the counts."""
    y = np.asarray(y)
    flags = flag(proba, thresholds)
    units, _ = resampling_units(None if patient_ids is None else np.asarray(patient_ids), len(y))
    w = (np.concatenate(list(bootstrap_weights(units, n_bootstrap, seed))) if n_bootstrap
         else None)                                            # [B, N] resample weights
    out = {}
    for k, name in enumerate(class_names):
        pos, hit = y == k, flags[:, k]
        entry = {"threshold": thresholds[k], "positives": int(pos.sum()),
                 "negatives": int((~pos).sum())}
        for key, rows, want in (("sensitivity", pos, True), ("specificity", ~pos, False)):
            ok = (hit == want) & rows
            have = thresholds[k] is not None and rows.any()
            entry[key] = float(ok.sum() / rows.sum()) if have else None
            if have and w is not None:
                with np.errstate(invalid="ignore", divide="ignore"):
                    entry[f"{key}_ci95"] = ci95((w @ ok) / (w @ rows))
            else:
                entry[f"{key}_ci95"] = None
        out[name] = entry
    return out


def markdown(entry: dict) -> str:
    """The report section: each class's threshold and the sensitivity / specificity its
    flags reach on every split of `entry` ({"target", "chosen_on", split: rates})."""
    splits = [s for s in ("val", "test", "evaluated") if s in entry]
    header = ["class", "threshold"] + [f"{s} {m}" for s in splits
                                       for m in ("sensitivity", "specificity")]
    rows = []
    for name, first in entry[splits[0]].items():
        t = first["threshold"]
        row = [name, "none" if t is None else f"{t:.4f}"]
        for s in splits:
            r = entry[s][name]
            row += [fmt_ci(r[m], r[f"{m}_ci95"]) for m in ("sensitivity", "specificity")]
        rows.append(row)
    lines = [f"Target `{entry['target']}`, thresholds chosen on the {entry['chosen_on']} split: "
             f"an image is flagged for a class when that class's probability reaches its "
             f"threshold (95% CIs resample patients; `none`: the split lacked positives or "
             f"negatives of that class). The class decision itself is the combiner's rule.", ""]
    return "\n".join(lines + markdown_table(header, rows))
