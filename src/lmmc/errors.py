"""Errors a user can fix, and the exit codes of the command line."""

from __future__ import annotations

import json
from pathlib import Path

EXIT_OK = 0
EXIT_GATE = 1  # a validation gate was missed; the complete output was written
EXIT_BAD_INPUT = 2  # LmmcError: one message naming what is wrong and the fix; nothing written
EXIT_INTERNAL = 3  # a bug: the traceback goes to a log file named in the message
EXIT_INTERRUPTED = 130  # SIGINT or SIGTERM; nothing written


class LmmcError(Exception):
    """Bad input or configuration. The message names what is wrong and how to fix it."""


class GateFailed(Exception):
    """A validation gate in the recipe was missed; the outputs exist but must not be trusted. `report` is
    the compile's report, whose figures show by how much."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class OutputWritten(KeyboardInterrupt):
    """SIGINT or SIGTERM that came once the output was complete in its place; the message says where."""


# Optional packages that transformers imports only when a model's tokenizer or processor needs them.
_PACKAGES = ("sentencepiece", "protobuf", "tiktoken", "torchvision", "transformers")


def missing_package(err: ImportError, what: str) -> LmmcError:
    """The ImportError transformers raises while reading `what` (a tokenizer, a processor), as one error
    naming the package to install: a model's files can need a package that lmmc itself does not."""
    text = " ".join(str(err).split())
    first = text.split(". ")[0].rstrip(".") or type(err).__name__
    named = [p for p in _PACKAGES if p in str(err).lower()]
    fix = f"pip install {named[0]}" if named else "install the package it names"
    return LmmcError(f"reading {what} needs a package that is not installed ({first}); {fix} into this "
                     f"environment and run again")


def refuse_own_code(path: Path, opt_in: str = "--trust-remote-code", name: str | None = None) -> None:
    """A tokenizer or processor whose class ships with the model (auto_map in its config) is that code:
    transformers refuses it with a message that blames missing packages. `name`: the model as the user gave
    it, where `path` is a hub snapshot."""
    shown = name or path
    for file in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        try:
            declared = json.loads((path / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(declared, dict) and declared.get("auto_map"):
            raise LmmcError(f"'{shown}' ships the code of its own {file.split('_')[0]} (auto_map in {file}), which "
                            f"runs only with {opt_in}; pass it only if you trust that code")
