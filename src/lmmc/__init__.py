"""lmmc: compile a large (multimodal) transformer into a small, fast, validated student."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import lmmc` (the CLI's --help, --version) does not pay for importing torch.
    if name == "load_student":
        from lmmc.student import load_student

        return load_student
    raise AttributeError(f"module 'lmmc' has no attribute '{name}'")
