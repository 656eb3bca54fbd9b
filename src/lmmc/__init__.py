"""lmmc: compile a large (multimodal) transformer into a small, fast, validated student."""

__version__ = "0.1.0"
