"""Base of every typed config read from a recipe: unknown keys refused, and no yes/no value read as a number."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator


def _bool_coerced(raw: Any, value: Any) -> bool:
    """Whether validation turned a YAML true/false somewhere in `raw` into a number in `value`, or text
    ('yes', 'off') into true/false."""
    if isinstance(raw, bool):
        return not isinstance(value, bool)
    if isinstance(raw, str) and isinstance(value, bool):
        return True
    if isinstance(raw, (list, tuple)) and isinstance(value, (list, tuple)) and len(raw) == len(value):
        return any(_bool_coerced(r, v) for r, v in zip(raw, value))
    if isinstance(raw, dict) and isinstance(value, dict):
        return any(_bool_coerced(r, value[k]) for k, r in raw.items() if k in value)
    return False


def _types(annotation: Any) -> set:
    """Every type (and Literal value) an annotation names, unions and containers opened."""
    args = typing.get_args(annotation)
    return {annotation} if not args else set().union(*(_types(a) for a in args))


def on_off(value: Any) -> Any:
    """YAML 1.1 reads an unquoted on/off as true/false; a setting whose values are "on"/"off" takes them back."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


LARGEST = 2**31 - 1


class Config(BaseModel):
    """Typed, frozen, unknown keys rejected, no infinite or NaN number (a gate of .inf is no gate). pydantic
    reads `samples: true` as 1, `lr: false` as 0.0 and `random: "no"` as false; a recipe that says yes or no
    where a number belongs, or quotes a yes/no, has a mistake in it, so that is refused instead."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="wrap")
    @classmethod
    def _no_yes_no_numbers(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        # before the field's own checks, which would read true as 1 and say it is out of range
        kinds = _types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ValueError(f"{value!r} holds a yes/no value where a number belongs; write the number")
        result = handler(value)
        if type(result) is int and info.field_name != "seed" and abs(result) > LARGEST:
            # no count or size of a compile comes near it; past int64, torch's calls overflow (exit 3)
            raise ValueError(f"{result} is larger than any count or size lmmc takes (at most {LARGEST})")
        if _bool_coerced(value, result):
            if isinstance(result, bool):
                raise ValueError(f"{value!r} is text where yes/no belongs; write true or false, unquoted")
            raise ValueError(f"{value!r} holds a yes/no value where a number belongs; write the number")
        return result

    def given(self, key: str) -> bool:
        """Whether `key` holds other than its default. A recipe written back by Recipe.to_dict (report.json's)
        lists every field, defaults included, so what a setting does must follow its value, not its presence."""
        return getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True)


def explain(err: ValidationError) -> str:
    """A validation error as one indented line per wrong key: where it is and what is wrong."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check the spelling against the documented keys: `lmmc passes` lists each pass's and " \
            "the calibration and bench sections')" \
            if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "int_parsing" and isinstance(e.get("input"), str) and "e" in e["input"].lower():
            msg += f" ({e['input']!r} is text to YAML, not a number; write the count in digits)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)
