"""The YAML recipe: model, calibration data, ordered passes, export targets and validation gate.

Parsed into typed configs at the boundary, so a bad recipe fails before any weight loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmmc.errors import LmmcError
from lmmc.pipeline import Pass, PassConfig, check_plan, get_pass


class CalibrationConfig(BaseModel):
    """Where calibration and held-out evaluation samples come from, and how many of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(None, description="text (.txt/.jsonl), image folder or image-text .jsonl")
    random: bool = Field(False, description="random inputs; allowed only for tiny random-weight models")
    samples: int = Field(128, gt=0, description="calibration samples")
    eval_samples: int = Field(64, gt=1, description="held-out samples for validation, never calibrated on")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(128, gt=1, description="token limit for text")
    seed: int = 0


class Step(BaseModel):
    """One pass of the recipe: its registered name and its typed config."""

    model_config = ConfigDict(frozen=True)

    name: str
    config: PassConfig

    def build(self) -> Pass:
        return get_pass(self.name)(self.config)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[Step] = []
    export: list[Step] = []
    validate_: Step | None = Field(None, alias="validate")

    def steps(self) -> list[Pass]:
        """Every pass in the order it runs: compression, export, then validation."""
        ordered = [*self.passes, *self.export] + ([self.validate_] if self.validate_ else [])
        return [step.build() for step in ordered]

    def check(self) -> None:
        """Check pass order against what each pass needs and provides."""
        initial = {"teacher", "student"} | ({"calib"} if self.calibration.path or self.calibration.random else set())
        check_plan(self.steps(), initial)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model
        out["calibration"] = self.calibration.model_dump(mode="json")
        out["passes"] = [{s.name: s.config.model_dump(mode="json")} for s in self.passes]
        out["export"] = [{s.name: s.config.model_dump(mode="json")} for s in self.export]
        if self.validate_ is not None:
            out["validate"] = self.validate_.config.model_dump(mode="json")
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _step(item: Any, where: str, kinds: tuple[str, ...]) -> Step:
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = params or {}
    else:
        raise LmmcError(f"{where}: each entry is a pass name or a one-key mapping like '- wanda: {{sparsity: 0.5}}'")
    cls = get_pass(name)
    if cls.kind not in kinds:
        raise LmmcError(f"{where}: '{name}' is a {cls.kind} pass; put it under the matching section of the recipe")
    if not isinstance(params, dict):
        raise LmmcError(f"{where}: the parameters of '{name}' must be a mapping, got {params!r}")
    try:
        return Step(name=name, config=cls.Config(**params))
    except ValidationError as err:
        raise LmmcError(f"{where}: bad parameters for pass '{name}':\n{_explain(err)}") from None


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check the spelling against the pass's documented keys)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Turn the recipe's plain data into typed configs, or raise one LmmcError naming the fix."""
    if not isinstance(data, dict):
        raise LmmcError(f"{source}: a recipe is a YAML mapping with keys model, calibration, passes, export, validate")
    known = {"model", "calibration", "passes", "export", "validate"}
    unknown = set(data) - known
    if unknown:
        raise LmmcError(f"{source}: unknown key(s) {sorted(unknown)}; a recipe has only {sorted(known)}")
    try:
        calibration = CalibrationConfig(**(data.get("calibration") or {}))
    except ValidationError as err:
        raise LmmcError(f"{source}: bad calibration section:\n{_explain(err)}") from None
    for section in ("passes", "export"):
        if not isinstance(data.get(section) or [], list):
            raise LmmcError(f"{source}: '{section}' must be a list of passes")
    passes = [_step(p, f"{source}: passes[{i}]", ("compress",)) for i, p in enumerate(data.get("passes") or [])]
    export = [_step(p, f"{source}: export[{i}]", ("export",)) for i, p in enumerate(data.get("export") or [])]
    validate = None
    if data.get("validate") is not None:
        validate = _step({"validate": data["validate"]}, f"{source}: validate", ("validate",))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise LmmcError(f"{source}: 'model' must be a path or a hub id, got {model!r}")
    recipe = Recipe(model=model, calibration=calibration, passes=passes, export=export, validate=validate)
    recipe.check()
    return recipe


def load_recipe(path: str | Path, calib: str | None = None) -> Recipe:
    """Read a recipe file; `calib` (the CLI's --calib) replaces its calibration path."""
    path = Path(path)
    if not path.is_file():
        raise LmmcError(f"recipe '{path}' does not exist; pass --recipe with a YAML file (see samples/recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LmmcError(f"recipe '{path}' is not valid YAML: {err}") from None
    if calib is not None and isinstance(data, dict):
        data["calibration"] = {**(data.get("calibration") or {}), "path": str(calib), "random": False}
    return parse_recipe(data, source=str(path))
