"""`python -m experiments.ovo --backbone NAME [flags]`.

One-vs-one ensemble: K(K-1)/2 pairwise members combined by scikit-learn's vote rule or pairwise
coupling.

With no flags it trains on the embedded synthetic_cxr at the ensemble defaults of
ensembles.config.FAMILY_DEFAULTS and prints a summary line and where its report is.
"""

from __future__ import annotations

import sys

from experiments.ensemble_cli import main

DESCRIPTION = ("One-vs-one ensemble: K(K-1)/2 pairwise members combined by scikit-learn's vote "
               "rule or pairwise coupling.")

if __name__ == "__main__":
    sys.exit(main("ovo", DESCRIPTION))
