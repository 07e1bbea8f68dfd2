"""Deprecated module name, kept for one release: use `modeling_calm.modeling_calm_brier`.

Nothing in the package imports this shim, so it never lands in a saved model folder (the Hub copies only the files
that `modeling_calm.py` reaches through relative imports).
"""

import warnings

from .modeling_calm_brier import *  # noqa: F401,F403
from .modeling_calm_brier import __all__  # noqa: F401

warnings.warn(
    "`modeling_calm.brier_scoring_calm` is deprecated and will be removed in the next release: import from "
    "`modeling_calm.modeling_calm_brier` instead.",
    FutureWarning,
    stacklevel=2,
)
