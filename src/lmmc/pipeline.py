"""Pass base class, the pass registry and the runner that records each pass."""

from __future__ import annotations

import importlib
import pkgutil
import time
from typing import Any, ClassVar, Literal

from lmmc.artifact import Artifact, PassRecord
from lmmc.config import Config
from lmmc.errors import LmmcError


class PassConfig(Config):
    """Base of every pass config."""


class Pass:
    """One step of a compile. Subclasses set `name`, `Config`, `needs`, `provides` and `run`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["compress", "export", "validate"]] = "compress"
    Config: ClassVar[type[PassConfig]] = PassConfig
    needs: ClassVar[frozenset[str]] = frozenset({"student"})
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def run(self, art: Artifact) -> dict[str, Any]:
        """Change `art` in place; return metrics for the pass record."""
        raise NotImplementedError

    def check(self, available: set[str]) -> None:
        """Fail before any weight loads when the passes before this one do not provide its needs."""
        missing = self.needs - available
        if missing:
            raise LmmcError(
                f"pass '{self.name}' needs {sorted(missing)}, which no earlier step provides; "
                f"add a pass that provides it before '{self.name}' (or calibration data for 'calib')."
            )


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under its `name`."""
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise RuntimeError(f"two passes are registered as '{cls.name}'")
    PASSES[cls.name] = cls
    return cls


_loaded = False


def load_passes() -> dict[str, type[Pass]]:
    """Import every module of lmmc.passes and lmmc.export, so each registers its passes.

    Discovery keeps adding a pass to adding one file."""
    global _loaded
    if not _loaded:
        for package_name in ("lmmc.passes", "lmmc.export"):
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{info.name}")
        _loaded = True
    return PASSES


def get_pass(name: str) -> type[Pass]:
    passes = load_passes()
    if name not in passes:
        raise LmmcError(f"unknown pass '{name}'; known passes: {', '.join(sorted(passes))}")
    return passes[name]


def check_plan(steps: list[Pass], initial: set[str]) -> None:
    """Walk the plan with the state keys each pass provides, so a bad order fails before loading."""
    available = set(initial)
    for step in steps:
        step.check(available)
        available |= step.provides


def run_pass(step: Pass, art: Artifact) -> PassRecord:
    """Run one pass and append its record (name, config, seconds, metrics) to the artifact. A pass resumed
    from its own checkpoint adds the seconds it had run before (`seconds_before_resume`)."""
    step.check(art.available())
    start = time.perf_counter()
    metrics = step.run(art) or {}
    seconds = time.perf_counter() - start + metrics.get("seconds_before_resume", 0.0)
    record = PassRecord(step.name, step.config.model_dump(mode="json"), seconds, metrics)
    art.records.append(record)
    return record
