"""Ensembles of chest X-ray classifiers, and the public Python API.

    from ensembles import Ensemble, Stack, RunConfig, make_config

The rooms, top to bottom (each imports only rooms below it; docs/architecture.md):
- research/: recipes (reproduce) and the comparison of strategies
- api: `Ensemble` (fit / evaluate / predict_proba / save / load) and `Stack` (a
  meta-classifier over finished runs)
- training/: a run from its config: data, models, member groups through the engine, the run
  folder, out-of-fold outputs, stacking runs, the lung segmenter
- report/: report.md, report.html, plots, the gallery, Grad-CAM overlays and maps
- evaluate/: metrics with patient-resampled CIs, paired tests, operating-point rates,
  assessing a bundle on a dataset
- bundle/: a run folder saved, verified (schema, SHA-256 manifest) and loaded
- combine/: tasks, member groups, combiners, meta-classifier, calibration, thresholds,
  decision explanations: numpy on member outputs
- config: the typed run config and its defaults (a leaf)
"""

from ensembles.api import Ensemble, Stack
from ensembles.config import RunConfig, make_config

__all__ = ["Ensemble", "RunConfig", "Stack", "make_config"]
