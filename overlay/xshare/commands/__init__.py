"""Sub-commands of the ``xshare`` CLI: one module per command (see :mod:`xshare.cli`)."""
