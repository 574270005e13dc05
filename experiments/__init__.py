"""Experiment CLIs (`python -m experiments.<name>`) and the evaluation they share.

Every CLI builds its run from `experiments.common` (flags, data, model, train state, run
directory) and reports through `experiments.evaluation`. Nothing imports this package.
"""
