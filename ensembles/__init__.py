"""Ensembles of chest X-ray classifiers.

- tasks: strategy (single / ova / ovo / cascade) -> member relabelling tables
- members: members trained as one vmapped stack (or sequentially)
- strategy: checks + planning, member outputs, rule combiners as JSON
- combiners, meta, calibration: member outputs -> K-class probabilities
- bundle: a run directory saved and loaded for evaluate / predict
"""
