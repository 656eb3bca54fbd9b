"""The `lmmc` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lmmc.errors import GateFailed, LmmcError


class _Group(click.Group):
    """Turns user errors into one clear line and exit code 2, wherever they are raised."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LmmcError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except GateFailed as err:
            click.echo(f"validation gate missed: {err}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmmc")
def main() -> None:
    """lmmc compiles a Hugging Face transformer (BERT-family, ViT, CLIP, SigLIP) into a smaller student,
    exports it to ONNX and validates it against the original (the teacher).

    \b
    A compile is described by a YAML recipe:
      model: optional default for MODEL
      calibration: {path: data.txt, samples: 128, eval_samples: 64}
      passes:  [{wanda: {sparsity: 0.5}}]          # compression, in order
      export:  [onnx]                              # export targets
      validate: {min_cosine: 0.8}                  # gates; a miss fails the compile

    \b
    Start with:  lmmc compile MODEL --recipe samples/recipes/minilm-wanda50.yaml --out out --dry-run
    List passes: lmmc passes
    """


@main.command("compile")
@click.argument("model")
@click.option("--recipe", "-r", required=True, type=click.Path(dir_okay=False), help="YAML recipe (see samples/recipes/).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory (must not exist).")
@click.option("--calib", type=click.Path(), help="Calibration data: .txt, .jsonl or image folder; overrides the recipe.")
@click.option("--dry-run", is_flag=True, help="Check the recipe, model config and data, print the plan, load nothing.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N for the passes.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
def compile_cmd(model, recipe, out, calib, dry_run, force, device, trust_remote_code):
    """Compile MODEL (a local Hugging Face directory or a hub id) with a recipe into --out:
    student/ (config, safetensors, tokenizer), onnx/ (one file per tower) and report.json."""
    from lmmc.compile import compile_model, plan
    from lmmc.recipe import load_recipe

    parsed = load_recipe(recipe, calib=calib)
    if dry_run:
        click.echo(json.dumps(plan(model, parsed, trust_remote_code), indent=2))
        return
    report = compile_model(model, parsed, Path(out), force=force, device=device,
                           trust_remote_code=trust_remote_code)
    click.echo(summary_table(report))
    click.echo(f"wrote {out}/ (student/, onnx/, report.json)")


@main.command("passes")
def passes_cmd():
    """List the passes a recipe can use, with their parameters."""
    from lmmc.pipeline import load_passes

    for name, cls in sorted(load_passes().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name} [{cls.kind}]  {doc}")
        for field, info in cls.Config.model_fields.items():
            desc = f"  {info.description}" if info.description else ""
            click.echo(f"    {field} = {info.default!r}{desc}")


def summary_table(report: dict) -> str:
    """The result table printed after a compile."""
    rows = [("tower", "cosine", "min cos", "ORT diff", "teacher ms", "student ms", "speedup")]
    for name, t in report["validation"].get("towers", {}).items():
        lat = t.get("latency_ms", {})
        rows.append((name, f"{t['cosine_mean']:.4f}", f"{t['cosine_min']:.4f}",
                     f"{max(t['runtime_max_abs_diff'].values()):.1e}",
                     f"{lat.get('teacher', float('nan')):.1f}", f"{lat.get('student', float('nan')):.1f}",
                     f"{lat.get('speedup', float('nan')):.2f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    sp = report["sparsity"]
    task = report["validation"].get("task_metric")
    lines.append(f"sparsity of prunable weights: {sp['sparsity']:.1%}; parameters "
                 f"{report['parameters']['teacher']:,} -> {report['parameters']['student']:,}")
    if task:
        lines.append(f"{task['name']}: {task['value']:.3f}")
    lines.append("gates: " + ", ".join(f"{g['name']} {'ok' if g['passed'] else 'MISSED'}"
                                      for g in report["validation"].get("gates", [])))
    return "\n".join(lines)
