"""report.html: one self-contained page (plots embedded, no scripts, no network) drawn from report.json."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

from lmmc.errors import LmmcError

# Marks a report.html as lmmc's own: `lmmc report` replaces no other file of that name.
GENERATOR = "lmmc report.html"

_STYLE = """
body { font-family: sans-serif; max-width: 1000px; margin: 1.5em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { font-size: 1.4em; font-weight: bold; padding: 0.5em 0.8em; border-radius: 4px; color: #fff; }
.passed { background: #2e7d32; } .failed { background: #c62828; } .unvalidated { background: #757575; }
tr.missed td { background: #fde0e0; } .note { color: #666; font-style: italic; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, fmt: str = ".4g") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "n/a" if value is None else _e(value)
    return format(value, fmt)


def _threads(n: Any) -> str:
    return f"{_e(n)} thread{'' if n == 1 else 's'}"


def gate_digits(value: Any, threshold: Any) -> str:
    """The format that tells a gate's figure from its threshold and prints the threshold as the recipe gave
    it: 4 significant digits, more where those would print 0.9999836 and 0.99999 alike (as "1" and "1", a
    missed gate that reads as met), 0.99999 as "1", or a cosine of 0.99998 as a whole 1."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, threshold)):
        return ".4g"
    for digits in range(4, 13):
        fmt = f".{digits}g"
        whole = float(format(value, fmt)).is_integer() and not float(value).is_integer()
        if format(value, fmt) != format(threshold, fmt) and float(format(threshold, fmt)) == threshold and not whole:
            return fmt
    return ".12g"


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """A table of already escaped cells; a cell starting with a digit or sign is aligned right."""
    def cell(c: str) -> str:
        return f'<td class="num">{c}</td>' if c[:1].isdigit() or c[:1] in "+-" else f"<td>{c}</td>"
    head = f"<tr>{''.join(f'<th>{_e(h)}</th>' for h in header)}</tr>" if any(header) else ""
    body = "".join(f'<tr class="{cls}">' + "".join(cell(c) for c in r) + "</tr>"
                   for r, cls in zip(rows, classes or [""] * len(rows)))
    return f"<table>{head}{body}</table>"


def _img(fig, alt: str) -> str:
    from lmmc.plots import png_bytes

    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}\n"


def _passes(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in report.get("passes") or [] if p.get("name") == name and isinstance(p.get("metrics"), dict)]


# --- sections ---------------------------------------------------------------------------------------------

def _verdict(report: dict[str, Any]) -> str:
    passed = report.get("passed")
    gates = (report.get("validation") or {}).get("gates") or []
    missed = sum(not g["passed"] for g in gates)
    if passed is None:
        word, cls = "NOT VALIDATED", "unvalidated"
        detail = "validation was switched off: the student was not compared with the teacher"
    elif passed:
        word, cls, detail = "PASSED", "passed", f"all {len(gates)} gates were met"
    else:
        word, cls = "FAILED", "failed"
        detail = (f"{missed} of {len(gates)} gates missed" if missed else "the compile failed (below)") \
            + ": do not ship this student"
    state = "null" if passed is None else str(bool(passed)).lower()
    out = [f'<div id="verdict" class="verdict {cls}" data-passed="{state}">{word}: {_e(detail)}</div>']
    if gates:
        rows = [[_e(g["name"]), _num(g["value"], gate_digits(g["value"], g["threshold"])),
                 f"{_e(g['op'])} {_num(g['threshold'], gate_digits(g['value'], g['threshold']))}",
                 "ok" if g["passed"] else "MISSED"] for g in gates]
        out.append(_table(["gate", "value", "needs", "result"], rows,
                          ["gate" if g["passed"] else "gate missed" for g in gates]))
    elif passed is not None:
        out.append(_note("the report lists no gates"))
    for failure in report.get("failures") or []:
        out.append(f'<p class="failure"><b>failed:</b> {_e(failure)}</p>')
    return "\n".join(out)


def _overview(report: dict[str, Any]) -> str:
    rows = [["model", _e(report.get("model"))], ["family", _e(report.get("adapter"))]]
    params = report.get("parameters") or {}
    if params:
        ratio = params["student"] / params["teacher"] if params.get("teacher") else None
        rows.append(["parameters", f"{params['teacher']:,} → {params['student']:,}"
                     + (f" ({ratio:.1%} kept)" if ratio is not None else "")])
    sparsity = (report.get("sparsity") or {}).get("sparsity")
    if sparsity is not None:
        rows.append(["sparsity of prunable weights", f"{sparsity:.1%}"])
    calib = report.get("calibration") or {}
    if calib:
        rows.append(["data", _e(", ".join(f"{k}: {v}" for k, v in calib.items()))])
    if report.get("seconds") is not None:
        rows.append(["compile time", f"{report['seconds']:.1f} s"])
    rows.append(["lmmc", _e(report.get("lmmc_version"))])
    out = [_table(["", ""], rows)]
    flops = report.get("flops") or {}
    if flops:
        out.append(_table(["tower", "teacher FLOPs", "student FLOPs", "kept", "tokens counted"],
                          [[_e(n), _num(f.get("teacher"), ",.0f"), _num(f.get("student"), ",.0f"),
                            _num(f.get("kept"), ".1%"), _num(f.get("tokens"))] for n, f in flops.items()]))
    for warning in report.get("warnings") or []:
        out.append(f'<p class="warning"><b>warning:</b> {_e(warning)}</p>')
    return "\n".join(out)


def _worst(diffs: dict[str, float | None] | None) -> float | None:
    """The largest of a set of max |diff| values; None when there are none or one is NaN/Inf (null)."""
    values = list((diffs or {}).values())
    return max(values) if values and None not in values else None


def _generation(validation: dict[str, Any]) -> str:
    """A generative student against its teacher on the held-out image-text samples."""
    g = validation["generation"]
    greedy = g.get("generation") or {}
    n = greedy.get("tokens")
    rows = [["held-out samples", _num(g.get("held_out_samples"))],
            ["answer tokens (teacher-forced)", _num(g.get("answer_tokens"))],
            ["next-token KL(teacher ‖ student), mean per answer token", _num(g.get("kl_mean"), ".4g")],
            ["next-token KL, largest on one token", _num(g.get("kl_max"), ".4g")],
            ["top-1 agreement, answer tokens", _num(g.get("top1_agreement"), ".4f")],
            [f"greedy agreement: first {_e(n)} tokens identical", _num(greedy.get("agreement"), ".4f")],
            [f"mean matching prefix (of {_e(n)} tokens)", _num(greedy.get("prefix_mean"), ".2f")]]
    runtime = g.get("runtime")
    if runtime:
        rows += [["ONNX Runtime vs PyTorch student: greedy outputs identical", _num(runtime.get("greedy_identical"), ".4f")],
                 ["ONNX Runtime vs PyTorch student: first-step logits max abs diff",
                  _num(runtime.get("first_logits_max_abs_diff"), ".1e")]]
    return "\n".join([_table(["", ""], rows), _task_metric(validation.get("task_metric"))])


def _fidelity(report: dict[str, Any]) -> str:
    validation = report.get("validation") or {}
    towers = validation.get("towers") or {}
    if validation.get("generation"):
        return _generation(validation)
    if not towers:
        return _note("not validated: no teacher-student comparison in report.json")
    rows = []
    for name, t in towers.items():
        per_sample = [v for v in t.get("cosine_per_sample") or [] if v is not None]
        lat = t.get("latency_ms") or {}
        diff = t.get("runtime_max_abs_diff")
        rows.append([_e(name), _num(t.get("held_out_samples")), _num(t.get("cosine_mean"), ".4f"),
                     _num(statistics.median(per_sample) if per_sample else None, ".4f"),
                     _num(t.get("cosine_min"), ".4f"),
                     _num(_worst(diff), ".1e"),
                     _num(lat.get("teacher"), ".2f"), _num(lat.get("student"), ".2f"),
                     f"{lat['speedup']:.2f}x" if lat.get("speedup") else "n/a"])
    out = [_table(["tower", "held-out", "cosine mean", "median", "min", "ORT max |diff|", "teacher ms",
                   "student ms", "speedup"], rows)]
    out.append(_task_metric(validation.get("task_metric")))
    exports = validation.get("exports") or []
    if exports:
        rows = [[_e(x.get("tower")), _e(f"{x.get('backend')} {x.get('precision')} {x.get('variant')}"),
                 _num(x.get("cosine_to_teacher"), ".4f"), _num(x.get("cosine_to_student"), ".4f"),
                 _num((x.get("short_cosine_to_student") or {}).get("min"), ".4f"),
                 _num(_worst(x.get("max_abs_diff")), ".1e")] for x in exports]
        out.append("<h3>Deployment artifacts</h3>")
        out.append(_table(["tower", "artifact", "cosine to teacher", "cosine to student",
                           "short texts, worst cosine to student", "max |diff|"], rows))
    if any(_worst(t.get("runtime_max_abs_diff")) is not None for t in towers.values()) or exports:
        out.append(_note("max |diff| is absolute; the runtime gates divide it by the output's largest |value| "
                         "where that exceeds 1 (validate.max_runtime_diff)"))
    return "\n".join(out)


def _scalars(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every scalar leaf of a nested dict, with its dotted key (lists are left out)."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _scalars(v, f"{prefix}{k}.")]
    return [] if isinstance(value, list) else [(prefix.rstrip("."), value)]


def _task_metric(task: Any) -> str:
    """The task metric as report.json holds it: teacher and student side by side where it has both."""
    if not task:
        return _note("no task metric in report.json")
    metrics = task if isinstance(task, list) else [task]
    out = ["<h3>Task metric</h3>"]
    for metric in metrics:
        name = metric.get("name", "task metric") if isinstance(metric, dict) else "task metric"
        fields = dict(_scalars(metric)) if isinstance(metric, dict) else {"value": metric}
        fields.pop("name", None)
        rows = []
        student_key = "student" if "student" in fields else "value"
        if isinstance(fields.get("teacher"), (int, float)) and isinstance(fields.get(student_key), (int, float)):
            t, s = fields.pop("teacher"), fields.pop(student_key)
            if fields.get("value") == s:
                fields.pop("value")
            rows.append(["teacher", _num(t, ".4f")])
            rows.append(["student", _num(s, ".4f")])
            if t and "ratio" not in fields:
                rows.append(["student / teacher", _num(s / t, ".4f")])
        rows += [[_e(k), _num(v, ".4f") if isinstance(v, float) else _e(v)] for k, v in fields.items()]
        out.append(f"<p><b>{_e(name)}</b></p>" + _table(["", ""], rows))
    return "\n".join(out)


def _tower_of(param: str, prefixes: dict[str, tuple[str, ...]]) -> str:
    for tower, layers in prefixes.items():
        if any(param.startswith(p + ".") for p in layers):
            return tower
    return next(iter(prefixes)) if len(prefixes) == 1 else "other"


def _short(param: str, prefixes: dict[str, tuple[str, ...]]) -> str:
    """`text_model.encoder.layers.0.self_attn.q_proj.weight` -> `text 0.self_attn.q_proj`."""
    for tower, layers in prefixes.items():
        for p in layers:
            if param.startswith(p + "."):
                return f"{tower} {param[len(p) + 1:].removesuffix('.weight')}"
    return param.removesuffix(".weight")


def _sparsity(report: dict[str, Any], prefixes: dict[str, tuple[str, ...]]) -> str:
    from lmmc.plots import allocation_figure, sparsity_figure

    out = []
    for p in _passes(report, "uniform") + _passes(report, "owl") + _passes(report, "ecoflap"):
        groups = p["metrics"].get("groups")
        if groups:
            m = p["metrics"]
            per_tower = ", ".join(f"{t}: {v['sparsity']:.1%}" for t, v in (m.get("per_tower") or {}).items())
            out.append(f"<p>{_e(p['name'])} allocated a sparsity per {_e(m.get('granularity', 'group'))} "
                       f"under one budget of {_num(m.get('target'), '.0%')}: {_e(per_tower)}</p>")
            out.append(_img(allocation_figure(groups, m["target"], f"{p['name']}: allocated sparsity"),
                            f"{p['name']} allocation"))
    summary = report.get("sparsity") or {}
    per_layer = summary.get("sparsity_per_layer") or {}
    if per_layer and any(per_layer.values()):
        matrices = [(_short(k, prefixes), _tower_of(k, prefixes), v) for k, v in per_layer.items()]
        out.append(_img(sparsity_figure(matrices, summary.get("sparsity_per_tower") or {}),
                        "sparsity per weight matrix"))
    elif not out:
        out.append(_note("no weights were zeroed (no unstructured or N:M pruning ran)"))
    return "\n".join(out)


def _teacher_shapes(out_dir: Path | None, adapter_family: str | None) -> dict[str, tuple[int | None, int | None]]:
    """Heads and FFN width of each teacher tower from the student's config.json (structured pruning
    leaves those sizes as the teacher had them and records the real per-layer shapes apart)."""
    from lmmc.adapters import get_adapter

    path = out_dir / "student" / "config.json" if out_dir else None
    if path is None or not path.is_file() or not adapter_family:
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    shapes = {}
    for tower in get_adapter(adapter_family).towers:
        cfg = config.get(tower.config_key, {}) if tower.config_key else config
        shapes[tower.name] = (cfg.get("num_attention_heads"), cfg.get("intermediate_size"))
    return shapes


def layer_structure(report: dict[str, Any], out_dir: Path | None) -> dict[str, dict[str, Any]]:
    """Per tower, what the structure plot draws: `layers` (the teacher's count), `kept` ({teacher layer:
    (heads, FFN width)}, removed layers absent) and the teacher's `heads` and `ffn` per layer (None when
    OUT_DIR is unknown). Empty when no structured pruning ran."""
    runs = [p for p in _passes(report, "antgmm") if p["metrics"].get("structure")]
    if not runs:
        return {}
    teacher = _teacher_shapes(out_dir, report.get("adapter"))
    removed: dict[str, list[int]] = {}
    for p in runs:
        for seg in p["metrics"].get("segments") or []:
            for tower, layers in (seg.get("removed_layers") or {}).items():
                removed.setdefault(tower, []).extend(layers)
    towers = {}
    for name, s in runs[-1]["metrics"]["structure"].items():
        kept = {layer: (h, f) for layer, h, f in zip(s["teacher_layers"], s["heads"], s["ffn"])}
        heads, ffn = teacher.get(name, (None, None))
        towers[name] = {"layers": max([*kept, *removed.get(name, [])]) + 1, "kept": kept, "heads": heads,
                        "ffn": ffn}
    return towers


def _structure(report: dict[str, Any], out_dir: Path | None) -> str:
    from lmmc.plots import structure_figure

    towers = layer_structure(report, out_dir)
    if not towers:
        return _note("no structured pruning ran: every layer keeps all its heads and its full FFN width")
    m = _passes(report, "antgmm")[-1]["metrics"]
    rows = []
    before, after = m.get("blocks_before") or {}, m.get("blocks_after") or {}
    budget = m.get("budget", "flops")
    fmt = ".4g" if budget == "ms" else ",.0f"  # predicted milliseconds are fractions; FLOPs and parameters counts
    for name in towers:
        b, a = (before.get(name) or {}).get(budget), (after.get(name) or {}).get(budget)
        rows.append([_e(name), _num(b, fmt), _num(a, fmt), f"{a / b:.1%}" if a is not None and b else "n/a"])
    tokens = m.get("tokens") or {}
    target = m.get("target_keep")
    target = ", ".join(f"{_e(t)} {_num(k, '.0%')}" for t, k in target.items()) if isinstance(target, dict) \
        else _num(target, ".0%")
    out = [f"<p>Kept {_num(m.get('kept'), '.1%')} of the blocks' {_e(budget)} (target "
           f"{target}), counted at "
           f"{_e(', '.join(f'{t}: {n} tokens' for t, n in tokens.items()))}.</p>",
           _table(["tower", f"teacher {budget}", f"student {budget}", "kept"], rows),
           _img(structure_figure(towers), "heads and FFN width kept per layer")]
    return "\n".join(out)


def _cosines(report: dict[str, Any]) -> str:
    from lmmc.plots import cosine_histogram

    validation = report.get("validation") or {}
    kl = [v for v in (validation.get("generation") or {}).get("kl_per_sample") or [] if v is not None]
    if kl:  # a generative model has no embedding to take a cosine of
        return (f"<p>A generative model is validated by its next-token KL divergence from the teacher on the "
                f"held-out answers, not by an embedding's cosine. Per sample, over {len(kl)} samples: median "
                f"{_num(statistics.median(kl))}, largest {_num(max(kl))}.</p>")
    towers = validation.get("towers") or {}
    recorded = {n: t["cosine_per_sample"] for n, t in towers.items() if t.get("cosine_per_sample")}
    if not recorded:
        return _note("report.json holds no per-sample cosines (validation did not run, or an older lmmc wrote it)")
    # report.json writes a NaN/Inf cosine as null
    per_tower = {n: [v for v in values if v is not None] for n, values in recorded.items()}
    out = [_note(f"{name}: {len(recorded[name]) - len(values)} of {len(recorded[name])} held-out samples have a "
                 f"non-finite (NaN/Inf) cosine")
           for name, values in per_tower.items() if len(values) < len(recorded[name])]
    per_tower = {n: values for n, values in per_tower.items() if values}
    if per_tower:
        gate = ((report.get("recipe") or {}).get("validate") or {}).get("min_cosine")
        out.append(_img(cosine_histogram(per_tower, gate), "per-sample cosine to the teacher"))
    return "\n".join(out)


def _generative(m: dict[str, Any]) -> bool:
    """Whether a distillation was scored by next-token KL (a generative student) rather than by cosine."""
    return "kl" in (m.get("dev_before") or {})


def _points(m: dict[str, Any], offset: int = 0) -> list[tuple[int, float | None, float | None]]:
    """(step, training loss, dev measure) of one distillation run: the evaluation before it, then its curve.
    The measure is the mean cosine, or the KL for a generative student (its score is minus the KL)."""
    key = "kl" if _generative(m) else "score"
    before = m.get("dev_before") or {}
    start = [(offset, None, before[key])] if before.get(key) is not None else []
    return start + [(offset + c["step"], c.get("loss"), c.get(key)) for c in m.get("curve") or []]


def _measure(m: dict[str, Any]) -> str:
    return "dev KL to the teacher (lower is better)" if _generative(m) else "dev fidelity (mean cosine)"


def _distill_runs(report: dict[str, Any]) -> list[tuple[str, str, list, list[int], str]]:
    """(title, summary, points, boundaries, measure) of every distillation that has a curve: each distill pass, and
    per antgmm pass all its distillation between segments joined on one step axis."""
    runs = []
    for i, p in enumerate(report.get("passes") or []):
        m = p.get("metrics")
        if not isinstance(m, dict):
            continue
        if p.get("name") == "distill" and m.get("curve"):
            before, after = m.get("dev_before") or {}, m.get("dev_after") or {}
            key, name = ("kl", "dev KL to the teacher") if _generative(m) else ("score", "dev fidelity")
            kept = after.get(key, before.get(key) if m.get("kept_step") == 0 else None)
            summary = (f"{name} {_num(before.get(key), '.4f')} before, {_num(kept, '.4f')} kept (step "
                       f"{_e(m.get('kept_step'))} of {_e(m.get('steps'))}), {_num(m.get('train_seconds'), '.1f')} s "
                       f"of training")
            runs.append((f"pass {i + 1}: distill ({m.get('schedule', '')}, {m.get('steps')} steps)", summary,
                         _points(m), [], _measure(m)))
        if p.get("name") == "antgmm":
            points, boundaries, offset, measure = [], [], 0, ""
            for seg in m.get("segments") or []:
                # a width stage distils once per segment, the depth stage once per fade-out step
                found = seg.get("distill")
                for d in found if isinstance(found, list) else [found]:
                    if isinstance(d, dict) and d.get("curve"):
                        boundaries.append(offset)
                        points += _points(d, offset)
                        measure = _measure(d)
                        offset += d.get("steps") or 0
            if points:
                summary = (f"{len(boundaries)} distillation runs between segments and fade-out steps, {offset} "
                           f"steps in all (dotted lines: where each starts)")
                runs.append((f"pass {i + 1}: antgmm's distillation", summary, points, boundaries, measure))
    return runs


def _distillation(report: dict[str, Any]) -> str:
    from lmmc.plots import distill_figure

    runs = _distill_runs(report)
    if not runs:
        return _note("no distillation ran (or it ran without dev evaluations)")
    out = []
    for title, summary, points, boundaries, measure in runs:
        out.append(f"<p>{_e(title)}: {summary}</p>")
        steps, loss, score = (list(v) for v in zip(*points))
        out.append(_img(distill_figure(steps, loss, score, title, boundaries, measure), title))
    return "\n".join(out)


def _mixed_precision(report: dict[str, Any]) -> str:
    """The choice table of every mixed-precision artifact: per block matrix, the precision kept and the
    pooled-embedding cosine its quantisation cost on the calibration batches."""
    out = []
    for name in ("ort", "openvino"):
        for p in _passes(report, name):
            for tower, m in p["metrics"].items():
                for file, choice in ((m.get("mixed") or {}) if isinstance(m, dict) else {}).items():
                    rows = [[_e(r.get("matrix")), _e(r.get("precision")), _num(r.get("cosine_cost"), ".2e")]
                            for r in choice.get("matrices") or []]
                    out.append(f"<h3>{_e(tower)}: {_e(name)} {_e(file)}</h3>")
                    out.append(f"<p>{len(choice.get('fp32_matrices') or [])} of {len(rows)} matrices kept fp32; "
                               f"cosine drop to the fp32 student on {_e(choice.get('search_batches'))} calibration "
                               f"batches: {_num(choice.get('cosine_drop'), '.2e')} (every matrix INT8: "
                               f"{_num(choice.get('int8_cosine_drop'), '.2e')}; budget "
                               f"{_num(choice.get('max_cosine_drop'))}).</p>")
                    out.append(_table(["matrix", "precision", "cosine cost of quantising it alone"], rows))
                    out.extend(_note(w) for w in choice.get("warnings") or [])
    return "\n".join(out) if out else _note("no mixed-precision artifact: no export asked for int8 mixed")


def read_bench(out_dir: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """OUT_DIR/bench.json when `lmmc bench` wrote it, else None; and why a bench.json there is left out."""
    path = out_dir / "bench.json" if out_dir else None
    if path is None or not path.is_file():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None, f"'{path}' is not valid JSON, so its latencies are left out; run lmmc bench again to rewrite it"
    from lmmc.bench import JSON_KIND, is_bench_json, output_fingerprint

    if isinstance(data, dict) and data.get("kind") == JSON_KIND:
        if data.get("output") is not None and data["output"] != output_fingerprint(out_dir):
            return None, (f"'{path}' timed another compile's output (one since replaced, or copied from elsewhere), "
                          f"so its latencies are left out; run lmmc bench {out_dir} again")
        if not is_bench_json(path):  # its figures may be anyone's: drawn, they would read as measured
            return None, (f"'{path}' was edited since lmmc bench wrote it, so its latencies are left out; run lmmc "
                          f"bench {out_dir} again")
        return data, None
    return None, f"'{path}' was not written by lmmc bench, so it is left out"


def _latency_target(report: dict[str, Any]) -> str:
    """A latency target's outcome: what was asked, predicted when the student was cut, and measured."""
    lat = (report.get("validation") or {}).get("latency_target")
    if not isinstance(lat, dict):
        return ""
    rows = [["target", _num(lat.get("target_ms")), _num(lat.get("speedup_target"))],
            ["predicted at the cut", _num(lat.get("predicted_ms")), _num(lat.get("speedup_predicted"))],
            ["measured", _num(lat.get("measured_ms")), _num(lat.get("speedup_measured"))]]
    return (f"<p>Latency target on {_e(lat.get('deploy'))}: the student measured "
            f"{_num(lat.get('miss'), '.1%')} off its target; the latency model's prediction was "
            f"{_num(lat.get('prediction_error'), '+.1%')} off the measurement.</p>"
            + _table(["student", "ms per batch", "speed-up over the teacher"], rows))


def _latency(report: dict[str, Any], bench: dict[str, Any] | None) -> str:
    target, timing = _latency_target(report), _latency_timing(report, bench)
    if not target and timing is None and (report.get("validation") or {}).get("generation"):
        return _note("no latency was measured: a generative model's validation times nothing; run lmmc bench "
                     "on this output, then lmmc report")
    return target + ("" if target and timing is None else timing or _note(
        "no latency was measured (validate.latency is off, or validation did not run)"))


def _latency_timing(report: dict[str, Any], bench: dict[str, Any] | None) -> str | None:
    from lmmc.plots import latency_figure

    if bench and bench.get("generative") and bench.get("rows"):
        groups = {"generation": [(f"{r['model']}: {r['artifact']}", r["latency_ms"]["p50"], r["model"] == "student")
                                 for r in bench["rows"]]}
        text = (f"<p>lmmc bench: median latency of {_e(bench.get('new_tokens'))} greedy tokens (the image and prompt "
                f"read first), batch {_e(bench.get('batch'))}, {_threads(bench.get('threads'))}, "
                f"{_e((bench.get('machine') or {}).get('cpus'))} CPUs.</p>")
        return text + _img(latency_figure(groups, f"median latency of {bench.get('new_tokens')} tokens (ms)"),
                           "latency per backend")
    if bench and bench.get("towers"):
        groups = {name: [(f"{r['model']}: {r['artifact']}", r["latency_ms"]["p50"], r["model"] == "student")
                         for r in t.get("rows") or []] for name, t in bench["towers"].items()}
        text = (f"<p>lmmc bench: median latency per backend, batch {_e(bench.get('batch'))}, "
                f"{_threads(bench.get('threads'))}, {_e((bench.get('machine') or {}).get('cpus'))} CPUs.</p>")
        return text + _img(latency_figure(groups, "median latency per batch (ms)"), "latency per backend")
    towers = (report.get("validation") or {}).get("towers") or {}
    timed = {n: t["latency_ms"] for n, t in towers.items() if t.get("latency_ms")}
    if not timed:
        return None
    first = next(iter(timed.values()))
    groups = {n: [("teacher", lat["teacher"], False), ("student", lat["student"], True)] for n, lat in timed.items()}
    inputs = "; ".join(f"{n}: {shape}" for lat in timed.values() for n, shape in (lat.get("input") or {}).items())
    text = (f"<p>{_e(first.get('runtime'))}, {_threads(first.get('threads'))}, inputs {_e(inputs)}. Run "
            f"<code>lmmc bench</code> and then <code>lmmc report</code> for every backend.</p>")
    return text + _img(latency_figure(groups, "median latency per batch in ONNX Runtime (ms)"), "latency")


def _time(report: dict[str, Any]) -> str:
    from lmmc.plots import seconds_figure

    passes = [(i + 1, str(p.get("name")), p["seconds"]) for i, p in enumerate(report.get("passes") or [])
              if isinstance(p.get("seconds"), (int, float))]
    if not passes:
        return _note("report.json records no passes")
    total = report.get("seconds")
    rows = [[str(i), _e(n), f"{s:.2f}", f"{s / total:.0%}" if total else "n/a"] for i, n, s in passes]
    return (_table(["#", "pass", "seconds", "of the compile"], rows)
            + _img(seconds_figure([(f"{i}. {n}", s) for i, n, s in passes]), "time per pass"))


# --- the page ---------------------------------------------------------------------------------------------

def render(report: dict[str, Any], out_dir: Path | None = None) -> str:
    """The page for `report` (as report.json holds it). `out_dir` is where the compile's output lies,
    for the teacher's layer shapes and bench.json; without it those parts are left out."""
    from lmmc.adapters import get_adapter

    family = report.get("adapter")
    prefixes = {t.name: t.layers for t in get_adapter(family).towers} if family else {}
    bench, bench_problem = read_bench(out_dir)
    title = f"lmmc report: {report.get('model', '')}"
    body = [
        f"<h1>{_e(title)}</h1>",
        _verdict(report),
        _section("Overview", _overview(report)),
        _section("Fidelity to the teacher, per tower", _fidelity(report)),
        _section("Per-sample cosine on the held-out set", _cosines(report)),
        _section("Sparsity per matrix and tower", _sparsity(report, prefixes)),
        _section("Structure per layer", _structure(report, out_dir)),
        _section("Distillation", _distillation(report)),
        _section("Mixed precision", _mixed_precision(report)),
        _section("Latency", (_note(bench_problem) if bench_problem else "") + _latency(report, bench)),
        _section("Time per pass", _time(report)),
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR} {_e(report.get("lmmc_version", ""))}">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
    # the page's own SHA-256: lmmc report redraws it, and --force tells that from a user's edit by this
    return page.replace("<title>", _SEAL.format(hashlib.sha256(page.encode()).hexdigest()) + "<title>", 1)


_SEAL = '<meta name="lmmc-sha256" content="{}">'
_SEALED = re.compile(_SEAL.format("([0-9a-f]{64})"))


def is_ours(path: Path) -> bool:
    """Whether `path` is a page lmmc drew (its generator tag)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}' in head


def is_unedited(path: Path) -> bool:
    """Whether `path` is a page lmmc drew, as it drew it (its text hashes to the digest it carries)."""
    try:
        page = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    seal = _SEALED.search(page[:4000])
    return seal is not None and hashlib.sha256(page.replace(seal.group(0), "", 1).encode()).hexdigest() == seal.group(1)


def write_report_html(out_dir: Path) -> Path:
    """Draw OUT_DIR/report.html from OUT_DIR/report.json, written whole or not at all; an existing
    report.html is replaced only when lmmc wrote it."""
    from lmmc.resume import WorkArea, write_new
    from lmmc.runtime import FILE_LIST, edited_files, output_fingerprint

    out_dir = Path(out_dir)
    source, target = out_dir / "report.json", out_dir / "report.html"
    if WorkArea(out_dir).running() is not None:
        raise LmmcError(f"a compile is writing to '{out_dir}' and will replace it, report.html with it; run lmmc "
                        f"report once it has finished")
    fingerprint = output_fingerprint(out_dir)
    if not source.is_file():
        raise LmmcError(f"'{out_dir}' holds no report.json; give the --out directory of an lmmc compile")
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        reason = "nested too deep" if isinstance(err, RecursionError) else str(err)
        raise LmmcError(f"'{source}' is not valid JSON ({reason}); compile again to write it anew") from None
    if not isinstance(report, dict) or "lmmc_version" not in report:
        raise LmmcError(f"'{source}' was not written by lmmc compile; give the --out directory of an lmmc compile")
    if edited_files(out_dir, ["report.json"]):  # the page would show the edited figures as the compile's
        raise LmmcError(f"'{source}' is not the file the compile wrote (its SHA-256 differs from the one {FILE_LIST} "
                        f"keeps): it was edited or damaged since; restore it, or compile again to write it anew")
    if target.is_symlink():  # replacing it would drop the user's link; writing through it, their file
        raise LmmcError(f"'{target}' is a symbolic link, which lmmc never writes; remove it to draw the report there")
    if target.exists() and not is_unedited(target):  # a page lmmc drew and someone edited is theirs now
        raise LmmcError(f"'{target}' exists and was not written by lmmc, or was edited since; move it away to draw "
                        f"the report there")
    try:
        page = render(report, out_dir)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RecursionError) as err:
        # A report.json edited by hand, or cut: the page is drawn from what a compile writes, no other shape.
        also = " (or bench.json beside it what lmmc bench writes)" if (out_dir / "bench.json").is_file() else ""
        raise LmmcError(f"'{source}' does not hold what lmmc compile writes{also} ({type(err).__name__}: {err}); "
                        f"compile again to write it anew, or restore the file") from None
    partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    moved = LmmcError(f"'{out_dir}' was replaced by a compile while its report was drawn; nothing was written: run "
                      f"lmmc report again")
    try:
        write_new(partial, page)
        # a compile --force that replaced the output while the page was drawn: the page describes the old one
        if WorkArea(out_dir).running() is not None or output_fingerprint(out_dir) != fingerprint:
            raise moved
        os.replace(partial, target)
    except FileNotFoundError:  # the folder the partial page was in moved away with the old output
        raise moved from None
    finally:
        partial.unlink(missing_ok=True)
    return target
