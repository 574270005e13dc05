"""Experiment CLIs (`python -m experiments.<name>`): thin shells over the `ensembles` API.

Each turns flags into a typed config (`experiments.common`), calls the API and prints a
summary. Nothing imports this package.
"""
