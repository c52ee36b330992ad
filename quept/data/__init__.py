"""Texts the product reads at run time, shipped inside the package (see wikitext-2/README.md for the license).

`valid.txt` is the calibration text, `test.txt` the evaluation text; `$QUEPT_CALIB_FILE` and
`$QUEPT_EVAL_FILE` point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

WIKITEXT2 = Path(__file__).resolve().parent / "wikitext-2"


def calib_file() -> Path:
    """WikiText-2 valid.txt (or $QUEPT_CALIB_FILE): calibration never reads the test split."""
    return Path(os.environ.get("QUEPT_CALIB_FILE", WIKITEXT2 / "valid.txt"))


def eval_file() -> Path:
    """WikiText-2 test.txt (or $QUEPT_EVAL_FILE)."""
    return Path(os.environ.get("QUEPT_EVAL_FILE", WIKITEXT2 / "test.txt"))
