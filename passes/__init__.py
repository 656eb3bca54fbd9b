"""Compression passes, one algorithm per module; each registers itself with lmmc.pipeline."""
