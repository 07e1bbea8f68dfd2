"""Deprecated name of `modeling_calm.modeling_calm_brier` (one release; never shipped, nothing imports it)."""
from ._deprecated import warn_moved
from .modeling_calm_brier import *  # noqa: F401,F403
from .modeling_calm_brier import __all__  # noqa: F401

warn_moved(__name__, "modeling_calm_brier")
