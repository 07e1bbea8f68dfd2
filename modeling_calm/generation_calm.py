"""Deprecated module name, kept for one release: use `modeling_calm.modeling_calm_generation`.

Nothing in the package imports this shim, so it never lands in a saved model folder (the Hub copies only the files
that `modeling_calm.py` reaches through relative imports).
"""

import warnings

from .modeling_calm_generation import *  # noqa: F401,F403
from .modeling_calm_generation import __all__  # noqa: F401
from .modeling_calm import layout_prompts  # noqa: F401  (moved to modeling_calm)

warnings.warn(
    "`modeling_calm.generation_calm` is deprecated and will be removed in the next release: import from "
    "`modeling_calm.modeling_calm_generation` instead.",
    FutureWarning,
    stacklevel=2,
)
