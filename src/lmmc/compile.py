"""The compile driver: check everything it can before loading weights, run the passes, and move the
complete output into place only at the end."""

from __future__ import annotations

import array
import errno
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import lmmc
from lmmc import process_state
from lmmc.adapters import TRACE_TOKENS, TowerModule, head_dim, prunable_linears, tower_config
from lmmc.artifact import Artifact
from lmmc.bench import check_backends, check_seq, corpus_batches, finite, is_bench_json, timing_seq
from lmmc.bench_generative import check_generative_bench, read_corpus_records
from lmmc.blockwise import capture_block_inputs
from lmmc.cost import blocks_cost
from lmmc.data import (DEFAULT_MAX_LENGTH, CalibData, answer_end, check_answers, check_generation_room,
                       check_generative_records, check_held_out_classes, check_images, check_prompts,
                       check_random_allowed, drop_token_twins, encode_text, generative_limits, load_calibration,
                       load_generative_calibration, random_calibration, random_generative_calibration, read_corpus,
                       read_samples, select, text_key, text_length, text_tokens)
from lmmc.errors import GateFailed, LmmcError, OutputWritten
from lmmc.manifest import write_manifest
from lmmc.modelio import (check_hub_weights, check_preprocessor, check_weights, hub_cache,
                          load_preprocessor, load_teacher, local_dir, make_student, meta_model,
                          offline_if_unreachable, resolve_config, save_student, text_pad_length, text_positions,
                          text_truncation)
from lmmc.pipeline import run_pass
from lmmc.pooling import normalises, read_modules, st_text_cut
from lmmc.recipe import Recipe
from lmmc.report_html import gate_digits, is_ours, is_unedited, write_report_html
from lmmc.resume import REPLACED_DIR, WorkArea, describe_inputs, hash_files, pass_seed
from lmmc.runtime import FILE_LIST, file_list
from lmmc.runtime.texts import clip_texts
from lmmc.sparsity import sparsity_summary
from lmmc.timing import check_threads_start, usable_cpus
from lmmc.train import barrier, setup_distributed

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Write failures that the user fixes (free space, permissions), not bugs: said in one line, exit 2.
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# A file over the filesystem's limit (4 GiB on FAT32) or the process's (ulimit -f).
_TOO_LARGE = {errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
# An INT8 or fp16 artifact whose worst token state falls below this cosine to the fp32 student's is warned of:
# MiniLM's INT8 artifacts keep more than 0.9 on every token; on a tiny BERT with outlier features, whose pooled
# embeddings kept 0.999, tokens fell to 0.71 (fp16) and to -0.93 (INT8).
MIN_TOKEN_COSINE = 0.8
# ... and one whose worst short text (a held-out text's opening words) falls below this: the MiniLM teacher's INT8
# artifacts, calibrated on 256 sentences of samples/calib/general_en.txt, keep 0.943 (ORT static) to 0.977 (NNCF).
MIN_SHORT_COSINE = 0.9


def resolve_device(name: str) -> torch.device:
    if not _DEVICE.fullmatch(name):
        raise LmmcError(f"unknown --device '{name}'; use auto, cpu, cuda or cuda:N (N = GPU index)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmmcError(f"--device {name} asked for a GPU, but torch sees none; use --device cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise LmmcError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0; "
                            f"use one of them or --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmmcError("--device mps asked for Apple's GPU, but torch sees none; use --device cpu")
    return torch.device(name)


# FILE_LIST: every file and directory a compile put in its output, each file with the digest of the bytes
# written, written last; --force replaces an earlier output only while it holds nothing else and none of those
# files was edited since (`lmmc bench` and `lmmc report` add or rewrite the files of _LATER).
_LATER = {"report.html", "bench.json", FILE_LIST}
# What a compile (and `lmmc bench` / `lmmc report` on its output) writes at the top of --out.
_OUTPUT_ENTRIES = {"student", "onnx", "ort", "openvino", "tensorrt", "latency-model", "allocation.png",
                   "manifest.json", "report.json", *_LATER}
# bench's and report's files being written; a compile's output being copied into a volume --out, and the
# earlier output moved aside there
_PARTIAL = re.compile(r"\.(report\.html|bench\.json)\.tmp-\d+|\.lmmc-(incoming|replaced)-\d+")
# lmmc bench's and lmmc report's files, each known as theirs as those commands know them
_ADDED = {"bench.json": is_bench_json, "report.html": is_ours}
# those files as lmmc rewrote them, unedited since
_REDRAWN = {"bench.json": is_bench_json, "report.html": is_unedited}


def _entries(root: Path) -> list[str]:
    """Every file, directory and link under `root` (links not followed), as paths relative to it."""
    found = []
    for folder, dirs, files in os.walk(root):
        found += [(Path(folder) / name).relative_to(root).as_posix() for name in [*dirs, *files]]
    return sorted(found)


def _foreign(path: Path) -> list[str]:
    """What `path` holds that lmmc did not write there: top-level names no lmmc command writes, then, in an
    output that lists its files, anything the list does not name and every link (lmmc writes none)."""
    top = sorted(p.name for p in _own_entries(path) if (p.name not in _OUTPUT_ENTRIES and not _PARTIAL.fullmatch(p.name))
                 or (p.name in _ADDED and not _ADDED[p.name](p)))
    if top:
        return top
    digests = file_list(path)
    if digests is None:
        return []  # no list: _is_lmmc_output says so
    kept = {p.name for p in path.iterdir()} - {p.name for p in _own_entries(path)}
    return [rel for rel in _entries(path) if rel.split("/")[0] not in kept and ((path / rel).is_symlink()
            or (rel not in digests and rel not in _LATER and not _PARTIAL.fullmatch(rel.split("/")[0]))
            # a folder lmmc wrote, now a file under its name (or a list that calls a file a folder)
            or (rel in digests and digests[rel] is None and not (path / rel).is_dir())
            # a file the user edited holds their bytes under lmmc's name; lmmc report redraws its page with
            # bench's figures, and lmmc bench rewrites its own file, each carrying its own digest
            or (isinstance(digests.get(rel), str) and (path / rel).is_file() and hash_files(path / rel) != digests[rel]
                and not (rel in _REDRAWN and _REDRAWN[rel](path / rel))))]


def _file_list(root: Path) -> dict[str, str | None]:
    """What FILE_LIST holds: every entry under `root`, each file with its SHA-256 (a directory: None)."""
    return {rel: None if (root / rel).is_dir() else hash_files(root / rel) for rel in _entries(root)}


def _holds_output(path: Path) -> bool:
    """Whether `path` holds more than what a killed lmmc command left half-written."""
    return any(not _PARTIAL.fullmatch(p.name) for p in _own_entries(path))


def _own_entries(path: Path) -> list[Path]:
    """The entries of `path` that an output may hold: all but a volume's lost+found, which its filesystem
    made and keeps (an ext4 volume mounted at --out, as Kubernetes mounts one)."""
    volume = is_mount(path)
    return [p for p in path.iterdir() if not (volume and p.name == "lost+found" and p.is_dir())]


def _is_lmmc_output(path: Path) -> bool:
    """Holds the list of files a compile wrote and nothing beyond it (a file the user added inside
    student/ too), and student/lmmc.json or a report.json that lmmc wrote (another tool's report.json is
    no proof)."""
    if _foreign(path) or file_list(path) is None:
        return False
    if (path / "student" / "lmmc.json").is_file():
        return True
    try:
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and "lmmc_version" in report


class OutputTaken(LmmcError):
    """--out was created or replaced by someone else while the compile ran; the finished work is kept."""


def _taken(target: Path, force: bool) -> bool:
    """Whether `target` holds what this compile may not replace: a link, a file, or a directory that is
    not an earlier lmmc output (without --force, any directory: it did not exist when the compile began)."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return True
    if not target.exists():
        return False
    return not force or (_holds_output(target) and not _is_lmmc_output(target))


def _inputs(model_ref: str, recipe: Recipe, recipe_path: str | Path | None) -> list[tuple[str, Path]]:
    """Every file or directory a compile reads, which an output must never replace."""
    found = [("the current directory", Path.cwd().resolve())]
    model = local_dir(model_ref)
    if model:
        found.append(("the model directory", model))
    elif (cached := hub_cache(model_ref)) is not None:
        found.append(("the model's hub cache", cached))
    if recipe_path:
        found.append(("the recipe", Path(recipe_path).resolve()))
    if recipe.calibration.path:
        found.append(("the calibration data", Path(recipe.calibration.path).resolve()))
    for name, cfg in _step_configs(recipe):
        for corpus in cfg.corpus_paths() if hasattr(cfg, "corpus_paths") else []:
            found.append((f"the corpus of '{name}'", corpus.resolve()))
    return found


# The longest file name most file systems take, in bytes (ext4, xfs, btrfs, tmpfs).
NAME_MAX = 255


def check_output(out: Path, model_ref: str, recipe: Recipe, recipe_path: str | Path | None = None,
                 force: bool = False) -> Path:
    """Refuse, touching nothing, an --out that would destroy what lmmc did not write; return it resolved.

    The output may not be, contain or sit inside anything the compile reads (the model, the recipe,
    the data), may not be or contain the current directory, and --force replaces only an earlier lmmc
    output. The location must be writable now, before minutes of work."""
    out = Path(os.path.expanduser(out))
    name = len(os.fsencode(out.name))
    if name > NAME_MAX - len(".lmmc-work") - 1:  # the work area beside it is .NAME.lmmc-work
        raise LmmcError(f"--out's name is {name} bytes long, and lmmc keeps its work beside it in "
                        f"'.<name>.lmmc-work', which must fit the file system's {NAME_MAX}-byte names; give --out a "
                        f"name of at most {NAME_MAX - len('.lmmc-work') - 1} bytes")
    try:
        out.resolve(strict=False).exists()
    except OSError as err:
        raise LmmcError(f"--out '{out}' cannot be used: {err.strerror}; give a shorter path") from None
    if out.is_symlink():
        raise LmmcError(f"--out '{out}' is a symbolic link (to {os.readlink(out)}); give the real directory, "
                        f"lmmc does not replace links or what they point to")
    target = out.resolve()
    for what, path in _inputs(model_ref, recipe, recipe_path):
        if target == path or target in path.parents:
            verb = "is" if target == path else "contains"
            raise LmmcError(f"--out '{out}' {verb} {what} ({path}); writing there would destroy it. Choose an "
                            f"output directory of its own, e.g. --out {path / 'lmmc-out'}"
                            if what == "the current directory" else
                            f"--out '{out}' {verb} {what} ({path}); writing there would destroy it. Choose a "
                            f"new directory elsewhere for --out")
        if path in target.parents and what != "the current directory" and path.is_dir():
            raise LmmcError(f"--out '{out}' sits inside {what} ({path}); lmmc does not write into its inputs. "
                            f"Choose a new directory outside it for --out")
    if target.exists():
        if not target.is_dir():
            raise LmmcError(f"--out '{out}' is a file; give a directory path that does not exist yet")
        if not force:
            raise LmmcError(f"output directory '{out}' already exists; choose another --out or pass --force to "
                            f"replace it")
        if _holds_output(target) and not _is_lmmc_output(target):
            foreign, digests = _foreign(target), file_list(target) or {}
            edited = [rel for rel in foreign if isinstance(digests.get(rel), str)]
            added = [rel for rel in foreign if rel not in edited]
            parts = [f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}, {what}" for names, what in
                     ((added, "which lmmc did not write"), (edited, "which lmmc wrote and which was changed since"))
                     if names]
            marked = (target / "report.json").is_file() or (target / "student" / "lmmc.json").is_file()
            holds = f" (it holds {'; and '.join(parts)})" if foreign else f" (it has no {FILE_LIST} with the digests " \
                    f"of the files a compile wrote, so files added to it or edited cannot be told apart: an output " \
                    f"of an older lmmc)" if marked else ""
            raise LmmcError(f"--force replaces only an earlier lmmc output (a directory with report.json or "
                            f"student/lmmc.json), and '{out}' is not one{holds}; it was left untouched. Choose a new "
                            f"--out, or move that directory away yourself")
    _check_side_paths(target, model_ref, recipe, recipe_path)
    _check_writable(target)
    if target.is_dir():  # filled in place, or (an earlier output) moved aside, which a directory's mode also bars
        _check_writable(target / ".lmmc-write-probe")
        _check_removable(target)
    return target


_FS_IOC_GETFLAGS = 0x80086601  # Linux's ioctl reading a file's attributes (lsattr)
_KEPT_BY_ATTRIBUTE = ((0x10, "immutable", "i"), (0x20, "append-only", "a"))


def _check_removable(out: Path) -> None:
    """Every entry of an earlier output that --force replaces can be removed. One the file system keeps
    (immutable or append-only, `chattr +i`) or in a folder this user may not write was found only after
    the compile, which then left it in the work area and that area in the way of the next compile."""
    for path in [out, *out.rglob("*")]:
        if path.is_symlink():
            continue  # the foreign-file check refuses links inside an output
        if path != out and not os.access(path.parent, os.W_OK | os.X_OK):
            why, fix = f"its folder '{path.parent}' is not writable", f"chmod u+w '{path.parent}'"
        else:
            kept = [(name, letter) for flag, name, letter in _KEPT_BY_ATTRIBUTE if _attributes(path) & flag]
            if not kept:
                continue
            why = f"the file system keeps it ({' and '.join(name for name, _ in kept)})"
            fix = f"chattr -{''.join(letter for _, letter in kept)} '{path}'"
        raise LmmcError(f"--force would replace '{out}', but '{path}' cannot be removed: {why}. It was left untouched; "
                        f"make it removable ({fix}), or choose another --out")


def _attributes(path: Path) -> int:
    """A file's Linux attribute flags, 0 where it cannot be opened or its file system has none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        return flags[0]
    except OSError:
        return 0
    finally:
        os.close(fd)


def _check_side_paths(target: Path, model_ref: str, recipe: Recipe, recipe_path: str | Path | None) -> None:
    """Folders a pass writes beside the output (distill's checkpoint_dir, antgmm's latency_cache) may not
    sit inside --out, which is only put in place at the end, nor inside an input, whose files --resume
    checks for changes."""
    inputs = [(what, path) for what, path in _inputs(model_ref, recipe, recipe_path)
              if what != "the current directory"]
    for name, cfg in _step_configs(recipe):
        for key in ("checkpoint_dir", "latency_cache"):
            value = getattr(cfg, key, None)
            if not value:
                continue
            path = Path(os.path.expanduser(value)).resolve()
            if path == target or target in path.parents:
                raise LmmcError(f"'{name}' writes its {key} '{value}' inside --out '{target}', which lmmc writes "
                                f"elsewhere and moves into place only when the compile ends; give a {key} outside "
                                f"--out")
            for what, inp in inputs:
                if path == inp or inp in path.parents:
                    raise LmmcError(f"'{name}' writes its {key} '{value}' inside {what} ({inp}); lmmc does not "
                                    f"write into its inputs (and --resume would find them changed). Give a {key} "
                                    f"outside it")
            existing = path
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir():
                raise LmmcError(f"'{name}' writes its {key} '{value}' into a directory, but '{existing}' is a file; "
                                f"give a {key} that is a directory, or a new one")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise LmmcError(f"'{name}' cannot write its {key} '{value}': '{existing}' is not writable; give a "
                                f"{key} on a writable disk, or fix the permissions")


def _check_writable(target: Path) -> None:
    """Create and remove a probe file where the output's first new directory will go."""
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LmmcError(f"cannot create --out '{target}': '{parent}' is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".lmmc-write-probe-"):
            pass
    except OSError as err:
        raise LmmcError(f"cannot write the output: '{parent}' is not writable ({err.strerror}); choose an --out "
                        f"on a writable disk, or fix the permissions") from None


def plan(model_ref: str, recipe: Recipe, trust_remote_code: bool = False) -> dict[str, Any]:
    """Everything checkable without loading weights: the model's config, weight headers and
    preprocessors, every sequence length against the model's positions, the data and how it splits,
    the pass order and what each pass can do to this model. Returns the plan, with its warnings."""
    offline = offline_if_unreachable(model_ref)
    config, adapter = resolve_config(model_ref, trust_remote_code)
    if recipe.calibration.chat_template and adapter.kind != "generative":
        raise LmmcError(f"calibration.chat_template: true applies to generative models, and '{model_ref}' is a "
                        f"{adapter.family} encoder that reads plain text; remove calibration.chat_template")
    model_dir = local_dir(model_ref)
    shapes = meta_model(config, adapter, trust_remote_code)
    if model_dir:
        check_weights(model_dir, shapes, adapter)
    else:
        check_hub_weights(model_ref, shapes, adapter)
    preprocessors = load_preprocessor(str(model_dir or model_ref), adapter.kind == "generative", trust_remote_code)
    check_preprocessor(model_ref, config, adapter, preprocessors, recipe.calibration.chat_template)
    # A sentence-transformers module lmmc cannot carry is refused now.
    modules = read_modules(str(model_dir or model_ref)) if adapter.sentence_pooling else None
    if modules is not None:  # as load_teacher keeps them: text_truncation reads its sentence_bert_config.json
        preprocessors["sentence_modules"] = modules
    warnings: list[str] = ([offline] if offline else []) + ([] if modules is None else list(modules.warnings))
    warnings += _cut_past_positions(config, adapter, modules)
    declared = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    if declared in ("float16", "bfloat16"):
        warnings.append(f"'{model_ref}' holds {declared} weights: lmmc computes teacher and student in float32 and "
                        f"saves the student's weights in float32, twice the checkpoint's bytes per weight (its "
                        f"ONNX and OpenVINO exports too, unless the recipe quantises them)")
    if getattr(config, "auto_map", None) and not trust_remote_code:
        warnings.append(f"'{model_ref}' ships code of its own (auto_map in config.json), which lmmc does not run "
                        f"without --trust-remote-code: it is compiled as transformers' built-in "
                        f"{config.model_type}, which may compute something else than that code, and the student's "
                        f"config no longer names it")
    recipe.check_towers(adapter.family, [t.name for t in adapter.towers])
    recipe.check_gates(adapter.family, adapter.kind)
    _check_lengths(config, adapter, recipe)
    _check_shared_space(config, adapter)
    _check_runnable(config)
    _check_target(adapter, recipe)
    _check_norm_gate(modules.normalize if modules is not None else normalises(config), recipe)
    _check_bench(recipe, adapter, config, preprocessors)  # before the data: its static IRs' length is checked on them
    counts, calib_texts = _check_data(config, adapter, recipe, warnings, shapes, preprocessors)
    _check_distill_samples(recipe, config, adapter, counts, preprocessors)
    _check_nm(recipe, shapes, adapter, warnings)
    _check_threads(recipe)
    warnings += _oversubscribed(recipe)
    _check_scoring(recipe, shapes, adapter, counts)
    _check_engine_profile(recipe, config, adapter, counts)
    exported = any(s.name == "onnx_generative" for s in recipe.export)
    warnings += [f"{s.kind} step '{s.name}' skipped: it does not handle generative models ({adapter.family}) yet"
                 + ("" if exported else "; the student is saved unexported and unvalidated")
                 for s in recipe.steps() if skipped(adapter, s)]
    unchanged_depth = True
    for step in [*recipe.passes, *recipe.export]:  # what a step asks of this model, refused before anything runs
        if step.name == "distill":
            step.config.check_model(adapter, config, unchanged_depth)
        elif hasattr(step.config, "check_model"):
            step.config.check_model(adapter, config)
        if step.name == "antgmm" and step.config.distill is not None:
            # its first distillation runs at the depth the pass starts from (a fading block is still there)
            try:
                step.config.distill_config().check_model(adapter, config, unchanged_depth)
            except LmmcError as err:
                raise LmmcError(f"antgmm.distill: {str(err).removeprefix('distill: ')}") from None
        unchanged_depth = unchanged_depth and step.name != "antgmm"
    _check_keep(recipe, config, adapter, shapes, preprocessors, calib_texts)
    warnings += _ungated_fidelity(recipe, adapter.kind) + _unfusable_opset(recipe)
    return {
        "model": model_ref,
        "adapter": adapter.family,
        "towers": [f"{t.name} ({t.modality})" for t in adapter.towers],
        "calibration": recipe.calibration.path or ("random" if recipe.calibration.random else None),
        "samples": counts,
        "steps": _planned_steps(recipe),
        "validated": recipe.validated,
        "bench": recipe.bench.model_dump(mode="json") if recipe.bench is not None else None,
        "warnings": warnings,
    }


def _planned_steps(recipe: Recipe) -> list[dict[str, Any]]:
    """Each step with its configuration; a local pruner after an allocation shows where its sparsity
    comes from, not the default it ignores."""
    steps, allocation = [], None
    for s in recipe.steps():
        config = s.config.model_dump(mode="json")
        if "allocation" in s.provides:
            allocation = s.name
        elif "masks" in s.provides and allocation is not None and "sparsity" in config:
            config["sparsity"] = f"per matrix, from {allocation}"  # every later pruner applies it too
        steps.append({"pass": s.name, "kind": s.kind, "config": config, "needs": sorted(s.needs),
                      "provides": sorted(s.provides)})
    return steps


def skipped(adapter: Any, step: Any) -> bool:
    """Whether the compile skips `step`: exports and checks written for encoders would trace or compare
    the wrong outputs of a generative model, so only those whose pass says `generative = True` run."""
    return adapter.kind == "generative" and step.kind != "compress" and not getattr(step, "generative", False)


def _check_bench(recipe: Recipe, adapter: Any, config: Any, preprocessors: dict[str, Any]) -> None:
    """The recipe's bench runs after the output is written: refuse now what it would refuse then."""
    if recipe.bench is None:
        return
    for corpus in recipe.bench.corpora:
        if not corpus.exists():
            raise LmmcError(f"bench.corpora: '{corpus}' does not exist; give a .txt, .jsonl or image folder "
                            f"(relative paths are resolved against the recipe's directory)")
    if adapter.kind == "generative":
        check_generative_bench(recipe.bench, "bench.")
        from lmmc.export.validate import ValidateConfig

        least = (recipe.validate_.config if recipe.validate_ else ValidateConfig()).min_held_out
        for corpus in recipe.bench.corpora:
            records = read_corpus_records(corpus, preprocessors["processor"], recipe.calibration.chat_template,
                                          "bench.corpora")
            if len(records) < least:
                raise LmmcError(f"bench.corpora: '{corpus}' holds {len(records)} image-text record(s), fewer than "
                                f"validate.min_held_out ({least}), too few to judge on; give a corpus with more")
        return
    check_backends(recipe.bench.device, recipe.bench.backends, "bench.backends:")
    check_seq(recipe.bench.seq, config, adapter, "this model", "bench.seq")


def _check_engine_profile(recipe: Recipe, config: Any, adapter: Any, counts: dict[str, int] | None) -> None:
    """Validation runs each TensorRT engine on the held-out batches, which must lie inside the engine's
    profile; the engine refused them only after every pass and every build."""
    step = next((s for s in recipe.export if s.name == "tensorrt"), None)
    if step is None or recipe.validate_ is None or not counts or adapter.kind == "generative":
        return
    batch, held_out, profile = recipe.calibration.batch_size, counts["held_out"], step.config.batch
    sizes = {min(batch, held_out), held_out % batch or batch}
    if max(sizes) > profile.max or min(sizes) < profile.min:
        raise LmmcError(f"tensorrt.batch takes {profile.min} to {profile.max} samples, and validation runs the engines "
                        f"on the {held_out} held-out samples in batches of {sorted(sizes, reverse=True)} "
                        f"(calibration.batch_size = {batch}); widen tensorrt.batch or change calibration.batch_size")


def _widest(tokenizer: Any, held_out: list[dict[str, Any]], length: int, pad_to: int | None) -> int:
    """The tokens of validation's widest held-out batch: the longest text cut to `length`, or `pad_to`."""
    texts = clip_texts(tokenizer, [r["text"] for r in held_out], length)
    return pad_to or max(len(ids) for ids in tokenizer(texts, truncation=True, max_length=length)["input_ids"])


def _check_engine_seq(recipe: Recipe, config: Any, adapter: Any, tokenizer: Any, held_out: list[dict[str, Any]],
                      length: int, pad_to: int | None) -> None:
    """The held-out texts, as validation pads each batch to its longest, against the TensorRT profile's
    longest text."""
    step = next((s for s in recipe.export if s.name == "tensorrt"), None)
    if step is None or recipe.validate_ is None or not held_out:
        return
    positions = min(text_positions(config, t) for t in adapter.towers if t.modality == "text")
    longest = step.config.seq.max if step.config.seq else min(DEFAULT_MAX_LENGTH, positions)
    widest = _widest(tokenizer, held_out, length, pad_to)
    if widest > longest:
        raise LmmcError(f"tensorrt.seq takes texts of at most {longest} tokens, and validation runs the engines on "
                        f"held-out texts of up to {widest}; raise tensorrt.seq.max to {widest}, or lower "
                        f"calibration.max_length")


def _check_bench_static(recipe: Recipe, config: Any, adapter: Any, preprocessors: dict[str, Any],
                        held_out: list[dict[str, Any]], length: int, pad_to: int | None) -> None:
    """bench's static IRs take no more tokens than they are compiled for, and it measures fidelity on the
    held-out texts and its corpora at their own lengths: it refused longer ones after the whole compile."""
    bench = recipe.bench
    if bench is None or not bench.static or not held_out:
        return
    positions = min(text_positions(config, t) for t in adapter.towers if t.modality == "text")
    seq = timing_seq(bench.seq, recipe.validate_.config.latency_seq if recipe.validate_ else None, positions)
    tokenizer = preprocessors["tokenizer"]
    widest = _widest(tokenizer, held_out, length, pad_to)
    for corpus in bench.corpora:
        batches = corpus_batches(corpus, adapter, preprocessors, recipe.calibration, bench.corpus_samples,
                                 text_truncation(config, adapter, preprocessors), pad_to)
        widest = max([widest, *(b["input_ids"].shape[1] for b in batches.get("text", []))])
    if widest > seq:
        raise LmmcError(f"bench.static compiles the IRs for {seq} tokens, and bench measures fidelity on texts of up "
                        f"to {widest} tokens (the held-out split and bench.corpora, as tokenised); set bench.seq to "
                        f"{widest} or more, lower calibration.max_length, or drop bench.static")


def _check_norm_gate(normalised: bool, recipe: Recipe) -> None:
    """max_norm_error reads the norms of an unnormalised embedding; a normalised one has none to gate."""
    if recipe.validate_ is not None and recipe.validate_.config.max_norm_error is not None and normalised:
        raise LmmcError("validate.max_norm_error gates the norms of an embedding that is not normalised, but this "
                        "model's embedding is (a unit vector, whose quality min_cosine measures): remove "
                        "max_norm_error")


def _check_target(adapter: Any, recipe: Recipe) -> None:
    """A latency target is met on the deployed student, which a generative model does not have yet."""
    if adapter.kind != "generative":
        return
    for i, step in enumerate(recipe.passes):
        if getattr(step.config, "target", None) is not None:
            raise LmmcError(f"passes[{i}] '{step.name}' sets a latency target, which is measured on the student "
                            f"deployed to ONNX Runtime or OpenVINO; lmmc does not deploy generative models "
                            f"({adapter.family}) there yet. Set keep (a FLOPs fraction) instead")


def _decoder_positions(config: Any, adapter: Any) -> int:
    return min(text_positions(config, t) for t in adapter.towers if t.modality == "text")


def _check_distill_samples(recipe: Recipe, config: Any, adapter: Any, counts: dict[str, int] | None,
                           preprocessors: dict[str, Any]) -> None:
    """A distillation's corpus as the pass will read it, and its training samples against its batch,
    refused now rather than after the passes before it. The count is the most it can be (its corpus's
    records, or the calibration split), since held-out and repeated samples drop out only once encoded."""
    from lmmc.distiller import distilled_towers, micro_batch, modality_key

    for name, cfg in _step_configs(recipe):
        if name.split(".")[-1] != "distill":
            continue
        micro_batch(cfg.batch_size, cfg.grad_accum, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun's ranks
        if cfg.corpus:
            needed = {modality_key(t) for t in distilled_towers(cfg, adapter)}
            files = {path: read_corpus(path, f"{name}.corpus") for path in cfg.corpus_paths()}
            records = [r for file in files.values() for r in file]
            used = records if adapter.kind == "generative" else [r for r in records if needed <= r.keys()]
            if adapter.kind == "generative" and all(p.suffix == ".jsonl" for p in files):  # else the pass says so
                template = cfg.chat_template if cfg.chat_template is not None else recipe.calibration.chat_template
                for path, file in files.items():
                    check_generative_records(file, path, preprocessors["processor"], template, f"{name}.corpus")
                check_prompts(preprocessors["processor"], records, cfg.max_length, template,
                              _decoder_positions(config, adapter))
            if not used:
                need = "image-text pairs" if len(needed) > 1 else f"{next(iter(needed))} samples"
                have = sorted({k for r in records for k in ("text", "image") if k in r})
                named = ", ".join(f"'{p}'" for p in files)
                raise LmmcError(f"{name}: its corpus {named} holds {' and '.join(have) or 'no'} samples only, "
                                f"and this distill trains on {need}; give a corpus of {need}")
            if "image" in needed:
                check_images([r["image"] for r in used if "image" in r])
            n = len({json.dumps(r, sort_keys=True) for r in used})  # a repeated record trains once
        elif counts:
            n = counts["calibration"]
        else:
            continue  # no data at all: the plan has refused it already, or distill will
        full = n - min(cfg.dev_samples, n // 4)
        train = min(full, cfg.samples) if cfg.samples else full
        train += round(cfg.vocabulary * train)
        reward = cfg.reward_samples if cfg.schedule == "optima" else 0
        if train - reward < cfg.batch_size:
            bandit = f", less the bandit's reward_samples = {reward}," if reward else ""
            # the cap is to blame only where the samples without it would fill a batch
            capped = bool(cfg.samples) and full + round(cfg.vocabulary * full) - reward >= cfg.batch_size
            more = f"raise {name}.samples (now {cfg.samples})" if capped else \
                "give more samples (a corpus, or calibration.samples)"
            raise LmmcError(f"{name}: at most {max(train - reward, 0)} training samples (of {n}{bandit} after its dev "
                            f"samples) for a batch_size of {cfg.batch_size}; lower batch_size"
                            f"{' or reward_samples' if reward else ''} or {more}")


def _step_configs(recipe: Recipe) -> list[tuple[str, Any]]:
    """Every step's config by its recipe name, with a distillation nested in a pass (antgmm's `distill`)
    as a step of its own."""
    out = []
    for step in [*recipe.passes, *recipe.export, *([recipe.validate_] if recipe.validate_ else [])]:
        out.append((step.name, step.config))
        if step.name == "antgmm" and step.config.distill is not None:  # validated with the recipe
            out.append((f"{step.name}.distill", step.config.distill_config()))
    return out


def _thread_settings(recipe: Recipe) -> list[tuple[str, int]]:
    """The thread counts the recipe sets (a default of 2 on one CPU costs little, and may time nothing)."""
    settings = [(f"{name}.threads", cfg.threads) for name, cfg in _step_configs(recipe)
                if "threads" in type(cfg).model_fields and cfg.given("threads")]
    settings += [(f"{name}.deploy.threads", cfg.deploy.threads) for name, cfg in _step_configs(recipe)
                 if getattr(cfg, "deploy", None) is not None and cfg.deploy.given("threads")]
    if recipe.bench is not None and recipe.bench.given("threads"):
        settings.append(("bench.threads", recipe.bench.threads))
    return settings


def _check_threads(recipe: Recipe) -> None:
    """The most threads the recipe asks for can be started, before any pass runs."""
    if settings := _thread_settings(recipe):
        key, most = max(settings, key=lambda item: item[1])
        check_threads_start(most, key)


def _oversubscribed(recipe: Recipe) -> list[str]:
    """Thread counts above the CPUs this process may use: every timing then measures threads waiting for a core
    (64 threads on 2 CPUs timed the teacher at 116 ms against 1.2), and fuse: auto or a latency fit chose by it."""
    cpus = usable_cpus()
    over = [f"{key} = {value}" for key, value in _thread_settings(recipe) if value > cpus]
    if not over:
        return []
    return [f"{', '.join(over)} {'is' if len(over) == 1 else 'are'} above the {cpus} CPU(s) this process may use: "
            f"the timings, and what is chosen by them (fuse: auto's graph, a latency target's fit), come from threads "
            f"waiting for a core; set {'it' if len(over) == 1 else 'them'} to {cpus} or fewer"]


def _unfusable_opset(recipe: Recipe) -> list[str]:
    """From opset 23 the exporter writes ONNX's own Attention operator, which ONNX Runtime's fusions do not
    rewrite: the `ort` pass's fused graph then holds no fused attention."""
    configs = dict(_step_configs(recipe))
    onnx, ort = configs.get("onnx"), configs.get("ort")
    if onnx is None or ort is None or onnx.opset < 23 or ort.fuse == "off":
        return []
    return [f"onnx opset {onnx.opset} exports attention as ONNX's own Attention operator, which ONNX Runtime's "
            f"fusions do not rewrite: the ort pass will fuse no attention; export with opset 20 to have it fused"]


def _ungated_fidelity(recipe: Recipe, kind: str) -> list[str]:
    """A validation none of whose gates compares the student with the teacher passes any student, however
    broken: its "passed" then certifies the exports' agreement with PyTorch and the held-out count only."""
    if recipe.validate_ is None:
        return []
    cfg = recipe.validate_.config
    generative = kind == "generative"
    gates = (*(cfg.GENERATIVE_GATES if generative else ("min_cosine",)), "min_task_metric", "min_task_metric_ratio")
    if any(getattr(cfg, g) is not None for g in gates):
        return []
    example = "min_top1_agreement: 0.9" if generative else "min_cosine: 0.9"
    return [f"validate sets no gate that compares the student with the teacher ({', '.join(gates)}), so "
            f"'passed' says only that the exports agree with PyTorch, not that the student keeps the teacher's "
            f"fidelity; set one, e.g. validate: {{{example}}}"]


def _check_shared_space(config: Any, adapter: Any) -> None:
    """A SigLIP's text head projects to text_config.projection_size and its image embedding is the vision
    tower's width; the two must agree for texts and images to be compared (CLIP projects both to one
    projection_dim). transformers' own forward fails on a model where they do not."""
    if adapter.family != "siglip":
        return
    if getattr(config.vision_config, "vision_use_head", True) is False:
        # without its attention-pooling head the vision tower gives token states, no image embedding
        raise LmmcError("this siglip model's vision tower has no pooling head (vision_config.vision_use_head: "
                        "false), so it gives no image embedding to compare with its texts: it is the image "
                        "encoder of a generative model, not a dual encoder; compile a SigLIP checkpoint with "
                        "its head")
    text, vision = config.text_config.projection_size, config.vision_config.hidden_size
    if text != vision:
        raise LmmcError(f"this siglip model's text tower embeds into {text} dimensions (text_config.projection_size) "
                        f"and its vision tower into {vision} (vision_config.hidden_size), so its texts and images "
                        f"share no space to compare them in; set projection_size to {vision}, or compile a checkpoint "
                        f"whose towers were trained together")


def _check_runnable(config: Any) -> None:
    """Configs that transformers' own forward of the model cannot run: refused before anything loads, where
    the first forward failed inside transformers and read as a bug of lmmc's."""
    buckets = getattr(config, "relative_attention_num_buckets", 32)
    if config.model_type == "mpnet" and buckets != 32:
        raise LmmcError(f"this mpnet model sets relative_attention_num_buckets = {buckets}, and transformers' MPNet "
                        f"computes its relative positions in 32 buckets whatever the config says, so its own "
                        f"forward indexes past the {buckets}-row bias table; compile a checkpoint with 32 buckets")
    layer = getattr(config, "vision_feature_layer", None)
    if layer == 0 or (isinstance(layer, (list, tuple)) and 0 in layer):
        raise LmmcError(f"this {config.model_type} model reads its image features at vision_feature_layer {layer}, "
                        f"and transformers' own forward of the model reads layer 0 as no layer and fails; "
                        f"read the features after a vision block (-1 is the last, -2 the one before it)")


def _cut_past_positions(config: Any, adapter: Adapter, modules: Any) -> list[str]:
    """A sentence-transformers cut above the position table, where sentence-transformers fails on a longer
    text: lmmc deploys the table's length instead, and says so."""
    name, declared = st_text_cut(modules) or (None, None)
    limit = min((text_positions(config, t) for t in adapter.towers if t.modality == "text"), default=None)
    if not isinstance(declared, int) or limit is None or declared <= limit:
        return []
    return [f"{name} cuts texts at {declared} tokens, more than the {limit} positions the model has (where "
            f"sentence-transformers fails on a longer text); lmmc cuts them at {limit}, in validation and in the "
            f"deployed student"]


def _check_lengths(config: Any, adapter: Any, recipe: Recipe) -> None:
    text = [t for t in adapter.towers if t.modality == "text"]
    if not text:
        for name, cfg in _step_configs(recipe):
            if getattr(cfg, "latency_seq", None) is not None:
                raise LmmcError(f"{name}.latency_seq sets the tokens of a text sample, and this {adapter.family} "
                                f"model has no text tower; remove latency_seq")
        return
    positions = min(text_positions(config, t) for t in text)
    if positions < TRACE_TOKENS:
        raise LmmcError(f"this model's text tower takes at most {positions} tokens (max_position_embeddings), and "
                        f"lmmc traces a text tower at {TRACE_TOKENS} tokens to export it with any length up to the "
                        f"model's; compile a model with at least {TRACE_TOKENS} positions")
    lengths = []  # (setting, tokens, whether the recipe gave it)
    if recipe.calibration.path and recipe.calibration.max_length:
        lengths.append(("calibration.max_length", recipe.calibration.max_length, True))
    opts: dict[str, int] = {}  # a tensorrt profile's opt, which must come down with its max
    for name, cfg in _step_configs(recipe):
        # A corpus read by no text tower (distill's `towers: [vision]`) is never tokenised.
        towers = getattr(cfg, "towers", None)
        if getattr(cfg, "corpus", None) and (towers is None or any(t.name in towers for t in text)):
            lengths.append((f"{name}.max_length", cfg.max_length, cfg.given("max_length")))
        # lmmc bench times at validate's latency_seq too, with the compile's latency off or on
        if getattr(cfg, "latency_seq", None) is not None:
            lengths.append((f"{name}.latency_seq", cfg.latency_seq, True))
        if hasattr(getattr(cfg, "seq", None), "max"):  # tensorrt's profile: its longest text must fit
            lengths.append((f"{name}.seq.max", cfg.seq.max, True))
            opts[f"{name}.seq.max"] = cfg.seq.opt
    # A generative model's sequence holds the image's tokens besides the text's (max_length counts text only);
    # the default length is a cap that the encoding lowers to the positions left, so only a given one counts them.
    image = adapter.image_tokens.count(config) if adapter.kind == "generative" and adapter.image_tokens else 0
    for key, value, given in lengths:
        if not given:  # a default length is a cap, lowered to the positions where the text is encoded
            continue
        extra = image if key.endswith("max_length") else 0
        if value + extra > positions:
            plus = f" text tokens, with the {extra} an image becomes, take {value + extra} positions," if extra else ","
            raise LmmcError(f"{key} = {value}{plus} but this model's text tower takes at most {positions} tokens "
                            f"(max_position_embeddings); set {key} to {positions - extra} or less"
                            + (f", and opt (now {opts[key]}) with it" if opts.get(key, 0) > positions else ""))


def _check_data(config: Any, adapter: Any, recipe: Recipe, warnings: list[str], shapes: torch.nn.Module,
                preprocessors: dict[str, Any]) -> tuple[dict[str, int] | None, list[str]]:
    """Read and split the calibration data exactly as the compile will, without encoding it. Returns the
    sample counts and the calibration texts."""
    cal = recipe.calibration
    if not cal.path:
        if not cal.random and any("calib" in s.needs for s in recipe.steps()):
            raise LmmcError("the recipe's passes need calibration data; give --calib PATH or 'calibration.path'")
        if not cal.random:
            return None, []
        check_random_allowed(shapes)
        _check_floor(recipe, cal.eval_samples, "raise calibration.eval_samples")
        _check_agreement(recipe, adapter, cal.eval_samples, cal.eval_samples)
        return {"calibration": cal.samples, "held_out": cal.eval_samples}, []
    modalities = {t.modality for t in adapter.towers}
    records = read_samples(Path(cal.path), cal.caption_template)
    if adapter.kind == "generative":
        check_generative_records(records, Path(cal.path), preprocessors.get("processor"), cal.chat_template)
    chosen = select(cal, Path(cal.path), records, modalities, generative=adapter.kind == "generative")
    if adapter.kind == "generative":
        positions = _decoder_positions(config, adapter)
        rooms = check_prompts(preprocessors["processor"], chosen.calib + chosen.held_out, cal.max_length,
                              cal.chat_template, positions)
        if recipe.validate_ is not None:
            check_answers(preprocessors["processor"], chosen.held_out, rooms, cal.max_length, cal.chat_template,
                          positions)
            check_generation_room(preprocessors["processor"], chosen.held_out, rooms,
                                  recipe.validate_.config.generation_tokens, cal.chat_template, positions)
    selected = len(chosen.held_out)
    if "text" in modalities and preprocessors.get("tokenizer") is not None:  # as load_calibration does
        cut = text_truncation(config, adapter, preprocessors)
        length = text_length(preprocessors["tokenizer"], cal.max_length or min(DEFAULT_MAX_LENGTH, cut),
                             text_pad_length(config, adapter))
        if modalities == {"text"}:
            chosen = drop_token_twins(chosen, preprocessors["tokenizer"], length)
        _check_engine_seq(recipe, config, adapter, preprocessors["tokenizer"],
                          [r for r in chosen.held_out if "text" in r], length, text_pad_length(config, adapter))
        _check_bench_static(recipe, config, adapter, preprocessors, [r for r in chosen.held_out if "text" in r],
                            length, text_pad_length(config, adapter))
    if adapter.kind != "generative":
        check_held_out_classes(chosen, Path(cal.path))
    warnings.extend(chosen.warnings)
    if "text" in modalities and cal.max_length and preprocessors.get("tokenizer") is not None:
        cut = text_truncation(config, adapter, preprocessors)
        if cut is not None and cal.max_length > cut:
            warnings.append(f"calibration.max_length = {cal.max_length} is above the {cut} tokens the deployed "
                            f"student's encode cuts a text to (the manifest's preprocessing.text.max_length): "
                            f"validation scores texts longer than any it will be sent; set max_length to {cut} "
                            f"or less")
    if "image" in modalities:
        check_images([r["image"] for r in chosen.calib + chosen.held_out if "image" in r])
    floor = recipe.validate_.config.min_held_out if recipe.validate_ is not None else 0
    if selected < cal.eval_samples:  # a quarter of the distinct samples at most
        fix = (f"give at least {4 * floor} distinct samples (images, for pairs) in '{cal.path}': at most a quarter "
               f"of them are held out")
        if cal.eval_samples < floor:
            fix = f"raise calibration.eval_samples to {floor} and {fix}"
    elif len(chosen.held_out) < selected:
        fix = (f"{selected - len(chosen.held_out)} of the {selected} texts held out read as the same tokens as a "
               f"calibration text, cut where they are: raise calibration.eval_samples or max_length, or lower "
               f"calibration.samples")
    else:
        fix = "raise calibration.eval_samples"
    _check_floor(recipe, len(chosen.held_out), fix)
    if not (chosen.held_out and "label" in chosen.held_out[0]):  # labelled data is scored by accuracy instead
        _check_agreement(recipe, adapter, len(chosen.held_out),
                         len({text_key(r["text"]) for r in chosen.held_out if "text" in r}))
    return {"calibration": len(chosen.calib), "held_out": len(chosen.held_out)}, [r["text"] for r in chosen.calib
                                                                                   if "text" in r]


def _check_agreement(recipe: Recipe, adapter: Any, images: int, captions: int) -> None:
    """validate.agreement_k ranks a dual encoder's held-out images and captions; a gate on that agreement
    with k so near their count that a random ranking agrees most of the time failed after the whole compile."""
    from lmmc.export.validate import MAX_AGREEMENT_CHANCE, agreement_chance

    if recipe.validate_ is None or adapter.kind == "generative":
        return
    cfg = recipe.validate_.config
    if {t.modality for t in adapter.towers} != {"text", "image"}:
        if cfg.given("agreement_k"):
            raise LmmcError(f"validate.agreement_k sets the top-k of a dual encoder's retrieval agreement, and this "
                            f"{adapter.family} model has one tower, scored by nearest-neighbour agreement; remove "
                            f"agreement_k")
        return
    if (cfg.min_task_metric, cfg.min_task_metric_ratio) == (None, None):
        return
    chance = max(agreement_chance(cfg.agreement_k, images, True)[1], agreement_chance(cfg.agreement_k, images)[1],
                 agreement_chance(cfg.agreement_k, captions)[1])
    if chance > MAX_AGREEMENT_CHANCE:
        raise LmmcError(f"validate gates the retrieval agreement (min_task_metric or min_task_metric_ratio), and "
                        f"with agreement_k = {cfg.agreement_k} among {images} held-out images and {captions} captions "
                        f"a random ranking agrees {chance:.2f} of the time, above {MAX_AGREEMENT_CHANCE}: it would "
                        f"certify nothing. Lower validate.agreement_k or raise calibration.eval_samples")


def _check_floor(recipe: Recipe, held_out: int, fix: str) -> None:
    if recipe.validate_ is None:
        return
    floor = recipe.validate_.config.min_held_out
    if held_out < floor:
        raise LmmcError(f"only {held_out} held-out samples for validation, below its floor of {floor} "
                        f"(validate.min_held_out); so few certify nothing. {fix[0].upper() + fix[1:]} "
                        f"(or, knowingly, lower validate.min_held_out)")


def _check_nm(recipe: Recipe, shapes: torch.nn.Module, adapter: Any, warnings: list[str]) -> None:
    """An N:M pattern leaves every matrix whose input width it does not divide dense."""
    if any(s.name == "antgmm" for s in recipe.passes):  # widths change before the pruner; checked after it runs
        return
    widths = {pl.param: pl.module.in_features for pl in prunable_linears(shapes, adapter)}
    for i, step in enumerate(recipe.passes):
        nm = getattr(step.config, "nm", None)
        if not nm:
            continue
        dense = sorted(p for p, w in widths.items() if w % nm.m)
        if len(dense) == len(widths):
            raise LmmcError(f"passes[{i}] '{step.name}': nm {nm} fits no matrix of this model (input widths "
                            f"{sorted(set(widths.values()))} are not multiples of {nm.m}); it would leave the "
                            f"model dense. Use an M that divides the widths, or unstructured sparsity")
        if dense:
            warnings.append(f"'{step.name}' nm {nm}: {len(dense)} of {len(widths)} matrices have an input width "
                            f"not divisible by {nm.m} and stay dense (e.g. {dense[0]})")


def _check_scoring(recipe: Recipe, shapes: torch.nn.Module, adapter: Any, counts: dict[str, int] | None) -> None:
    """What an allocation's caps and a contrastive score need, refused now rather than after the passes before
    them: ECoFLaP's floors against its target, and in-batch negatives (at least 2 samples in a batch)."""
    from lmmc.allocation import build_groups, keep_floors

    structured = False  # an antgmm before an allocation changes the matrices its floors are counted on
    for i, step in enumerate(recipe.passes):
        cfg = step.config
        if step.name == "ecoflap":
            if not structured:
                groups = build_groups(prunable_linears(shapes, adapter), cfg.granularity)
                try:
                    keep_floors([sum(pl.module.weight.numel() for pl in g) for g in groups.values()], cfg.sparsity,
                                cfg.cap)
                except LmmcError as e:
                    raise LmmcError(f"passes[{i}] 'ecoflap': {e}") from None
            if counts and adapter.kind != "generative" and min(cfg.samples, counts["calibration"]) < 2:
                raise LmmcError(f"passes[{i}] 'ecoflap': its contrastive loss needs at least 2 calibration samples, "
                                f"and it gets {min(cfg.samples, counts['calibration'])}; give more calibration data "
                                f"or raise ecoflap's samples")
        if step.name == "antgmm":
            structured = True
            batch = min(recipe.calibration.batch_size, counts["calibration"]) if counts else 2
            if adapter.kind != "generative" and batch < 2 and cfg.uses_taylor:
                raise LmmcError(f"passes[{i}] 'antgmm': Taylor importance needs calibration batches of at least 2 "
                                f"samples (the loss contrasts samples within a batch), and they hold {batch}; raise "
                                f"calibration.batch_size or use importance: activation")


def _check_keep(recipe: Recipe, config: Any, adapter: Any, shapes: torch.nn.Module, preprocessors: dict[str, Any],
                calib_texts: list[str]) -> None:
    """antgmm's keep against its floors, planned on the model's shapes and the calibration texts' lengths
    before anything runs: the pass refused it only once the passes before it (a distillation) had run."""
    step = next((s for s in recipe.passes if s.name == "antgmm"), None)  # a later one plans on the first's cuts
    if step is None or adapter.kind == "generative":
        return
    cal = recipe.calibration
    if cal.random:
        data = random_calibration(cal, shapes, adapter)
    else:  # what the pass reads of the data: text lengths, and an image tower's tokens, which one shape gives
        batches: dict[str, list] = {}
        for tower in adapter.towers:
            if tower.modality == "text" and calib_texts and preprocessors.get("tokenizer") is not None:
                cut = text_truncation(config, adapter, preprocessors)
                batches["text"] = encode_text(preprocessors["tokenizer"], calib_texts, cal.batch_size,
                                              cal.max_length or min(DEFAULT_MAX_LENGTH, cut),
                                              text_pad_length(config, adapter))
            elif tower.modality != "text":
                vision = tower_config(shapes, tower)
                batches["image"] = [{"pixel_values": torch.empty(1, getattr(vision, "num_channels", 3),
                                                                 vision.image_size, vision.image_size,
                                                                 device="meta")}]
        data = CalibData(batches, {}, "shapes")
    art = Artifact(model_ref="", adapter=adapter, teacher=shapes, student=shapes, calib=data,
                   device=torch.device("meta"))
    step.build().check_keep(art)


@torch.no_grad()
def check_teacher_outputs(art: Artifact) -> None:
    """Refuse a teacher whose outputs on the calibration data are NaN or Inf, or whose embedding carries
    nothing: all zeros in a tower, or the same for every sample in every tower (zeroed weights, say). Every
    fidelity figure would then compare constants."""
    constant: dict[str, tuple[str, int]] = {}
    for tower in art.adapter.towers:
        batches = art.calib.calib_batches(tower.modality) if art.calib else []
        if not batches:
            continue
        module = TowerModule(art.teacher, tower).eval()
        inputs = [batches[0][n] for n in module.names]
        outputs = module(*[x.to(art.device) for x in inputs])
        if not all(bool(torch.isfinite(o).all()) for o in outputs):
            raise LmmcError(f"the teacher's {tower.name} tower gives NaN/Inf outputs on the calibration data; "
                            f"the teacher is broken (check its weights and config) and cannot be compressed")
        if art.adapter.kind == "generative":  # no embedding: its figures are the decoder's tokens
            continue
        # Compared over distinct inputs only: captions from one template repeat within a batch.
        rows = {b"".join(x[i].numpy().tobytes() for x in inputs): i for i in range(len(inputs[0]))}
        pooled = outputs[1].float()[sorted(rows.values())]
        if pooled.ndim != 2 or len(pooled) < 2:
            continue
        scale = float(pooled.abs().max())
        if scale == 0:
            constant[tower.name] = ("an all-zero embedding", len(pooled))
        elif float((pooled - pooled[:1]).abs().max()) <= 1e-6 * scale:
            constant[tower.name] = ("one and the same embedding", len(pooled))
    zero = [t for t, (what, _) in constant.items() if what.startswith("an all-zero")]
    if zero or (constant and len(constant) == len(art.adapter.towers)):
        name = zero[0] if zero else next(iter(constant))
        what, n = constant[name]
        raise LmmcError(f"the teacher's {name} tower gives {what} for every one of {n} different calibration "
                        f"samples; the teacher is broken (its weights, e.g. all zeros, or a config that does not "
                        f"fit them) and cannot be compressed or validated")
    for name, (_, n) in constant.items():  # one tower of a dual encoder: usable, but its figures say nothing
        art.calib.warnings.append(
            f"the teacher's {name} tower gives one and the same embedding for every one of {n} different "
            f"calibration samples, so its cosine to the student compares constants (a CLIP text tower reads each "
            f"caption at one token, its end token or, where the config's eos_token_id is 2, its highest id: "
            f"captions alike up to that token embed alike); calibrate on more varied "
            f"{art.adapter.tower(name).modality}s to measure that tower")


# torch.export and the random states that process_state restores are the process's: two compiles at once in
# one process both failed inside the exporter.
_ONE_AT_A_TIME = threading.Lock()


def compile_model(model_ref: str, recipe: Recipe, out: Path, force: bool = False,
                  device: str = "auto", trust_remote_code: bool = False,
                  recipe_path: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Compile `model_ref` with `recipe` into `out`. Raises LmmcError on bad input, GateFailed when the
    complete output was written but a validation gate was missed. `resume` continues a killed compile to
    the same `out` from its last finished pass. Calls from several threads run one after another."""
    with _ONE_AT_A_TIME, process_state.kept():
        return _compile(model_ref, recipe, out, force, device, trust_remote_code, recipe_path, resume)


def _compile(model_ref: str, recipe: Recipe, out: Path, force: bool, device: str, trust_remote_code: bool,
             recipe_path: str | Path | None, resume: bool) -> dict[str, Any]:
    left = WorkArea(Path(os.path.expanduser(out)))
    if resume and left.writer and left.left_after_placing():
        shutil.rmtree(left.path, ignore_errors=True)
        where = f"its output is complete in '{out}'" if Path(os.path.expanduser(out)).is_dir() else \
            f"its output was put in '{out}', which has been moved away since"
        raise LmmcError(f"--resume: the compile to '{out}' had finished and was stopped while removing its work area "
                        f"'{left.path}' (now removed): {where}. Nothing is left to resume")
    if _finish_placing(left, Path(os.path.expanduser(out))):
        print(f"lmmc: finished putting in '{out}' the output of a compile that was stopped while it moved there",
              file=sys.stderr)
        if resume:
            raise LmmcError(f"--resume: the compile to '{out}' had finished and was stopped while putting its output "
                            f"there; its output is now complete in '{out}'. Nothing is left to resume")
    out = check_output(Path(out), model_ref, recipe, recipe_path, force)
    dev = resolve_device(device)
    the_plan = plan(model_ref, recipe, trust_remote_code)
    calib = recipe.calibration.path
    created = [p for p in out.parents if not p.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    area = WorkArea(out)
    inputs = describe_inputs(model_ref, recipe)
    try:
        area.claim(inputs, resume)
    except LmmcError:  # nothing to resume, say: bad input writes nothing, the folders made for --out included
        _remove(created)
        raise
    except OSError as err:
        _remove(created)
        raise _write_error(err, area.path, out) or err
    tmp = area.output
    done = 0
    try:
        started = time.perf_counter()
        teacher, adapter, preprocessor = load_teacher(model_ref, trust_remote_code)
        teacher.to(dev)
        art = Artifact(model_ref=model_ref, adapter=adapter, teacher=teacher, student=make_student(teacher),
                       preprocessor=preprocessor, device=dev, workdir=tmp, resume=resume)
        if calib and adapter.kind == "generative":
            processor = preprocessor["processor"]
            art.calib = load_generative_calibration(recipe.calibration, calib, processor,
                                                    *generative_limits(processor, adapter, teacher.config))
        elif recipe.calibration.random and adapter.kind == "generative":
            art.calib = random_generative_calibration(recipe.calibration, teacher, adapter)
        elif calib:
            modalities = {t.modality for t in adapter.towers}
            # by default, texts are cut where the model's users get them cut (its max_seq_length)
            art.calib = load_calibration(recipe.calibration, calib, modalities, preprocessor,
                                         text_truncation(teacher.config, adapter, preprocessor),
                                         text_pad_length(teacher.config, adapter))
        elif recipe.calibration.random:
            art.calib = random_calibration(recipe.calibration, teacher, adapter)
        check_teacher_outputs(art)
        # Under torchrun every rank reads the same saved state before rank 0 may replace it.
        ctx = setup_distributed(dev)
        done, earlier = area.restore(art) if resume else (0, 0.0)
        barrier(ctx)
        started -= earlier
        for index, step in enumerate(recipe.steps()):
            if index < done:
                continue
            if skipped(adapter, step):  # the plan's warnings say so
                done = index + 1
                continue
            art.scratch = area.scratch(index, step.name)
            torch.manual_seed(pass_seed(recipe.calibration.seed, index))
            started -= run_pass(step, art).metrics.get("seconds_before_resume", 0.0)
            if step.kind == "compress":
                _check_finite_student(art.student, step.name)
            done = index + 1
            area.save(art, done, time.perf_counter() - started)
            process_state.raise_lost_interrupt()  # the pass is saved: stopping here resumes after it
        report = build_report(art, recipe, the_plan, time.perf_counter() - started)
        # What lmmc bench checks it re-reads: the teacher's place and files, and the data's.
        report["inputs"] = {"model": inputs["model"], "data": inputs["data"]}
        if area.writer:
            for stale in tmp.iterdir():  # what a run killed while writing these files left (under --resume)
                if stale.name == FILE_LIST or _PARTIAL.fullmatch(stale.name):
                    stale.unlink()
            save_student(art.student.cpu(), preprocessor, tmp / "student",
                         {"lmmc_version": lmmc.__version__, "teacher": model_ref, "recipe": recipe.to_dict()})
            write_manifest(art, tmp, text_truncation(teacher.config, adapter, preprocessor))
            (tmp / "report.json").write_text(report_json(report))
            write_report_html(tmp)
            (tmp / FILE_LIST).write_text(json.dumps(_file_list(tmp), indent=0))
            if _taken(out, force):
                change = "is no longer an earlier lmmc output" if force else "appeared"
                raise OutputTaken(f"--out '{out}' {change} while the compile ran; it was left untouched. The "
                                  f"finished compile is kept in '{area.path}': move '{out}' away and run the same "
                                  f"command with --resume to write it there")
            staged = _stage(tmp, out)
            if staged != tmp and _taken(out, force):  # changed while the output was copied into it
                shutil.rmtree(staged, ignore_errors=True)
                raise OutputTaken(f"--out '{out}' changed while the output was copied into it; it was left as it "
                                  f"is. The finished compile is kept in '{area.path}': run the same command with "
                                  f"--resume once nothing else writes there")
        process_state.raise_lost_interrupt()
        with process_state.interrupts_deferred() as interrupted:
            if area.writer:
                area.placing()
                _place(tmp, staged, out)
            area.finish()
        barrier(ctx)  # under torchrun, every rank ends once rank 0's output is in place, or stops with it
    except OSError as err:
        if err.errno is None and area.writer and _no_room(tmp, out):  # shutil's copy errors carry no errno
            area.release()
            raise LmmcError(_full_and_kept(err, out, area.path, done)) from None
        kept = area.kept_passes() if err.errno in _DISK_FULL | _TOO_LARGE and area.writer else 0
        if kept:
            area.release()  # the finished passes (a long distillation) are kept to resume once there is room
            raise _write_error(err, tmp, out, kept=(area.path, kept)) from None
        _give_up(area, resume, created)
        raise _write_error(err, tmp, out) or err
    except OutputTaken:
        area.release()
        raise
    except LmmcError:
        _give_up(area, resume, created)
        raise
    except BaseException as err:
        # A second interrupt waits until the user has been told where the work is: under torchrun a rank whose
        # peer died meets the failed collective and the launcher's SIGTERM at nearly the same moment.
        with process_state.interrupts_deferred() as came:
            # Third-party writers (OpenVINO, ONNX Runtime's quantiser) report a full disk in words of their own.
            if isinstance(err, Exception) and area.writer and _no_room(tmp, out):
                area.release()
                raise LmmcError(_full_and_kept(err, out, area.path, done)) from None
            area.release()
            if area.writer:
                # a distillation's checkpoints (state.json beside its weights) resume it mid-pass
                saved = area.path.is_dir() and any(area.path.glob("pass-*/**/state.json"))
                print(f"lmmc: {done} pass(es) finished; their results are kept in '{area.path}': run the same "
                      f"command with --resume to continue from there" if done else
                      f"lmmc: no pass finished, and the running one kept checkpoints in '{area.path}': run the same "
                      f"command with --resume to continue from the last" if saved else
                      "lmmc: no pass finished; run the same command again (without --resume)", file=sys.stderr)
            elif area.path.is_dir() and (any(area.path.glob("state-*")) or any(area.path.glob("pass-*/**/state.json"))):
                # another rank of a torchrun job, which rank 0 may have left without a word (killed)
                print(f"lmmc: rank 0 kept its work in '{area.path}': run the same command with --resume to "
                      f"continue from there", file=sys.stderr)
        if came:
            process_state.INTERRUPTS.append(came[-1])
            raise KeyboardInterrupt(signal.Signals(came[-1]).name) from err
        raise
    if interrupted:
        raise OutputWritten(f"interrupted by {signal.Signals(interrupted[0]).name} as the output was put in place; "
                            f"it is complete in '{out}'")
    if report["failures"] or (report["validated"] and not report["passed"]):
        missed = [g for g in (report["validation"] or {}).get("gates", []) if not g["passed"]]
        raise GateFailed("; ".join([*(f"{g['name']} = {_num(g['value'], g['threshold'])}, needs {g['op']} "
                                      f"{g['threshold']}"
                                      for g in missed), *report["failures"]]), report)
    return report


def is_mount(path: Path) -> bool:
    """Whether `path` is a mount point, a bind mount of its own filesystem included, which
    os.path.ismount (comparing devices with the parent's) does not see."""
    if os.path.ismount(path):
        return True
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            # the fifth field, with space, tab, newline and backslash written as octal escapes
            points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]) for line in fh}
    except (OSError, IndexError):  # not Linux
        return False
    return str(Path(path).resolve()) in points


def _stage(tmp: Path, out: Path) -> Path:
    """Where the finished output waits to be put in place: where it was written, or, for an --out that
    is a mount point (a container's volume, which renames cannot cross into, even a bind mount of the same
    filesystem), a copy inside it. A copy that fails (a full disk) is removed; the earlier output stays whole."""
    if not out.exists() or (not is_mount(out) and tmp.stat().st_dev == out.stat().st_dev):
        return tmp
    staged = out / f".lmmc-incoming-{os.getpid()}"
    try:
        shutil.copytree(tmp, staged)
    except shutil.Error as err:  # one error for all the files it could not copy, with no errno of its own
        failed = [f for f in err.args[0] if isinstance(f, tuple) and len(f) == 3] if err.args else []
        # measured before the partial copy is removed, which gives the volume its space back
        full = _no_room(out) or any(f"[Errno {errno.ENOSPC}]" in str(why) for _, _, why in failed)
        shutil.rmtree(staged, ignore_errors=True)
        if full:  # read as the full disk it is: the finished passes are kept for --resume
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(failed[0][1]) if failed else str(out)) \
                from None
        raise
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def _place(tmp: Path, staged: Path, out: Path) -> None:
    """Put the finished output at --out. An earlier output (checked as lmmc's before) is moved into the
    work area, which is removed next. An --out that exists and is empty, or is a mount point, stays the
    directory it is, whose owner, mode and mount lmmc did not make: the earlier output's files in it are
    moved aside and removed, and the new ones moved in."""
    if not out.exists():
        tmp.rename(out)
        return
    if not is_mount(out) and any(out.iterdir()):
        out.rename(tmp.parent / REPLACED_DIR)
        tmp.rename(out)
        return
    aside = out / f".lmmc-replaced-{os.getpid()}"
    aside.mkdir()
    for entry in _own_entries(out):
        if entry not in (staged, aside):
            entry.rename(aside / entry.name)
    for entry in list(staged.iterdir()):
        entry.rename(out / entry.name)
    staged.rmdir()
    shutil.rmtree(aside)


def _finish_placing(area: WorkArea, out: Path) -> bool:
    """Finish what `_place` began for an --out filled entry by entry (empty, or a mount point) where a compile
    was stopped (SIGKILL, a power cut) in the middle: the earlier output's entries still in --out go, the
    finished output's entries still waiting (in the work area, or in a copy inside --out) move in. False, and
    nothing touched, unless the area says its compile was placing and --out holds only lmmc's entries."""
    if not area.writer or not out.is_dir() or out.is_symlink() or not area.stopped_placing():
        return False
    partial = [p for p in _own_entries(out) if _PARTIAL.fullmatch(p.name)]
    incoming = [p for p in partial if p.name.startswith(".lmmc-incoming-") and p.is_dir() and not p.is_symlink()]
    staged = incoming[0] if len(incoming) == 1 else area.output if not incoming else None
    if staged is None or not staged.is_dir():
        return False
    listed = file_list(staged) or file_list(out)
    if listed is None:
        return False
    names = {rel.split("/")[0] for rel in listed} | {FILE_LIST}
    waiting = {p.name for p in staged.iterdir()}
    placed = [p for p in _own_entries(out) if not _PARTIAL.fullmatch(p.name)]
    if waiting == names:  # stopped while moving the earlier output aside: what is left of it goes too
        aside = [p for p in partial if p.name.startswith(".lmmc-replaced-")]
        earlier = file_list(out) or next((lst for a in aside if (lst := file_list(a)) is not None), None)
        if placed and (not aside or earlier is None or
                       any(p.name not in {rel.split("/")[0] for rel in earlier} | _LATER for p in placed)):
            return False
        gone = placed
    elif not waiting <= names or any(p.name not in names or p.name in waiting for p in placed):
        return False
    else:
        gone = []
    for entry in gone + partial:
        if entry != staged:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for name in waiting:
        (staged / name).rename(out / name)
    staged.rmdir()
    area.finish()
    return True


def _write_error(err: OSError, where: Path, out: Path, kept: tuple[Path, int] | None = None) -> LmmcError | None:
    """The one-line error of a write that failed for a full disk, a file too large for its disk, or a folder
    lmmc may not write; None for any other failure. `kept`: the work area kept for --resume, and its
    finished passes."""
    def then(fix: str) -> str:
        return (f". The {kept[1]} finished pass(es) are kept in '{kept[0]}': {fix}, then run the same command with "
                f"--resume (or remove '{kept[0]}')" if kept else "")

    temp = Path(tempfile.gettempdir())
    if err.errno in _DISK_FULL and not err.filename and _fuller(temp, where):
        # a native library's write names no file; ONNX Runtime's quantiser writes its copies in the temp folder
        return LmmcError(f"the disk is full: a write that names no file failed ({err.strerror or 'no space'}), likely in "
                         f"the temporary folder {temp}, whose disk has less room than '{where}'s; nothing was written "
                         f"to '{out}'" + (then("free some space there, or point TMPDIR at another disk") or
                                          ". Free some space there, or point TMPDIR at another disk"))
    if err.errno in _DISK_FULL:
        return LmmcError(f"the disk is full: writing '{err.filename or where}' failed ({err.strerror or 'no space'}); "
                         f"nothing was written to '{out}'" + (then("free some space") or
                                                              ". Free some space, or choose an --out on another disk"))
    if err.errno in _TOO_LARGE:
        return LmmcError(f"writing '{err.filename or where}' failed ({err.strerror}): a file this large is refused by "
                         f"the disk's filesystem (FAT32 takes at most 4 GiB) or by the file-size limit of this shell "
                         f"('ulimit -f'); nothing was written to '{out}'. Choose an --out on another disk, or raise "
                         f"the limit" + then("raise the limit"))
    if err.errno in _NOT_WRITABLE and err.filename and Path(err.filename).is_relative_to(out.parent):
        return LmmcError(f"cannot write '{err.filename}' ({err.strerror}); nothing was written to '{out}'. "
                         f"Choose an --out on a writable disk, or fix the permissions")
    return None


def _fuller(folder: Path, than: Path) -> bool:
    """Whether `folder` lies on another disk than `than`, with less space left."""
    try:
        return folder.stat().st_dev != than.stat().st_dev and \
            shutil.disk_usage(folder).free < shutil.disk_usage(than).free
    except OSError:
        return False


def _no_room(*folders: Path) -> bool:
    """Whether one of `folders` (those that exist) lies on a disk with less than 1 MiB left: what a writer
    that filled it leaves behind."""
    return any(shutil.disk_usage(f).free < 1 << 20 for f in folders if f.is_dir())


def _full_and_kept(err: BaseException, out: Path, area: Path, done: int) -> str:
    """A failure in a library's own words on a disk left full. The work is kept, not discarded: the failure
    may have another cause, and freeing space is the user's to do."""
    text = " ".join(str(err).split())
    then = (f"the {done} finished pass(es) are kept in '{area}': free some space, then run the same command with "
            f"--resume" if done else "free some space, then run the same command again")
    return (f"the disk is full (less than 1 MiB left) after {type(err).__name__}: {text[:200]}"
            f"{'...' if len(text) > 200 else ''}; nothing was written to '{out}'; {then}")


def _give_up(area: WorkArea, resume: bool, created: list[Path]) -> None:
    """After bad input or a full disk: a new compile leaves nothing behind, not even the folders it made
    for --out; a resumed one keeps what the interrupted run saved, to resume once the input is fixed."""
    if resume:
        area.release()
        return
    area.discard()
    _remove(created)


def _remove(created: list[Path]) -> None:
    """The folders a compile made for --out, deepest first, as far as they are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else wrote there meanwhile
            break


def _check_finite_student(student: torch.nn.Module, after: str) -> None:
    """A pass that left NaN or Inf in the student (a distillation that diverged) ends the compile: nothing
    computed from those weights means anything, validated or not."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in student.named_parameters()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        first = next(iter(bad))
        raise LmmcError(f"pass '{after}' left NaN/Inf values in {len(bad)} of the student's tensors ({bad[first]} in "
                        f"'{first}'): it diverged. Lower its learning rate (lr) or check its other settings")


def _num(value: float | None, threshold: float) -> str:
    if value is None or not math.isfinite(value):
        return "non-finite (NaN/Inf)"
    return format(value, gate_digits(value, threshold))


def _failures(art: Artifact) -> list[str]:
    """What makes a compile fail although every gate is met: an N:M pruner that pruned nothing."""
    failures = []
    for record in art.records:
        dense = record.metrics.get("dense_nm") if isinstance(record.metrics, dict) else None
        nm = record.config.get("nm")
        if nm and dense and len(dense) == len(prunable_linears(art.student, art.adapter)):
            failures.append(f"'{record.name}' nm {nm} fitted no matrix: the student stayed dense")
    return failures


def flops_per_tower(art: Artifact) -> dict[str, dict[str, Any]]:
    """Per tower, the transformer blocks' FLOPs of one sample in teacher and student and the fraction kept:
    text at the length a structured pass counted with (else the calibration texts' mean length, capped at
    the model's positions), images at their patch count."""
    if art.calib is None:
        return {}
    counted = next((r.metrics["tokens"] for r in reversed(art.records)
                    if isinstance(r.metrics, dict) and isinstance(r.metrics.get("tokens"), dict)), {})
    tokens: dict[str, int] = {}
    for tower in art.adapter.towers:
        if tower.name in counted:
            tokens[tower.name] = int(counted[tower.name])
        elif tower.modality == "text":
            tokens[tower.name] = text_tokens(art.calib, text_positions(art.teacher.config, tower),
                                             text_pad_length(art.teacher.config, art.adapter))
        else:
            (args, kwargs), = capture_block_inputs(art.teacher, tower, art.calib.calib_batches("image")[:1],
                                                   art.device)
            tokens[tower.name] = int((args[0] if args else kwargs["hidden_states"]).shape[1])
    costs = {who: blocks_cost(model, art.adapter, {t.name: head_dim(model, t) for t in art.adapter.towers}, tokens)
             for who, model in (("teacher", art.teacher), ("student", art.student))}
    return {t.name: {"tokens": tokens[t.name], "teacher": costs["teacher"][t.name].flops,
                     "student": costs["student"][t.name].flops,
                     "kept": costs["student"][t.name].flops / costs["teacher"][t.name].flops}
            for t in art.adapter.towers}


def _pass_warnings(metrics: Any) -> list[str]:
    """A pass's warnings wherever its metrics keep them: its own list, each tower's (the export passes),
    each distillation's between antgmm's segments; each said once."""
    found: list[str] = []
    if isinstance(metrics, dict):
        found += [w for w in metrics.get("warnings") or [] if isinstance(w, str)]
        values = [v for k, v in metrics.items() if k != "warnings"]
    elif isinstance(metrics, list):
        values = metrics
    else:
        return []
    for value in values:
        found += _pass_warnings(value)
    return list(dict.fromkeys(found))


def _unheeded_eos(art: Artifact) -> list[str]:
    """A tokenizer that ends answers with a token the generation config does not stop at: the model and its
    exported generator run past every answer, and exact match reads a prefix."""
    from lmmc.generation import eos_ids

    processor = (art.preprocessor or {}).get("processor")
    if getattr(processor, "tokenizer", None) is None:
        return []
    end, stops = answer_end(processor, art.adapter, art.teacher.config), eos_ids(art.teacher)
    if end is None or not stops or end in stops:
        return []
    token = processor.tokenizer.convert_ids_to_tokens(end)
    return [f"the tokenizer ends every answer with '{token}' (id {end}), and the model's generation "
            f"config stops at {sorted(stops)} only: generation, the exported generator's included, runs past the "
            f"end of an answer, and exact match compares each answer with the start of what was generated; add {end} "
            f"to eos_token_id in the model's generation_config.json"]


def build_report(art: Artifact, recipe: Recipe, the_plan: dict[str, Any], seconds: float) -> dict[str, Any]:
    n_teacher = sum(p.numel() for p in art.teacher.parameters())
    n_student = sum(p.numel() for p in art.student.parameters())
    warnings = [*the_plan.get("warnings", [])]
    if art.calib:
        warnings += [w for w in art.calib.warnings if w not in warnings]
    absent = getattr(art.teacher, "lmmc_absent_weights", [])
    if absent:
        warnings.append(f"the teacher's checkpoint lacks {', '.join(absent)}, which none of its embeddings reads "
                        f"(a task checkpoint without the base model's pooler); teacher and student carry them as zeros")
    dropped = getattr(art.teacher, "lmmc_dropped_weights", [])
    if dropped:
        heads = sorted({k.split(".")[0] for k in dropped})
        warnings.append(f"the teacher's checkpoint holds {len(dropped)} tensor(s) outside the {art.adapter.family} model "
                        f"lmmc compiles ({', '.join(f'{h}.*' for h in heads[:3])}: a task head, such as a classifier, "
                        f"or other tensors the model does not read); the student has none, and its validated outputs "
                        f"are the base model's embeddings. A head's outputs from the student need that head put back "
                        f"and checked by you")
    if art.adapter.kind == "generative":
        warnings += _unheeded_eos(art)
    for tower, result in ((art.validation or {}).get("towers") or {}).items():
        if "dominant_channels" in result:
            d = result["dominant_channels"]
            warnings.append(f"{tower}: {len(d['channels'])} of the teacher's {d['of']} embedding channels "
                            f"({', '.join(map(str, d['channels']))}) {'holds' if len(d['channels']) == 1 else 'hold'} "
                            f"{d['share']:.0%} of its held-out embeddings' "
                            f"length, so cosine to the teacher mostly measures them: a student can keep the cosine "
                            f"gate and lose how the other channels rank neighbours. Gate the task metric as well "
                            f"(validate.min_task_metric or min_task_metric_ratio)")
    quantised = [r for r in (art.validation or {}).get("exports") or [] if r["precision"] in ("int8", "mixed")]
    if art.calib is not None and art.calib.short and not art.calib.eval_short and quantised:
        warnings.append("every held-out text opens with words that calibration's short texts hold as well, so the "
                        "quantised artifacts have no figure on short texts (short_cosine_to_student); hold out "
                        "texts that open more diversely")
    for result in (art.validation or {}).get("exports") or []:
        tokens = result.get("hidden_cosine_to_student")
        if tokens and not tokens["min"] >= MIN_TOKEN_COSINE:
            warnings.append(f"{result['path']}: its last_hidden_state falls to a cosine of {tokens['min']:.3f} to the "
                            f"fp32 student's at its worst token ({tokens['mean']:.3f} on average), where the gates "
                            f"judge its pooled_embedding: read only the pooled embedding from it, and token states "
                            f"from an fp32 artifact")
        short = result.get("short_cosine_to_student")
        if short and not short["min"] >= MIN_SHORT_COSINE:
            warnings.append(f"{result['path']}: on texts of one to four words (the opening words of the held-out "
                            f"texts) its embedding falls to a cosine of {short['min']:.3f} to the fp32 student's "
                            f"({short['mean']:.3f} on average), where the gates judge whole held-out texts: for short "
                            f"queries, deploy an fp32 artifact, or one that keeps its costliest matrices fp32 "
                            f"(int8: {{mixed: ...}})")
    for record in art.records:
        warnings += [f"{record.name}: {w}" for w in _pass_warnings(record.metrics) if f"{record.name}: {w}" not in warnings]
        metrics = record.metrics if isinstance(record.metrics, dict) else {}
        nm, dense, denser = record.config.get("nm"), metrics.get("dense_nm"), metrics.get("nm_kept_earlier")
        reached = f"; the prunable weights are {metrics['sparsity']:.1%} sparse" if "sparsity" in metrics else ""
        if nm and dense and not any(w.startswith(f"'{record.name}' nm") for w in warnings):
            m = str(nm).split(":")[-1]
            warnings.append(f"'{record.name}' nm {nm}: {len(dense)} matrices stayed dense, their input widths no "
                            f"multiple of {m} ({', '.join(dense[:3])}{' ...' if len(dense) > 3 else ''})"
                            f"{reached}. A structured pass before it keeps FFN widths in multiples of {m} with "
                            f"antgmm: {{ffn_multiple: {m}}}")
        if nm and denser:
            warnings.append(f"'{record.name}' nm {nm} kept the zeros an earlier pass made, so {len(denser)} matrices "
                            f"are sparser than {nm}{reached}. For {nm} alone, drop the earlier pruning pass")
        if metrics.get("removed_nothing"):
            earlier = metrics.get("after_earlier")
            why = ": an earlier pass's zeros already held every one it would remove" if earlier else ""
            warnings.append(f"'{record.name}' removed no weight{why}{reached}. Drop it, or give it a higher sparsity"
                            f"{' than the earlier pass' if earlier else ''}")
        target = record.config.get("sparsity")
        if (not nm and metrics.get("targets") == "uniform" and isinstance(target, (int, float))
                and "sparsity" in metrics and metrics["sparsity"] < target - 0.005 and not metrics.get("removed_nothing")):
            # each row loses floor(sparsity x its inputs) weights: on narrow matrices that falls short of the target
            warnings.append(f"'{record.name}' asked for sparsity {target} and reached {metrics['sparsity']:.1%}: each row "
                            f"of a matrix loses a whole number of weights, rounded down, which falls short on rows this "
                            f"narrow; sparsegpt meets the target per matrix")
    failures = _failures(art)
    validated = bool(art.validation)
    return {
        "lmmc_version": lmmc.__version__,
        "model": art.model_ref,
        "adapter": art.adapter.family,
        "recipe": recipe.to_dict(),
        "calibration": {"source": the_plan["calibration"], **(art.calib.counts if art.calib else {})},
        "parameters": {"teacher": n_teacher, "student": n_student},
        "sparsity": sparsity_summary(art.student, art.adapter),
        "flops": flops_per_tower(art),
        "passes": [asdict(r) for r in art.records],
        "onnx": {k: str(v.relative_to(art.workdir)) for k, v in art.onnx.items()},
        "validation": art.validation,
        "warnings": warnings,
        "failures": failures,
        "validated": validated,
        # Never true without validation: an unvalidated student is not known to work.
        "passed": (art.validation.get("passed", False) and not failures) if validated else None,
        "seconds": seconds,
        "environment": environment(art.device),
    }


# The packages whose kernels and rewrites a student's bytes and figures depend on.
_PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "tensorrt")


def environment(device: torch.device) -> dict[str, Any]:
    """What besides the model, recipe and data decides a compile's bytes: distillation's and the refit's sums
    round by device and thread count, and the packages' kernels and graph rewrites change between versions."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"device": str(device), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "packages": versions}


def report_json(report: dict[str, Any]) -> str:
    """Strict JSON (no bare NaN): non-finite numbers are written as null; their gates have failed."""
    return json.dumps(finite(report), indent=2, allow_nan=False, default=str)
