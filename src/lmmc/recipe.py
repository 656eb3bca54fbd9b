"""The YAML recipe: model, calibration data, ordered passes, export targets and validation gate.

Parsed into typed configs at the boundary, so a bad recipe fails before any weight loads. Relative paths
inside a recipe file are resolved against the recipe's own directory, so a recipe works from any current
directory; `--calib` on the command line is resolved against the current directory."""

from __future__ import annotations

import difflib
import os
import re
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from lmmc.adapters import get_adapter, supported_model_types
from lmmc.bench import BenchConfig
from lmmc.config import Config, explain
from lmmc.errors import LmmcError
from lmmc.pipeline import Pass, PassConfig, check_plan, get_pass, load_passes


class CalibrationConfig(Config):
    """Where calibration and held-out evaluation samples come from, and how many of each."""

    path: str | None = Field(None, description="text (.txt/.jsonl), image folder or image-text .jsonl")
    random: bool = Field(False, description="random inputs; allowed only for tiny random-weight models")
    samples: int = Field(128, gt=0, description="calibration samples")
    eval_samples: int = Field(64, gt=1, description="held-out samples for validation, one per distinct image "
                              "(per distinct text, for text alone), never calibrated on under any caption")
    batch_size: int = Field(8, gt=0, description="samples per batch of the passes' forward runs and of validation")
    max_length: int | None = Field(None, gt=1, description="token limit for text; default: 128, or, if lower, the "
                                   "length the model's users get a text cut to (sentence-transformers' processing_kwargs "
                                   "max_length, else its max_seq_length, else the tokenizer's model_max_length) within "
                                   "its position table (CLIP: 77)")
    # torch seeds its generators with a 64-bit integer
    seed: int = Field(0, ge=0, lt=2**63, description="seeds the held-out split and random calibration")
    caption_template: str | None = Field(None, description="reads an image folder as one subfolder per class, "
                                         "each image captioned with this template, e.g. \"a photo of the "
                                         "digit {label}\"; also the class prompt of zero-shot accuracy on "
                                         "labelled data")
    chat_template: bool = Field(False, description="generative models: wrap each record's image and prompt in "
                                "the processor's chat template before the answer (the model needs one)")

    @model_validator(mode="after")
    def _random_or_a_path(self) -> CalibrationConfig:
        if self.random and self.path is not None:
            raise ValueError(f"random: true and path '{self.path}' are both given; random inputs replace data, so "
                             f"keep one of them")
        if self.random and self.caption_template is not None:
            raise ValueError("caption_template captions an image folder's classes and prompts labelled data, and "
                             "random inputs have neither, so it would do nothing; remove caption_template, or give "
                             "the labelled data as path")
        return self

    @field_validator("caption_template")
    @classmethod
    def _one_label_placeholder(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(v)
                     if name is not None]
        except ValueError as err:
            raise ValueError(f"{v!r} is not a format string ({err}); write the class as {{label}}") from None
        # a class name is text: a format spec ({label:d}) or conversion ({label!x}) would fail on it later
        if {name for name, _, _ in parts} != {"label"} or any(spec or conversion for _, spec, conversion in parts):
            raise ValueError(f"{v!r} must name the class as {{label}} and nothing else in braces, "
                             f"e.g. \"a photo of the digit {{label}}\"")
        return v


class Step(BaseModel):
    """One pass of the recipe: its registered name and its typed config."""

    model_config = ConfigDict(frozen=True)

    name: str
    config: PassConfig

    def build(self) -> Pass:
        return get_pass(self.name)(self.config)


# Pass parameters that name files or directories: resolved against the recipe's directory like calibration.path.
PATH_PARAMS = ("corpus", "checkpoint_dir", "latency_cache")


# Settings whose mapping form is always one value per tower.
_PER_TOWER = {"keep", "layer_map"}
# Per-tower settings that may leave towers out: distill reads layer_map for the towers it distils only,
# and skip_hidden's towers missing skip nothing.
_SOME_TOWERS = {"layer_map", "skip_hidden"}


class Recipe(BaseModel):
    """A parsed recipe. `validate_` is None only when the recipe switched validation off (`validate: false`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    passes: list[Step] = []
    export: list[Step] = []
    validate_: Step | None = Field(None, alias="validate")
    # `lmmc bench` run on the finished output, its table printed after the compile's; None = not run.
    bench: BenchConfig | None = None
    # Whether `export` is the default that parse_recipe gave a validated recipe listing no export ("onnx", an
    # encoder's), which check_gates replaces by the export this kind of model validates on.
    _default_export: bool = PrivateAttr(False)

    def steps(self) -> list[Pass]:
        """Every pass in the order it runs: compression, export, then validation."""
        ordered = [*self.passes, *self.export] + ([self.validate_] if self.validate_ else [])
        return [step.build() for step in ordered]

    @property
    def validated(self) -> bool:
        return self.validate_ is not None

    def check(self) -> None:
        """Check pass order against what each pass needs and provides."""
        has_calib = bool(self.calibration.path or self.calibration.random)
        if self.validated and not has_calib and not any("calib" in s.needs for s in self.steps()[:-1]):
            raise LmmcError("validation against the teacher (on unless the recipe says 'validate: false') needs "
                            "held-out data: give --calib PATH or 'calibration.path', or switch validation off "
                            "with 'validate: false'")
        check_plan(self.steps(), {"teacher", "student"} | ({"calib"} if has_calib else set()))
        self._check_pass_order()
        self._check_exports()
        if self.validated:
            from lmmc.latency_budget import check_target_exports

            check_target_exports([(s.name, s.config) for s in self.passes], [(s.name, s.config) for s in self.export])

    def check_towers(self, family: str, towers: list[str]) -> None:
        """Every per-tower mapping in the passes' settings (keys that are tower names, e.g. antgmm's keep)
        names each of the model's towers and no other; distill's layer_map and skip_hidden name no other."""
        names = {t.name for model_type in supported_model_types() for t in get_adapter(model_type).towers}

        def walk(value: Any, where: str) -> None:
            if isinstance(value, dict):
                # a mapping that names any tower is per tower ({text: 0.5, image: 0.5} included), and so is
                # every mapping of these settings, whatever it names ({txt: 0.5} misspelt)
                key = where.rsplit(".", 1)[-1]
                per_tower = set(value) & names or key in _PER_TOWER
                unknown = sorted(set(value) - set(towers))
                if per_tower and key in _SOME_TOWERS and unknown:
                    raise LmmcError(f"{where} names the tower(s) {unknown}, which this {family} model does not have; "
                                    f"its towers are {towers}")
                if per_tower and key not in _SOME_TOWERS and set(value) != set(towers):
                    raise LmmcError(f"{where} names the tower(s) {sorted(value)}, but this {family} model has the "
                                    f"towers {towers}; give a value for each of them, e.g. "
                                    f"{{{', '.join(f'{t}: ...' for t in towers)}}}")
                for key, item in value.items():
                    walk(item, f"{where}.{key}")
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, f"{where}[{i}]")

        for section, steps in (("passes", self.passes), ("export", self.export)):
            for i, step in enumerate(steps):
                walk(step.config.model_dump(mode="json"), f"{section}[{i}] '{step.name}'")

    def check_gates(self, family: str, kind: str) -> None:
        """Refuse a validate gate that this kind of model has no figure for (e.g. min_cosine on a generative
        model, max_kl on an encoder): validation would silently skip it and certify without it. A default
        export (the recipe listed none) becomes the one this kind of model validates on."""
        if self._default_export and kind == "generative":
            # parse_recipe chose "onnx" before the model, and so its kind, was known; the recipe is frozen, so
            # its export list is refilled in place, before the plan builds or lists any step.
            self.export[:] = [_step("onnx_generative", "export[0]", ("export",))]
        if self.validate_ is None:
            return
        cfg = self.validate_.config
        generative = kind == "generative"
        wrong = cfg.ENCODER_GATES if generative else cfg.GENERATIVE_GATES
        applies = [*(cfg.GENERATIVE_GATES if generative else cfg.ENCODER_GATES), *cfg.SHARED_GATES]
        given = [g for g in wrong if cfg.given(g) and getattr(cfg, g) is not None]
        if given:
            what = "a generative model, validated by next-token fidelity and greedy generation" if generative else \
                   "an encoder, validated by the cosine of its embeddings to the teacher's"
            raise LmmcError(f"validate: {', '.join(given)} {'is a gate' if len(given) == 1 else 'are gates'} for "
                            f"{'encoders' if generative else 'generative models'}, and this {family} model is "
                            f"{what}; the gates that apply to it are {', '.join(applies)}. Remove "
                            f"{', '.join(given)} from the recipe's validate section")
        if not generative and cfg.given("min_cosine_int8") and cfg.min_cosine_int8 is not None \
                and not any(_writes_int8(s) for s in self.export):
            raise LmmcError("validate.min_cosine_int8 gates INT8 artifacts, and no export in this recipe writes one"
                            f"{_no_engine(self.export, 'int8')}, so it would certify nothing; add "
                            "{ort: {int8: [dynamic]}} or {openvino: {int8: true}} to the export section, or remove "
                            "min_cosine_int8")
        if not generative and cfg.given("min_cosine_fp16") and cfg.min_cosine_fp16 is not None \
                and not any(_writes_fp16(s) for s in self.export):
            no_engine = _no_engine(self.export, "fp16")
            add = "{ort: {fp16: true}}" + ("" if no_engine else " or {tensorrt: {precision: [fp16]}}")
            raise LmmcError(f"validate.min_cosine_fp16 gates FP16 artifacts, and no export in this recipe writes one"
                            f"{no_engine}, so it would certify nothing; add {add} to the export section, or remove "
                            f"min_cosine_fp16")
        if not generative and cfg.given("max_latency_miss") and cfg.max_latency_miss is not None \
                and not any(getattr(s.config, "target", None) is not None for s in self.passes):
            raise LmmcError("validate.max_latency_miss gates how far the student misses a latency target, and no "
                            "pass in this recipe sets one, so it would certify nothing; give antgmm a target, e.g. "
                            "{antgmm: {target: {speedup: 2}}} (measured on the OpenVINO INT8 IR unless its deploy "
                            "says otherwise: export {openvino: {int8: true}} too), or remove max_latency_miss")
        timing = [k for k in ("latency_batch", "latency_seq", "repeats") if cfg.given(k)]
        if generative and timing:
            raise LmmcError(f"validate: {', '.join(timing)} set how the student is timed, and a {family} model is "
                            f"not timed: validation measures its next-token fidelity and greedy generation. Remove "
                            f"{', '.join(timing)} from the recipe's validate section")
        if generative and cfg.given("agreement_k"):
            raise LmmcError(f"validate: agreement_k sets the top-k agreement of a dual encoder's retrieval, and a "
                            f"{family} model's task metric is its greedy generation; remove agreement_k from the "
                            f"recipe's validate section")
        if generative and cfg.device != "cpu":
            raise LmmcError(f"validate: device {cfg.device} runs an encoder's ONNX artifacts on the GPU, and a "
                            f"{family} model's generative export is validated on the CPU; remove device from the "
                            f"recipe's validate section (the passes run where --device says)")
        if not generative and cfg.given("generation_tokens"):
            raise LmmcError(f"validate: generation_tokens sets how many greedy tokens a generative model's validation "
                            f"compares, and this {family} model is an encoder, validated by the cosine of its "
                            f"embeddings; remove generation_tokens from the recipe's validate section")
        if generative and not any(s.name == "onnx_generative" for s in self.export):
            raise LmmcError(f"validating this {family} model needs its generative export: add 'onnx_generative' to "
                            f"the recipe's export section (the other exports are for encoders, and a compile of a "
                            f"generative model skips them), or switch validation off with 'validate: false'")

    def _check_exports(self) -> None:
        """Each export writes its own files; a second one of the same kind would overwrite the first's."""
        seen: dict[str, int] = {}
        for i, step in enumerate(self.export):
            if step.name in seen:
                raise LmmcError(f"export[{i}] '{step.name}' repeats export[{seen[step.name]}]: both would write the "
                                f"same files, and the second would replace the first's; keep one")
            seen[step.name] = i

    def _check_pass_order(self) -> None:
        """An allocation sets per-matrix targets that every later local pruner applies in place of its own
        sparsity; structured pruning cannot follow the masks of a local pruner."""
        steps = [s.build() for s in self.passes]
        allocation, pending, masked, narrowed = None, False, None, None
        for i, step in enumerate(steps):
            if "allocation" in step.provides:
                if not any("masks" in later.provides for later in steps[i + 1:]):
                    raise LmmcError(f"passes[{i}] '{step.name}' is an allocation: it only sets per-matrix sparsities, "
                                    f"which a local pruner after it (magnitude, wanda, sparsegpt) applies; no pruner "
                                    f"follows it, so it would do nothing. Move it before the pruner")
                if pending:
                    raise LmmcError(f"passes[{i}] '{step.name}' would replace the sparsities of the allocation "
                                    f"'{allocation}' before any pruner applied them; keep one of the two")
                allocation, pending = step.name, True
            if "masks" in step.provides:
                # (against the default, not the keys given: a dumped recipe, as report.json keeps it, gives every key)
                if allocation and step.config.sparsity != type(step.config).model_fields["sparsity"].default:
                    raise LmmcError(f"passes[{i}] '{step.name}' gives sparsity {step.config.sparsity}, but the "
                                    f"allocation '{allocation}' before it sets every matrix's sparsity, which it "
                                    f"would follow instead; drop the one you do not mean")
                pending, masked = False, masked or step.name
            if step.name == "antgmm" and masked:
                raise LmmcError(f"passes[{i}] 'antgmm' removes whole units and would leave the masks of "
                                f"'{masked}' before it pointing at the wrong weights; put antgmm before {masked}")
            if step.name == "antgmm":
                if narrowed is not None:
                    raise LmmcError(f"passes[{i}] 'antgmm' follows passes[{narrowed}], whose hidden stage narrowed "
                                    f"the residual stream behind a map back to the teacher's width in the last block; "
                                    f"no stage can cut that student again. Give all stages' shares to one antgmm")
                if isinstance(step.config.shares, dict) and step.config.shares.get("hidden"):  # or "auto"
                    narrowed = i
            if step.name == "activation" and masked and step.config.refit is not None:
                raise LmmcError(f"passes[{i}] 'activation' refits each FFN's second matrix whole, which would fill "
                                f"the zeros '{masked}' left in it; put activation before {masked}, or drop refit")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.model is not None:
            out["model"] = self.model
        out["calibration"] = self.calibration.model_dump(mode="json")
        out["passes"] = [{s.name: s.config.model_dump(mode="json")} for s in self.passes]
        if not self._default_export:
            # a default export stays unwritten: parsed again, it becomes the one the model's kind validates on
            out["export"] = [{s.name: s.config.model_dump(mode="json")} for s in self.export]
        out["validate"] = self.validate_.config.model_dump(mode="json") if self.validate_ is not None else False
        if self.bench is not None:
            out["bench"] = self.bench.model_dump(mode="json")
        return out

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _step(item: Any, where: str, kinds: tuple[str, ...]) -> Step:
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, params = next(iter(item.items()))
        params = {} if params is None else params
    else:
        raise LmmcError(f"{where}: each entry is a pass name or a one-key mapping like '- wanda: {{sparsity: 0.5}}'")
    passes = load_passes()
    if name not in passes:
        known = sorted(n for n, c in passes.items() if c.kind in kinds)
        close = difflib.get_close_matches(str(name), known, 1)
        raise LmmcError(f"{where}: unknown pass '{name}'{f' (did you mean {close[0]}?)' if close else ''}; known "
                        f"passes here: {', '.join(known)}")
    cls = passes[name]
    if cls.kind not in kinds:
        section = {"compress": "passes", "export": "export"}.get(cls.kind, cls.kind)
        raise LmmcError(f"{where}: '{name}' is {'an' if cls.kind[0] in 'aeiou' else 'a'} {cls.kind} pass; put it "
                        f"under '{section}' in the recipe")
    if not isinstance(params, dict):
        raise LmmcError(f"{where}: the parameters of '{name}' must be a mapping, got {params!r}")
    if isinstance(params.get("nm"), int):
        # YAML reads N:M in base 60, as minutes and seconds (1:4 is 64); below 60 no N:M gave it, and 2:4 is shown
        n, m = divmod(params["nm"], 60) if params["nm"] >= 60 else (2, 4)
        raise LmmcError(f"{where}: nm = {params['nm']} is a number: YAML reads an unquoted {n}:{m} as the base-60 "
                        f"number {params['nm'] if params['nm'] >= 60 else 124}. Quote it: nm: \"{n}:{m}\"")
    try:
        return Step(name=name, config=cls.Config.model_validate(params))
    except ValidationError as err:
        raise LmmcError(f"{where}: bad parameters for pass '{name}':\n{explain(err)}") from None


def _resolve(value: Any, base: Path | None, what: str, must_exist: bool) -> Any:
    """A recipe's relative path, made absolute against the recipe's directory."""
    if isinstance(value, str) and not value.strip():
        raise LmmcError(f"{what} is an empty path, which would read as the recipe's directory; give a real path")
    if isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # as a shell would: the passes open paths as given
    if isinstance(value, list):  # a list of corpus files
        return [_resolve(v, base, f"{what}[{i}]", must_exist) for i, v in enumerate(value)]
    if base is None or not isinstance(value, str):
        return value
    if Path(value).is_absolute():
        if must_exist and "\0" not in value and not Path(value).exists():
            raise LmmcError(f"{what} '{value}' does not exist; fix the path in the recipe")
        return value
    if "\0" in value:
        raise LmmcError(f"{what} {value!r} holds a NUL character, which no path can; fix the path")
    path = (base / value).resolve()
    if must_exist and not path.exists():
        raise LmmcError(f"{what} '{value}' does not exist: relative paths in a recipe are resolved against the "
                        f"recipe's directory {base}, giving {path}; fix the path (relative to the recipe) or "
                        f"give an absolute one")
    return str(path)


def _resolve_params(params: dict[str, Any], base: Path | None, where: str) -> dict[str, Any]:
    """A step's parameters with their paths resolved, also inside a nested step config (antgmm's
    `distill`, which the distill pass runs between segments)."""
    return {k: _resolve(v, base, f"{where}.{k}", must_exist=k == "corpus") if k in PATH_PARAMS
            else _resolve_params(v, base, f"{where}.{k}") if isinstance(v, dict) and k == "distill"
            else v for k, v in params.items()}


def _resolve_paths(data: dict[str, Any], base: Path | None) -> dict[str, Any]:
    data = dict(data)
    model = data.get("model")
    # a path (./teacher, or a directory beside the recipe) is the recipe's; anything else is a hub id
    if isinstance(model, str) and (model.startswith((".", "~")) or not model.strip()
                                   or (base is not None and "\0" not in model and (base / model).exists())):
        data["model"] = _resolve(model, base, "model", must_exist=True)
    elif isinstance(model, str) and base is not None and not Path(model).is_absolute() and "\0" not in model \
            and (Path(model).exists() or model.count("/") > 1 or ("/" in model and Path(model.split("/")[0]).is_dir())):
        # a hub id is org/name; this is a path, which the model loader would read from the current directory
        raise LmmcError(f"model '{model}' is a path, and relative paths in a recipe are resolved against the "
                        f"recipe's directory {base}, giving {(base / model).resolve()}, which does not exist; fix "
                        f"the path (relative to the recipe), give an absolute one, or give the model on the "
                        f"command line")
    calibration = data.get("calibration")
    if isinstance(calibration, dict) and "path" in calibration:
        data["calibration"] = {**calibration,
                               "path": _resolve(calibration["path"], base, "calibration.path", must_exist=True)}
    for section in ("passes", "export"):
        items = data.get(section)
        if not isinstance(items, list):
            continue
        resolved = []
        for item in items:
            if isinstance(item, dict) and len(item) == 1:
                (name, params), = item.items()
                if isinstance(params, dict):
                    params = _resolve_params(params, base, name)
                item = {name: params}
            resolved.append(item)
        data[section] = resolved
    bench = data.get("bench")
    if isinstance(bench, dict) and isinstance(bench.get("corpora"), list):
        bench = data["bench"] = {**bench, "corpora": [_resolve(c, base, "bench.corpora", must_exist=True)
                                                      for c in bench["corpora"]]}
    if isinstance(bench, dict) and bench.get("teacher_cache") is not None:
        data["bench"] = {**bench, "teacher_cache": _resolve(bench["teacher_cache"], base, "bench.teacher_cache",
                                                            must_exist=False)}
    return data


def parse_recipe(data: Any, source: str = "recipe", base: Path | None = None) -> Recipe:
    """Turn the recipe's plain data into typed configs, or raise one LmmcError naming the fix.

    Relative paths are resolved against `base` (the recipe's directory) when given. Without a
    `validate` key the recipe validates with the default gates (and exports ONNX, which validation
    needs, unless it lists its own exports); `validate: false` switches validation off."""
    if not isinstance(data, dict):
        raise LmmcError(f"{source}: a recipe is a YAML mapping with keys model, calibration, passes, export, "
                        f"validate, bench")
    known = {"model", "calibration", "passes", "export", "validate", "bench"}
    unknown = set(data) - known
    if unknown:
        raise LmmcError(f"{source}: unknown key(s) {sorted(unknown, key=str)}; a recipe has only {sorted(known)}")
    data = _resolve_paths(data, base)
    if not isinstance(data.get("calibration") or {}, dict):
        raise LmmcError(f"{source}: 'calibration' must be a mapping like {{path: data.txt, samples: 128}}")
    try:
        calibration = CalibrationConfig.model_validate(data.get("calibration") or {})
    except ValidationError as err:
        raise LmmcError(f"{source}: bad calibration section:\n{explain(err)}") from None
    for section in ("passes", "export"):
        if not isinstance(data.get(section) or [], list):
            raise LmmcError(f"{source}: '{section}' must be a list of passes")
    raw_validate = data.get("validate", True)
    if raw_validate is None or raw_validate is True:
        raw_validate = {}
    if raw_validate is not False and not isinstance(raw_validate, dict):
        raise LmmcError(f"{source}: 'validate' is a mapping of gates like {{min_cosine: 0.8}}, or false to switch "
                        f"validation off; got {raw_validate!r}")
    raw_export = data.get("export")
    if raw_export is None and raw_validate is not False:
        raw_export = ["onnx"]
    passes = [_step(p, f"{source}: passes[{i}]", ("compress",)) for i, p in enumerate(data.get("passes") or [])]
    export = [_step(p, f"{source}: export[{i}]", ("export",)) for i, p in enumerate(raw_export or [])]
    validate = None
    if raw_validate is not False:
        validate = _step({"validate": raw_validate}, f"{source}: validate", ("validate",))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise LmmcError(f"{source}: 'model' must be a path or a hub id, got {model!r}")
    raw_bench = data.get("bench")
    if raw_bench is True:
        raw_bench = {}
    if raw_bench not in (None, False) and not isinstance(raw_bench, dict):
        raise LmmcError(f"{source}: 'bench' is a mapping of `lmmc bench` settings like {{repeats: 15}}, true for "
                        f"the defaults, or false; got {raw_bench!r}")
    try:
        bench = BenchConfig.model_validate(raw_bench) if isinstance(raw_bench, dict) else None
    except ValidationError as err:
        raise LmmcError(f"{source}: bad bench section:\n{explain(err)}") from None
    moved = [key for key in ("calib", "teacher") if bench is not None and getattr(bench, key) is not None]
    if moved:
        # the recipe's bench runs right after its compile, on that compile's data and teacher
        raise LmmcError(f"{source}: bench.{moved[0]} is for `lmmc bench --{moved[0]}` on an output whose "
                        f"{'calibration data' if moved[0] == 'calib' else 'teacher'} moved after its compile; a "
                        f"recipe's bench runs on its own compile's: drop it")
    recipe = Recipe(model=model, calibration=calibration, passes=passes, export=export, validate=validate,
                    bench=bench)
    recipe._default_export = data.get("export") is None and raw_validate is not False
    recipe.check()
    return recipe


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping; in a recipe the first was then silently ignored."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self._unique_keys(node, deep)
        return super().construct_mapping(node, deep=deep)

    def _unique_keys(self, node: yaml.MappingNode, deep: bool) -> None:
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                # `<<: *anchor` merges a mapping whose keys the explicit ones may override; a mapping written
                # in place there is never constructed on its own, so its keys are checked here
                for merged in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    if isinstance(merged, yaml.MappingNode):
                        self._unique_keys(merged, deep)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue   # an unhashable key: the base class names it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} appears twice (first {first.line + 1}:{first.column + 1}); keep one",
                    key_node.start_mark)


def _decimal_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.2's integers: 010 is ten, as a recipe's reader takes it, not YAML 1.1's octal eight."""
    text = loader.construct_scalar(node)
    return int(text, 0) if text.lstrip("+-")[:2].lower() in ("0o", "0x") else int(text, 10)


# YAML 1.1 also reads 010 as octal, 0b1 as binary, 1_000 as 1000 and 1:30 as 90 (base 60); YAML 1.2 keeps
# decimal, 0o octal and 0x hex, and the rest are strings the recipe's checks then name.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int",
                                       re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _decimal_int)


def load_recipe(path: str | Path, calib: str | None = None, model_given: bool = False) -> Recipe:
    """Read a recipe file; `calib` (the CLI's --calib, relative to the current directory) replaces its
    calibration path, and `model_given` (MODEL on the command line) its model."""
    path = Path(path)
    if not path.is_file():
        raise LmmcError(f"recipe '{path}' does not exist; pass --recipe with a YAML file (see samples/recipes/)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise LmmcError(f"recipe '{path}' is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:  # one line: where, and what; PyYAML's own text quotes the file with carets
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LmmcError(f"recipe '{path}' is not valid YAML{where}: "
                        f"{' '.join(str(getattr(err, 'problem', None) or err).split())}") from None
    except RecursionError:
        raise LmmcError(f"recipe '{path}' nests lists or mappings too deeply to read; a recipe is a few levels "
                        f"deep (see samples/recipes/)") from None
    if model_given and isinstance(data, dict):
        data.pop("model", None)  # not read, so not judged: its path may hold only from where the recipe was written
    if calib is not None and isinstance(data, dict):
        given = Path(os.path.expanduser(calib))
        if not given.exists():
            raise LmmcError(f"calibration data '{calib}' (--calib, relative to the current directory "
                            f"{Path.cwd()}) does not exist; pass --calib with a .txt, .jsonl or image folder")
        calibration = {} if data.get("calibration") is None else data["calibration"]
        if isinstance(calibration, dict):  # any other section is the parse's to refuse, not --calib's to replace
            data["calibration"] = {**calibration, "path": str(given.resolve()), "random": False}
    return parse_recipe(data, source=str(path), base=path.resolve().parent)


def _writes_fp16(step: Step) -> bool:
    """Whether an export step writes an artifact that validation judges by min_cosine_fp16."""
    cfg = step.config
    return (step.name == "ort" and bool(cfg.fp16)) or (step.name == "tensorrt" and "fp16" in cfg.precision
                                                       and _builds_engines(step))


def _writes_int8(step: Step) -> bool:
    """Whether an export step writes an artifact that validation judges by min_cosine_int8."""
    cfg = step.config
    return ((step.name in ("ort", "openvino") and bool(cfg.int8))
            or (step.name == "tensorrt" and "int8" in cfg.precision and _builds_engines(step)))


def _builds_engines(step: Step) -> bool:
    """An optional tensorrt step without TensorRT, or without a GPU it can use, notes 'engine not built' and
    writes nothing to gate."""
    from lmmc.export.tensorrt import why_no_engines

    return not step.config.optional or why_no_engines() is None


def _no_engine(exports: list[Step], precision: str) -> str:
    from lmmc.export.tensorrt import why_no_engines

    optional = any(s.name == "tensorrt" and precision in s.config.precision for s in exports)
    return f" (the optional tensorrt step builds no engine here: {why_no_engines()})" if optional else ""
