"""The `lmmc` command line."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path

import click

from lmmc import process_state
from lmmc.errors import EXIT_BAD_INPUT, EXIT_GATE, EXIT_INTERNAL, EXIT_INTERRUPTED, GateFailed, LmmcError, OutputWritten


def _default_sigterm_in_child() -> None:
    """A process forked while a command handles SIGTERM (a multiprocessing child: OpenVINO's telemetry sends
    from one) gets the default action back. Blocked in C, as in a resolver lock held at the fork, a Python
    handler never runs: the child ignored its parent's terminate(), and the parent waited for it at exit for
    ever, its output long written. Any Python handler: one forked while OpenVINO's conversion holds signals
    inherits the holding handler."""
    if callable(signal.getsignal(signal.SIGTERM)):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def _close_progress_bars() -> None:
    """An interrupted pass leaves its progress bar open, and its last line would follow the message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# What an interrupted command leaves as it was.
_UNWRITTEN = {"compile": "; the output directory was not written",
              "bench": "; nothing was saved, and an earlier bench JSON is as it was",
              "report": "; report.html was not written, and an earlier one is as it was"}


def _unraisable_unless_interrupt(previous):
    """An interrupt raised inside a finaliser is recorded and raised again at the next step: not the
    "Exception ignored" traceback Python prints for it."""
    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and process_state.INTERRUPTS):
            previous(unraisable)
    return hook


class _Group(click.Group):
    """Gives every outcome one line and one exit code: 0 success, 1 a missed gate, 2 bad input,
    3 an internal error (traceback in a log file), 130 interrupted (SIGINT or SIGTERM)."""

    def invoke(self, ctx):
        # kill, systemd, Kubernetes and SLURM send SIGTERM: every command stops as cleanly as on Ctrl-C.
        process_state.INTERRUPTS.clear()
        previous = signal.signal(signal.SIGTERM, process_state.interrupt)
        previous_int = signal.signal(signal.SIGINT, process_state.interrupt)
        previous_hook = sys.unraisablehook
        sys.unraisablehook = _unraisable_unless_interrupt(previous_hook)
        stopping = False
        try:
            return self._outcome(ctx)
        except SystemExit as done:
            stopping = done.code == EXIT_INTERRUPTED
            raise
        finally:
            # Stopping, its work saved: a supervisor's second SIGTERM during the slow interpreter exit must not
            # kill the process (143) before it exits 130. Ignored, not handled: Python resets its handlers to the
            # default as it finalises, but leaves an ignored signal ignored.
            signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping else previous)
            signal.signal(signal.SIGINT, previous_int)
            sys.unraisablehook = previous_hook

    def _outcome(self, ctx):
        if not sys.stderr.isatty():  # a log: a progress frame every 30 s, where a terminal's bar redraws 10 a second
            os.environ.setdefault("TQDM_MININTERVAL", "30")
            os.environ.setdefault("TQDM_MAXINTERVAL", "30")  # else its monitor redraws a stale frame every 10 s
        try:
            if not set(ctx.help_option_names) & set(ctx.args):  # a command's help reads under any locale
                _check_environment()
            return super().invoke(ctx)
        except LmmcError as err:
            _close_progress_bars()
            click.echo(f"error: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except GateFailed as err:
            _close_progress_bars()
            click.echo(f"validation gate missed: {err}", err=True)
            sys.exit(EXIT_GATE)
        except OutputWritten as err:
            _close_progress_bars()
            click.echo(str(err), err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt as err:
            _close_progress_bars()
            how = f" by {err.args[0]}" if err.args else ""
            click.echo(f"interrupted{how}{_UNWRITTEN.get(ctx.invoked_subcommand, '')}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # Whoever read lmmc's output went away (`lmmc ... | head`): not a bug, an interruption.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_INTERRUPTED)
        except SystemExit as done:
            # rich (NNCF's progress display) meets a broken pipe by pointing stdout at the null device and
            # exiting 1, which is lmmc's code for a missed gate; no lmmc command exits from inside itself
            if done.code == EXIT_GATE and _stdout_is_null():
                sys.exit(EXIT_INTERRUPTED)
            raise
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _peer_gone(err):
                # another rank of a torchrun job stopped (its own message says why) and took the group down
                click.echo(f"stopped: another rank of this torchrun job stopped first ({type(err).__name__}); "
                           f"its message says why", err=True)
                sys.exit(EXIT_INTERRUPTED)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                _close_progress_bars()  # a write into a temporary folder, or one a command does not plan for
                fix = ("free some space" if err.errno != errno.EFBIG else
                       "use a disk that takes files this large, or raise the file-size limit ('ulimit -f')")
                # a native library's write names no file: the temporary folder is the likely one
                what = f"'{err.filename}'" if err.filename else (f"a file (no name given: likely in the temporary "
                                                                 f"folder {tempfile.gettempdir()}, which TMPDIR moves)")
                click.echo(f"error: writing {what} failed ({err.strerror}); {fix}, then run the command again",
                           err=True)
                sys.exit(EXIT_BAD_INPUT)
            if _out_of_memory(err):
                _close_progress_bars()
                click.echo(f"error: out of memory ({_first_line(err)}); lower the recipe's batch sizes or sample "
                           f"counts (calibration, distill, validate.latency_batch, bench.batch), or run where more "
                           f"memory is free", err=True)
                sys.exit(EXIT_BAD_INPUT)
            log = _crash_log()
            where = f"the traceback is in {log}; please report it with that file" if log else \
                "the traceback is above (no temporary folder took a log); please report it"
            click.echo(f"internal error: {type(err).__name__}: {_first_line(err)}. This is a bug in lmmc, not in "
                       f"your input; {where}", err=True)
            sys.exit(EXIT_INTERNAL)


def _stdout_is_null() -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (OSError, ValueError, AttributeError):  # a stream without a file (a test runner's)
        return False


def _check_environment() -> None:
    """What every command needs of its process: a current directory (torch fails to import without one), a
    writable temporary folder (torch, the exporters and lmmc's own scratch files: without one, two tracebacks
    ended in the missed gate's exit code) and UTF-8 text I/O (recipes, data, paths and the quantisers' progress
    output are UTF-8; under a Latin-1 or ASCII locale they crashed midway or read names as mojibake)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise LmmcError("the current directory no longer exists (it was removed after this shell entered it); cd to "
                        "an existing directory and run the command again") from None
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        raise LmmcError("no writable temporary folder (TMPDIR, /tmp, /var/tmp): lmmc and the libraries it runs write "
                        "their scratch files there; set TMPDIR to a writable folder") from None
    import locale

    encodings = {sys.getfilesystemencoding(), locale.getpreferredencoding(False)}
    if not sys.flags.utf8_mode and {e.lower().replace("_", "-") for e in encodings} - {"utf-8", "utf8"}:
        raise LmmcError(f"this process reads and writes text as {' and '.join(sorted(encodings))} (its locale), and "
                        f"lmmc's recipes, data, file names and outputs are UTF-8; run it in Python's UTF-8 mode "
                        f"(PYTHONUTF8=1) or under a UTF-8 locale (e.g. LC_ALL=C.UTF-8)")


def _first_line(err: Exception) -> str:
    """An error's first line: native libraries append pages of stack frames, which belong in the log."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]  # a bare MemoryError says nothing


def _out_of_memory(err: Exception) -> bool:
    """An allocation the machine could not serve (Python's, numpy's, or PyTorch's on the CPU or a GPU)."""
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


def _peer_gone(err: Exception) -> bool:
    """A collective that failed because a peer process went away (gloo or NCCL lost its connection)."""
    import torch.distributed as dist

    return isinstance(err, dist.DistError) or any(s in str(err) for s in ("Connection closed by peer",
                                                                          "Connection reset by peer"))


def _crash_log() -> Path | None:
    """Write the current traceback to a log file in the system temp directory (never into --out); where no
    temporary folder takes it, print it instead and return None."""
    text = f"lmmc {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}"
    try:
        path = Path(tempfile.gettempdir()) / f"lmmc-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        # an argument may hold bytes that are not UTF-8 (a path's name): written escaped, not a second crash
        path.write_text(text, encoding="utf-8", errors="backslashreplace")
        return path
    except OSError:
        click.echo(text, err=True)
        return None


_NOT_UTF8 = ("which is not UTF-8 text, and lmmc writes its paths into UTF-8 files (ONNX, report, manifest); rename "
             "it, or the folder holding it, in UTF-8")


def non_utf8(path: str) -> str | None:
    """The first byte of `path` that is not UTF-8 text (Python holds such a byte of a name as an escaped
    surrogate), or None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{ord(err.object[err.start]) & 0xFF:#04x}"
    return None


class _Path(click.Path):
    """A path option or argument; an empty one, which would read as the current directory, is refused."""

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("is an empty path, which would read as the current directory; give a real path", param, ctx)
        bad = non_utf8(os.path.abspath(value)) if isinstance(value, str) else None
        if bad is not None:
            self.fail(f"'{os.path.abspath(value)}' holds the byte {bad}, {_NOT_UTF8}", param, ctx)
        return super().convert(value, param, ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lmmc")
def main() -> None:
    """lmmc compiles a Hugging Face transformer (BERT-family, MPNet, ModernBERT, ViT, CLIP, SigLIP, LLaVA,
    Idefics3, BLIP-2) into a smaller student, exports it to ONNX and validates it against the original (the teacher).

    \b
    A compile is described by a YAML recipe:
      model: MODEL when the command line gives none
      calibration: {path: data.txt, samples: 128, eval_samples: 64}
      passes:  [{wanda: {sparsity: 0.5}}]          # compression, in order
      export:  [onnx]                              # export targets
      validate: {min_cosine: 0.8}                  # gates (on by default; 'validate: false' = off)

    \b
    Start with:  lmmc compile MODEL --recipe samples/recipes/minilm-wanda50.yaml --out out --dry-run
    List passes: lmmc passes
    """


@main.command("compile")
@click.argument("model", required=False)
@click.option("--recipe", "-r", required=True, type=_Path(dir_okay=False), help="YAML recipe (see samples/recipes/).")
@click.option("--out", "-o", required=True, type=_Path(file_okay=False), help="Output directory: new, or an earlier lmmc output with --force.")
@click.option("--calib", type=_Path(), help="Calibration data: .txt, .jsonl or image folder; overrides the recipe.")
@click.option("--dry-run", is_flag=True, help="Check the recipe, model config and data, print the plan, load nothing.")
@click.option("--force", is_flag=True, help="Replace --out if it is an earlier lmmc output, or fill it if it is empty (never anything else).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N for the passes.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model (off by default).")
@click.option("--resume", is_flag=True, help="Continue a killed compile to the same --out from its last finished "
              "pass (same model, recipe and data).")
def compile_cmd(model, recipe, out, calib, dry_run, force, device, trust_remote_code, resume):
    """Compile MODEL (a local Hugging Face directory or a hub id; default: the recipe's model) with a recipe into --out:
    student/ (config, safetensors, tokenizer), the recipe's exports (by default onnx/, one file per tower) and
    report.json."""
    from lmmc.compile import check_output, compile_model, plan, resolve_device
    from lmmc.recipe import load_recipe

    parsed = load_recipe(recipe, calib=calib, model_given=model is not None)
    if model == "":
        raise LmmcError("MODEL is an empty path, which would read as the current directory; give the model's "
                        "directory or hub id")
    if model is None:
        if parsed.model is None:
            raise LmmcError("no MODEL to compile: give it on the command line (lmmc compile MODEL -r RECIPE -o OUT), "
                            "or as 'model:' in the recipe")
        model = parsed.model
    local = os.path.abspath(os.path.expanduser(model)) if os.path.exists(os.path.expanduser(model)) else model
    if non_utf8(local) is not None:
        raise LmmcError(f"MODEL '{local}' holds the byte {non_utf8(local)}, {_NOT_UTF8}")
    if resume:
        from lmmc.resume import WorkArea

        WorkArea(Path(os.path.expanduser(out))).check_model_there(model)
    if dry_run:
        target = check_output(Path(out), model, parsed, recipe, force)
        resolve_device(device)
        the_plan = plan(model, parsed, trust_remote_code)
        from lmmc.resume import WorkArea, describe_inputs

        WorkArea(target).check_claim(describe_inputs(model, parsed) if resume else None, resume)
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank plans; one prints
            click.echo(json.dumps(the_plan, indent=2))
            _warn(the_plan["warnings"])
        return
    try:
        report = compile_model(model, parsed, Path(out), force=force, device=device,
                               trust_remote_code=trust_remote_code, recipe_path=recipe, resume=resume)
    except GateFailed as err:
        if os.environ.get("RANK", "0") == "0":  # rank 0 prints the result and writes the output
            if err.report is not None:  # the figures behind the missed gate
                click.echo(summary_table(err.report))
                _warn(err.report["warnings"])
            click.echo(f"wrote {_written(Path(out))}", err=True)
        raise
    rank = os.environ.get("RANK", "0")
    if rank != "0":  # rank 0 prints the result and writes the output
        click.echo(f"rank {rank}: finished; rank 0 wrote {_written(Path(out))}")
        return
    click.echo(summary_table(report))
    _warn(report["warnings"])
    if not report["validated"] and not parsed.validated:  # a skipped validation is among the warnings
        click.echo("not validated: the recipe switched validation off ('validate: false'); the student was not "
                   "compared with the teacher", err=True)
    click.echo(f"wrote {_written(Path(out))}")
    if parsed.bench is not None:
        from lmmc.bench import NotSaved, bench, format_table

        try:
            result = bench(Path(out), parsed.bench)
        except NotSaved as err:
            click.echo(format_table(err.result))
            raise
        except KeyboardInterrupt as err:
            how = f" by {err.args[0]}" if err.args else ""
            raise OutputWritten(f"interrupted{how} during the bench; the compile's output in '{out}' is complete: "
                                f"run 'lmmc bench {out}' to time it") from None
        _draw_report(Path(out))  # the page's latency plot then holds every backend bench timed
        click.echo(f"wrote {Path(out) / 'bench.json'}", err=True)
        click.echo(format_table(result))


def _warn(warnings: list[str]) -> None:
    for line in warnings:
        click.echo(f"warning: {line}", err=True)


def _written(out: Path) -> str:
    """The output directory and what it actually holds."""
    out = Path(os.path.expanduser(out))  # a quoted '~/out' was written to the home directory
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()) if out.is_dir() else []
    return f"{out}/ ({', '.join(entries)})"


@main.command("passes")
def passes_cmd():
    """List the passes a recipe can use, with their parameters, then the recipe's calibration and bench keys."""
    from lmmc.bench import BenchConfig
    from lmmc.pipeline import load_passes
    from lmmc.recipe import CalibrationConfig

    sections = [(name, f"[{cls.kind}]", cls.__doc__, cls.Config) for name, cls in sorted(load_passes().items())]
    sections += [("calibration", "[recipe section]", CalibrationConfig.__doc__, CalibrationConfig),
                 ("bench", "[recipe section]", BenchConfig.__doc__, BenchConfig)]
    for name, kind, doc, config in sections:
        summary = " ".join((doc or "").strip().split("\n\n")[0].split())  # the first paragraph, joined
        click.echo(f"{name} {kind}  {summary}")
        _echo_fields(config, "", 4)


# A field's bounds as pydantic keeps them (annotated_types' Ge, Gt, Le, Lt), as `lmmc passes` prints them.
BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _echo_fields(config: type, prefix: str, indent: int) -> None:
    """A config's fields, and under each the keys of any mapping it takes (int8's mixed, a target's
    speedup), by their dotted names."""
    from pydantic import BaseModel

    def nested(annotation: object) -> list[type]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in nested(arg)]

    for field, info in config.model_fields.items():
        bounds = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in BOUNDS if hasattr(m, attr)]
        desc = f"  {info.description}" if info.description else ""
        desc += f" ({', '.join(bounds)})" if bounds else ""
        default = "" if info.is_required() else f" = {info.default!r}"
        click.echo(f"{' ' * indent}{prefix}{field}{default}{desc}")
        for model in dict.fromkeys(nested(info.annotation)):
            _echo_fields(model, f"{prefix}{field}.", indent + 2)


def _fmt(value: float | None) -> str:
    return "n/a (NaN/Inf)" if value is None or value != value or abs(value) == float("inf") else f"{value:.3f}"


def _ms(ms: float) -> str:
    """Milliseconds to one decimal, or three significant digits below 1 ms (a tiny model's 0.04 ms read 0.0)."""
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.3g}"


def _tower_table(towers: dict) -> list[str]:
    """An encoder's validation per tower; nothing when no tower was validated."""
    if not towers:
        return []
    from lmmc.export.validate import scaled_diff

    rows = [("tower", "cosine", "min cos", "ORT diff", "teacher ms", "student ms", "speedup")]
    for name, t in towers.items():
        lat = t.get("latency_ms", {})  # absent when the recipe switched latency off ('-' in the table)
        rows.append((name, f"{t['cosine_mean']:.4f}", f"{t['cosine_min']:.4f}",
                     f"{scaled_diff(t['runtime_max_abs_diff'], t['runtime_output_scale']):.1e}",  # the gate's figure
                     _ms(lat["teacher"]) if "teacher" in lat else "-",
                     _ms(lat["student"]) if "student" in lat else "-",
                     f"{lat['speedup']:.2f}x" if "speedup" in lat else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    timed = next((t["latency_ms"] for t in towers.values() if t.get("latency_ms")), None)
    if timed:  # these columns are not the deployment a latency target is judged on; say what they time
        n = timed.get("threads")
        lines.append(f"(ms: teacher and student as fp32 ONNX in ONNX Runtime, {n} thread{'' if n == 1 else 's'})")
    return lines


def _target_line(lat: dict | None) -> list[str]:
    """A latency target's outcome on the runtime it names, which the tower table's fp32 ONNX timing is not."""
    if not lat:
        return []
    line = (f"latency target on {lat['deploy']}: student {lat['measured_ms']:.3g} ms against a target of "
            f"{lat['target_ms']:.3g} ms")
    if "speedup_target" in lat:
        line += (f"; speed-up {lat['speedup_measured']:.2f}x measured, {lat['speedup_target']:.2f}x asked "
                 f"(the teacher's fastest deployment there {lat['teacher_ms']:.3g} ms)")
    return [line]


def _generation_lines(g: dict | None) -> list[str]:
    """A generative model's fidelity to the teacher on the held-out samples; nothing when not validated."""
    if not g:
        return []
    lines = [f"generative fidelity on {g['held_out_samples']} held-out samples ({g['answer_tokens']} answer tokens): "
             f"next-token KL {_fmt(g['kl_mean'])} nats (max {_fmt(g['kl_max'])}), top-1 agreement "
             f"{_fmt(g['top1_agreement'])}, greedy agreement on the first {g['generation']['tokens']} tokens "
             f"{_fmt(g['generation']['agreement'])} (matching prefix {_fmt(g['generation']['prefix_mean'])} tokens)"]
    runtime = g.get("runtime")
    if runtime:
        lines.append(f"ONNX Runtime vs PyTorch student: greedy tokens identical {_fmt(runtime['greedy_identical'])}, "
                     f"first-step logits max abs diff {_sci(runtime['first_logits_max_abs_diff'])}")
    return lines


def _sci(value: float | None) -> str:
    return "n/a (NaN/Inf)" if value is None or value != value or abs(value) == float("inf") else f"{value:.1e}"


def _missed(gate: dict) -> str:
    """A missed gate with its figure, in the digits that tell it from its threshold (a cosine of 0.99998 that
    the table's four decimals show as 1.0000)."""
    from lmmc.report_html import gate_digits

    digits = gate_digits(gate.get("value"), gate.get("threshold"))
    value = format(gate["value"], digits) if isinstance(gate.get("value"), (int, float)) else gate.get("value")
    return f"{gate['name']} MISSED ({value}, needs {gate.get('op', '')} {gate.get('threshold')})"


def summary_table(report: dict) -> str:
    """The result table printed after a compile: per tower for an encoder, the generation figures for a
    generative model, then sparsity, FLOPs, the task metric and the gates."""
    lines = (_tower_table(report["validation"].get("towers") or {}) + _target_line(report["validation"].get("latency_target"))
             + _generation_lines(report["validation"].get("generation")))
    sp = report["sparsity"]
    task = report["validation"].get("task_metric")
    towers = sp.get("sparsity_per_tower") or {}
    per_tower = f" ({', '.join(f'{t} {v:.1%}' for t, v in towers.items())})" if len(towers) > 1 else ""
    lines.append(f"sparsity of prunable weights: {sp['sparsity']:.1%}{per_tower}; parameters "
                 f"{report['parameters']['teacher']:,} -> {report['parameters']['student']:,}")
    flops = report.get("flops") or {}
    if flops:
        kept = sum(f["student"] for f in flops.values()) / sum(f["teacher"] for f in flops.values())
        lines.append("FLOPs kept (transformer blocks, one sample): " + ", ".join(
            f"{name} {f['kept']:.1%} at {f['tokens']} tokens" for name, f in flops.items()) + f"; all {kept:.1%}")
    if task:
        lines.append(f"{task['name']}: student {_fmt(task['value'])}"
                     + (f", teacher {_fmt(task['teacher'])}" if "teacher" in task else ""))
    if report.get("validated", True):
        lines.append("gates: " + ", ".join(f"{g['name']} ok" if g["passed"] else _missed(g)
                                          for g in report["validation"].get("gates", [])))
    return "\n".join(lines)


@main.command("bench")
@click.argument("out_dir", type=_Path())
@click.option("--threads", type=int, help="Intra-op threads for every runtime (default: the recipe's).")
@click.option("--batch", type=int, help="Samples per timed batch (default: the recipe's latency_batch; a "
              "generative model's: 1).")
@click.option("--seq", type=int, help="Tokens per text sample (default: the recipe's latency_seq).")
@click.option("--repeats", type=int, help="Timed runs per candidate, in turns of one untimed run and three timed, "
              "rounded up to whole turns (default 15).")
@click.option("--warmup", type=int, help="Untimed rounds of turns first (default 1).")
@click.option("--json", "json_path", type=click.Path(), help="Where to save the result (default: OUT_DIR/bench.json).")
@click.option("--corpus", multiple=True, type=_Path(), help="Extra held-out corpus (.txt, .jsonl, image folder); repeatable.")
@click.option("--calib", type=_Path(), help="The compile's calibration data, if it moved since the compile.")
@click.option("--teacher", type=_Path(), help="The compile's teacher, if it moved since the compile.")
@click.option("--no-memory", is_flag=True, help="Skip peak memory (one fresh process per candidate).")
@click.option("--quick", is_flag=True, help="A smoke run: 1 warm-up round and 3 timed runs (unless --warmup or "
              "--repeats say otherwise), no memory.")
@click.option("--static", is_flag=True, help="Also run every OpenVINO IR, the teacher's and the student's, compiled "
              "for the timed shape (batch x seq): faster where inputs are always padded to one shape.")
@click.option("--trust-remote-code", is_flag=True, help="Read a teacher tokenizer or processor that ships its own "
              "code, as the compile did with --trust-remote-code.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, or cuda / cuda:N: ONNX Runtime's CUDA provider (needs onnxruntime-gpu) and PyTorch on the GPU.")
@click.option("--teacher-cache", type=_Path(), help="Keep the teacher's deployments (ONNX exports, INT8 graphs, IRs) "
              "in this folder and reuse them in later benches of the same teacher, calibration data, runtimes and "
              "device: building them takes most of a short bench.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
              help="Bench only this runtime's deployments, the teacher's and the student's (repeatable; the teacher "
              "in PyTorch eager is always timed). Fewer deployments are held at once, and the teacher's others are "
              "not built. Default: every runtime.")
def bench_cmd(out_dir, threads, batch, seq, repeats, warmup, json_path, corpus, calib, teacher, no_memory, quick,
              static, trust_remote_code, device, teacher_cache, backends):
    """Time every student artifact in OUT_DIR against the teacher deployed in PyTorch, ONNX Runtime (fp32,
    fused, INT8) and OpenVINO (fp32, NNCF INT8), interleaved in one run; print the table, save JSON. A generative
    model's greedy generation is timed in PyTorch and ONNX Runtime, the teacher's and the student's."""
    from pydantic import ValidationError

    from lmmc.bench import BenchConfig, NotSaved, bench, format_table

    if quick:
        repeats, warmup, no_memory = 3 if repeats is None else repeats, 1 if warmup is None else warmup, True
    given = {"threads": threads, "batch": batch, "seq": seq, "repeats": repeats, "warmup": warmup,
             "calib": Path(calib) if calib else None, "teacher": Path(teacher) if teacher else None, "device": device,
             "teacher_cache": Path(teacher_cache) if teacher_cache else None,
             "backends": tuple(dict.fromkeys(backends)) or None}
    try:
        cfg = BenchConfig(**{k: v for k, v in given.items() if v is not None}, memory=not no_memory,
                          static=static, corpora=tuple(Path(c) for c in corpus), trust_remote_code=trust_remote_code)
    except ValidationError as err:
        raise LmmcError("bad option: " + "; ".join(f"--{e['loc'][0]} {e['msg']}" for e in err.errors())) from None
    if json_path is not None and not json_path.strip():
        raise LmmcError("--json is an empty path; give the file to save the result to, or leave --json out for "
                        "OUT_DIR/bench.json")
    if json_path is not None and os.path.isdir(json_path):
        raise LmmcError(f"--json '{json_path}' is a folder; give the path of a file, such as "
                        f"'{os.path.join(json_path, 'bench.json')}'")
    try:
        result = bench(Path(out_dir), cfg, Path(json_path) if json_path else None)
    except NotSaved as err:
        click.echo(format_table(err.result))  # the run's figures, then the one error saying why they are not saved
        raise
    click.echo(f"wrote {json_path or Path(out_dir) / 'bench.json'}", err=True)
    click.echo(format_table(result))  # the comparison that matters is its last line


@main.command("report")
@click.argument("out_dir", type=_Path())
def report_cmd(out_dir):
    """Draw OUT_DIR/report.html again from OUT_DIR/report.json, with lmmc bench's latencies when OUT_DIR
    holds bench.json."""
    click.echo(f"wrote {_draw_report(Path(out_dir))}")


def _draw_report(out_dir: Path) -> Path:
    """report.html drawn again; a page that cannot be written is the user's to fix (exit 2), not a bug."""
    from lmmc.report_html import read_bench, write_report_html

    try:
        page = write_report_html(out_dir)
        problem = read_bench(out_dir)[1]
        if problem:
            click.echo(f"warning: {problem}", err=True)
        return page
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        why = ("the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "the file is too large for the "
               "disk or the file-size limit ('ulimit -f')" if err.errno == errno.EFBIG else "it is not writable")
        raise LmmcError(f"cannot write '{out_dir / 'report.html'}': {why} ({err.strerror}); free some space or "
                        f"fix the permissions, then run 'lmmc report {out_dir}'") from None


def run() -> None:
    """The `lmmc` command. Once a command has ended, its work saved and its exit code decided, the process
    ignores SIGTERM through the slow interpreter exit: a supervisor's SIGTERM there turned a finished compile's
    0 into 143."""
    try:
        main()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
