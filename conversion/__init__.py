"""Tools that convert the CALM authors' released checkpoints into this package's format (not shipped)."""
