"""`python -m experiments.cascade --backbone NAME [flags]`.

Cascade: healthy-vs-sick member, then a sick-type member; the stage rule and a threshold tuned
on validation.

With no flags it trains on the embedded synthetic_cxr at the ensemble defaults of
ensembles.config.FAMILY_DEFAULTS and prints a summary line and where its report is.
"""

from __future__ import annotations

import sys

from experiments.ensemble_cli import main

DESCRIPTION = ("Cascade: healthy-vs-sick member, then a sick-type member; the stage rule and a "
               "threshold tuned on validation.")

if __name__ == "__main__":
    sys.exit(main("cascade", DESCRIPTION))
