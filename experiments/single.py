"""`python -m experiments.single --backbone NAME [flags]`: one multi-class model, evaluated on
the test split.

A single model is a one-member ensemble (strategy "single"): it trains through the same engine
and writes the same bundle as `experiments.ova`, so `experiments.single` and
`ensembles.Ensemble("single")` with the same settings give the same metrics.
"""

from __future__ import annotations

import sys

from experiments.ensemble_cli import main

DESCRIPTION = "One multi-class model (a one-member ensemble), evaluated on the test split."

if __name__ == "__main__":
    sys.exit(main("single", DESCRIPTION))
