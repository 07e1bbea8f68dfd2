"""Deprecated name of `modeling_calm.modeling_calm_generation` (one release; never shipped, nothing imports it)."""
from ._deprecated import warn_moved
from .modeling_calm_generation import *  # noqa: F401,F403
from .modeling_calm_generation import __all__  # noqa: F401
from .modeling_calm import layout_prompts  # noqa: E402,F401  (moved to modeling_calm)

warn_moved(__name__, "modeling_calm_generation")
