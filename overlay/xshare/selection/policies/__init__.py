"""One module per selection policy (discovered by xshare.selection.registry)."""
