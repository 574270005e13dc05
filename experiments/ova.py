"""`python -m experiments.ova --backbone NAME [flags]`.

One-vs-all ensemble: K binary members (class k vs rest), scores normalised across members.

With no flags it trains on the embedded synthetic_cxr at the ensemble defaults of
ensembles.config.FAMILY_DEFAULTS and prints a summary line and where its report is.
"""

from __future__ import annotations

import sys

from experiments.ensemble_cli import main

DESCRIPTION = ("One-vs-all ensemble: K binary members (class k vs rest), scores normalised "
               "across members.")

if __name__ == "__main__":
    sys.exit(main("ova", DESCRIPTION))
