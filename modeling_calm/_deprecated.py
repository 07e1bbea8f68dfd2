"""Support for the old module names kept one release (not shipped: nothing that ships imports it)."""

import warnings


def warn_moved(old: str, new: str) -> None:
    """FutureWarning for an import of the deprecated module `old`, whose content now lives in `new`."""
    warnings.warn(
        f"`{old}` is deprecated and will be removed in the next release: import from `modeling_calm.{new}`.",
        FutureWarning,
        stacklevel=3,
    )
