"""Export passes, one target per module, and validation of the exported artifacts."""
