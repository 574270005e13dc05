"""Ensembles of chest X-ray classifiers, and the public Python API.

    from ensembles import Ensemble, Stack, make_config
- api: `Ensemble` (fit / evaluate / predict_proba / save / load) and `Stack`
- config: the typed run config (data, model, training, ensemble) and per-family defaults
- build, fitting, runs: config -> data, models and steps -> the one engine -> run folders
- tasks: strategy (single / ova / ovo / cascade) -> member relabelling tables
- members: members trained as one vmapped stack (or sequentially) through the engine
- strategy: checks + planning, member outputs, rule combiners as JSON
- combiners, meta, calibration: member outputs -> K-class probabilities
- evaluation, stats, assess: metrics with patient-resampled CIs, paired tests, reports
- bundle, stacking: a run directory saved and loaded; stacks of runs
"""

from ensembles.api import Ensemble, Stack
from ensembles.config import RunConfig, make_config

__all__ = ["Ensemble", "RunConfig", "Stack", "make_config"]
