"""The compile's work area beside --out: a lock and owner record, the fingerprint of the inputs, and the
state saved after each finished pass, so a killed compile can be resumed (`--resume`) or cleaned up.

Layout of `<parent>/.<out>.lmmc-work/`:
  lmmc-work.json   owner record (pid, host, start time); its presence marks the folder as lmmc's
  lock             held with flock(2) while a compile runs; the kernel drops it when the process dies,
                   so a live owner is told from a dead one without trusting a PID that may be reused
  inputs.json      hashes of the model files and data, and the recipe, that the run started from
  output/          the output being built; renamed to --out when the compile ends
  state-NN/        what the later passes need after NN finished passes (student, masks, records ...)
  pass-NN-<name>/  the running pass's own resumable state (distillation checkpoints)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import lmmc
from lmmc.artifact import Artifact, ExportRecord, PassRecord
from lmmc.data import folder_files, read_samples
from lmmc.errors import LmmcError
from lmmc.recipe import Recipe
from lmmc.runtime import digest_file
from lmmc.student import load_student
from lmmc.student import save as save_student_weights
from lmmc.student import save_tensors

WORK_SUFFIX = ".lmmc-work"
OWNER_FILE = "lmmc-work.json"
LOCK_FILE = "lock"
INPUTS_FILE = "inputs.json"
CODE_CHANGED = "lmmc's code changed"
OUTPUT_DIR = "output"
REPLACED_DIR = "replaced"  # an earlier output at --out, moved here the instant before the new one takes its place
STATE_PREFIX = "state-"
PLACING_FILE = "placing"  # written the instant before the output moves to --out


def work_path(out: Path) -> Path:
    """Where the work area of a compile to `out` lives: beside it, hidden, named after it."""
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def process_rank() -> int:
    """This process's rank under torchrun (which sets RANK); 0 in a plain run."""
    return int(os.environ.get("RANK", "0"))


def pass_seed(seed: int, index: int) -> int:
    """The global torch seed set before pass `index`: a function of the recipe seed and the pass alone,
    so a pass draws the same numbers whether or not the passes before it ran in this process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def hash_files(path: Path) -> str:
    """SHA-256 over a file, or over every file under a folder (relative name, size, bytes), hidden
    entries excepted."""
    path = Path(path)
    if path.is_file():
        files = [(path, "")]
    else:  # the files the data reader reads, linked subfolders included
        files = [(p, p.relative_to(path).as_posix()) for p in folder_files(path) if p.is_file()]
    digest = hashlib.sha256()
    for file, name in files:
        digest_file(digest, file, name)
    return digest.hexdigest()


def code_digest() -> str:
    """SHA-256 over lmmc's own Python files (the lmmc, lmmc.passes and lmmc.export packages): a work area
    resumes only under the code that wrote it, since a version number stays the same across many builds."""
    import importlib.util

    roots = {package: Path(importlib.util.find_spec(package).submodule_search_locations[0])
             for package in ("lmmc", "lmmc.passes", "lmmc.export")}
    digest = hashlib.sha256()
    for package, root in roots.items():
        for file in sorted(root.rglob("*.py")):
            # an installed wheel holds passes/ and export/ inside lmmc/; an editor's lock file is a dangling link
            inside = any(other != root and file.is_relative_to(other) for other in roots.values())
            if not inside and file.is_file() and not file.name.startswith("."):
                digest.update(f"{package}/{file.relative_to(root).as_posix()}\0".encode() + file.read_bytes())
    return digest.hexdigest()


def hash_data(path: Path) -> str:
    """hash_files of a data file or folder; for a .jsonl file, also the bytes of every image its lines name
    (resolved as the data reader resolves them): an image changed in place changes the samples too."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return hash_files(path)
    digest = hashlib.sha256(hash_files(path).encode())
    # the images' names are in the file's bytes already; each image's bytes once, in the order of the lines
    for image in dict.fromkeys(r["image"] for r in read_samples(path) if "image" in r):
        digest.update(hash_files(Path(image)).encode())
    return digest.hexdigest()


def describe_inputs(model_ref: str, recipe: Recipe) -> dict[str, Any]:
    """What a resumed compile must find unchanged: the model's files, the recipe, and every data file
    the recipe reads (calibration data and distillation corpora, with the images a .jsonl names)."""
    from lmmc.modelio import hub_revision

    model_path = Path(os.path.expanduser(model_ref))
    # A hub id without a local copy is known by its name and the snapshot it resolved to.
    model = {"ref": model_ref, "path": str(model_path.resolve()) if model_path.exists() else None,
             "sha256": hash_files(model_path) if model_path.exists() else None,
             "revision": None if model_path.exists() else hub_revision(model_ref)}
    data = {}
    if recipe.calibration.path:
        data["calibration"] = {"path": recipe.calibration.path, "sha256": hash_data(Path(recipe.calibration.path))}
    for i, step in enumerate(recipe.passes):
        nested = getattr(step.config, "distill", None)  # antgmm's distillation between its stages
        for where, corpus in ((f"passes[{i}].{step.name}.corpus", getattr(step.config, "corpus", None)),
                              (f"passes[{i}].{step.name}.distill.corpus",
                               nested.get("corpus") if isinstance(nested, dict) else None)):
            paths = [corpus] if isinstance(corpus, str) else corpus or []
            for j, path in enumerate(paths):
                key = where if isinstance(corpus, str) else f"{where}[{j}]"
                data[key] = {"path": path, "sha256": hash_data(Path(path))}
    return {"lmmc_version": lmmc.__version__, "lmmc_code": code_digest(), "model": model, "recipe": recipe.to_dict(),
            "data": data}


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths of what differs between two JSON-like values, each with its old and new value."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in old:
                out.append(f"{path} added")
            elif key not in new:
                out.append(f"{path} removed")
            else:
                out += differences(old[key], new[key], path)
        return out
    if isinstance(old, list) and isinstance(new, list):
        # entries past the shorter list by name alone: a pass written out with every default is a screenful
        common = min(len(old), len(new))
        return [*(d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")),
                *(f"{where}[{i}] removed: {_brief(old[i])}" for i in range(common, len(old))),
                *(f"{where}[{i}] added: {_brief(new[i])}" for i in range(common, len(new)))]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _brief(entry: Any) -> str:
    """A list entry in a few words: a pass ({"wanda": {...}}) by its name."""
    if isinstance(entry, dict) and len(entry) == 1:
        return str(next(iter(entry)))
    text = repr(entry)
    return text if len(text) <= 60 else text[:57] + "..."


def changed_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed since the interrupted run, in words a user can act on."""
    if (old.get("lmmc_version"), old.get("lmmc_code")) != (new["lmmc_version"], new["lmmc_code"]):
        # the recipe's defaults are this code's too: listing them as changes would ask the user to undo them
        return [CODE_CHANGED]
    out = []
    # A local model is known by its files (`./teacher`, `teacher/` or its absolute path alike; where it lies
    # is bench's business), a hub model by its id.
    before, now = old.get("model") or {}, new["model"]
    same = before.get("sha256") == now["sha256"] if now["sha256"] else (before.get("ref"), before.get("sha256")) \
        == (now["ref"], None)
    if not same:
        if before.get("ref") != now["ref"]:
            out.append(f"model '{old.get('model', {}).get('ref')}' -> '{new['model']['ref']}'")
        else:
            out.append(f"the files of model '{new['model']['ref']}' changed")
    out += [f"recipe {d}" for d in differences(old.get("recipe"), new["recipe"])]
    old_data, new_data = old.get("data", {}), new["data"]
    for key in sorted(set(old_data) | set(new_data)):
        a, b = old_data.get(key), new_data.get(key)
        # A file named differently shows as a recipe change above; here only same-named files are compared.
        if a and b and a["path"] == b["path"] and a != b:
            out.append(f"the data of {key} ('{b['path']}') changed")
    return out


def write_new(path: Path, text: str) -> None:
    """`text` in a new file at `path`, a temporary name of lmmc's: what is there is removed first (a link, not
    what it points to), and a link put there meanwhile fails the exclusive create rather than being written
    through, to a file elsewhere."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_new(tmp, json.dumps(data, indent=1))
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file left in the area
        tmp.unlink(missing_ok=True)
        raise


def _inside(folder: Path, rel: str) -> Path:
    """`folder / rel` for a path a saved state names, which must stay inside `folder`."""
    path = folder / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"'{rel}' lies outside the area's output")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class WorkArea:
    """One compile's work area. Only rank 0 of a torchrun job (the writer) locks it and writes to it;
    other ranks build their throw-away output in a private temporary folder and read the saved state
    from rank 0's area when resuming."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = work_path(self.out)
        self.writer = process_rank() == 0
        self.output = self.path / OUTPUT_DIR
        self._lock: int | None = None

    # --- taking the area ------------------------------------------------------------------------------

    def claim(self, inputs: dict[str, Any], resume: bool) -> None:
        """Lock the area for this compile. A live compile's area is refused; a dead run's area is resumed
        under `resume` (after checking the inputs are the ones it started from) and removed otherwise."""
        if not self.writer:
            if resume and _read_json(self.path / INPUTS_FILE) is None:
                raise LmmcError(self._nothing_to_resume())
            self.output = Path(tempfile.mkdtemp(prefix=f"lmmc-rank{process_rank()}-"))
            return
        self._check_ours()
        if resume and not (self.path / INPUTS_FILE).is_file():
            raise LmmcError(self._nothing_to_resume())
        made = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a full disk: an area this run made is removed, not left to be refused as not lmmc's
            if made:
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LmmcError(self._taken()) from None
        self._lock = fd
        try:
            if resume:
                previous = _read_json(self.path / INPUTS_FILE)
                if previous is None:
                    raise LmmcError(self._nothing_to_resume())
                self._check_unchanged(previous, inputs)
            else:
                self._clear_dead_run()
            _write_json(self.path / OWNER_FILE, {"lmmc_work_area": 1, "pid": os.getpid(),
                                                 "host": socket.gethostname(), "started": time.time(),
                                                 "out": str(self.out)})
            _write_json(self.path / INPUTS_FILE, inputs)
            self.output.mkdir(exist_ok=True)
        except BaseException:
            self.release()
            if made:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def left_after_placing(self) -> bool:
        """Whether a compile was stopped after moving its output to --out and before removing this area: the
        mark it leaves just before that move, the output folder gone, and no compile running. (The folder
        alone gone, a temp cleaner's doing say, is no sign: its saved passes would be lost.)"""
        return not self.output.exists() and self.stopped_placing()

    def stopped_placing(self) -> bool:
        """Whether a compile left the mark it leaves just before moving its output to --out, and none runs."""
        if not self.path.is_dir() or self.path.is_symlink() or not (self.path / PLACING_FILE).is_file():
            return False
        self._check_ours()
        fd = os.open(self.path / LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def running(self) -> str | None:
        """Who holds this area's lock (a live compile writing to its --out), in words; None when nobody does."""
        if not (self.path / LOCK_FILE).is_file() or self.path.is_symlink():
            return None
        try:
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._owner_words()
        finally:
            os.close(fd)
        return None

    def _taken(self) -> str:
        return (f"another lmmc compile ({self._owner_words()}) is writing to '{self.out}' (work area "
                f"'{self.path}'); wait for it to finish or stop it, or choose another --out")

    def check_model_there(self, model_ref: str) -> None:
        """A local model directory the interrupted compile read, gone from that path now, said as such: read as a
        hub id it would be "not a local directory nor in the hub cache"."""
        previous = _read_json(self.path / INPUTS_FILE)
        read = (previous.get("model") or {}).get("path") if isinstance(previous, dict) else None
        given = Path(os.path.expanduser(model_ref))
        if read and not given.exists() and str(given.resolve()) == read:
            raise LmmcError(f"--resume: the model directory '{model_ref}' that the interrupted compile to "
                            f"'{self.out}' read is not there any more; if it moved, give its new path (a resumed "
                            f"compile knows the model by its files, not by where they lie)")

    def check_claim(self, inputs: dict[str, Any] | None, resume: bool) -> None:
        """What claim refuses before any pass, checked without taking the area: for a dry run."""
        self._check_ours()
        if self.running() is not None:
            raise LmmcError(self._taken())
        if not resume:
            return
        if self.writer and self.left_after_placing():
            raise LmmcError(f"--resume: the compile to '{self.out}' had finished and was stopped while removing its "
                            f"work area '{self.path}'; nothing is left to resume (run without --dry-run to have the "
                            f"work area removed)")
        previous = _read_json(self.path / INPUTS_FILE)
        if previous is None:
            raise LmmcError(self._nothing_to_resume())
        self._check_unchanged(previous, inputs)

    def _check_unchanged(self, previous: dict[str, Any], inputs: dict[str, Any]) -> None:
        changes = changed_inputs(previous, inputs)
        if changes == [CODE_CHANGED]:
            then, now = previous.get("lmmc_version"), inputs["lmmc_version"]
            version = f"version {then}, this is {now}" if then != now else f"version {now}, its code changed since"
            raise LmmcError(f"cannot resume the compile to '{self.out}': it was interrupted under another build of "
                            f"lmmc ({version}), and its finished passes are that code's results. Run without --resume "
                            f"to start afresh (this discards the interrupted run's work in '{self.path}')")
        if changes:
            raise LmmcError(f"cannot resume the compile to '{self.out}': since it was interrupted, "
                            f"{'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}. Restore "
                            f"what changed, or run without --resume to start afresh (this discards "
                            f"the interrupted run's work in '{self.path}')")

    def _nothing_to_resume(self) -> str:
        return (f"--resume: nothing to resume for --out '{self.out}' (no work area '{self.path}' of an "
                f"interrupted compile); run the same command without --resume")

    def _check_ours(self) -> None:
        """Refuse a path by the work area's name that lmmc did not make: it is never removed or reused."""
        p = self.path
        if not (p.exists() or p.is_symlink()):
            return
        ours = False
        if p.is_dir() and not p.is_symlink():
            owner = _read_json(p / OWNER_FILE) if (p / OWNER_FILE).is_file() else None
            # A run killed between taking the lock and writing its owner record leaves the empty lock alone.
            only_lock = [c.name for c in p.iterdir()] == [LOCK_FILE] and (p / LOCK_FILE).stat().st_size == 0
            ours = (isinstance(owner, dict) and owner.get("lmmc_work_area") == 1) or only_lock
        if not ours:
            raise LmmcError(f"'{p}' is in the way of the compile's work area but was not made by lmmc (no "
                            f"{OWNER_FILE}); move or delete it yourself, or choose another --out")
        # lmmc makes no links there; one would have the compile write (or resume from) files elsewhere
        link = next((Path(folder, name) for folder, dirs, files in os.walk(p) for name in [*dirs, *files]
                     if Path(folder, name).is_symlink()), None)
        if link is not None:
            raise LmmcError(f"the compile's work area '{p}' holds a symbolic link ('{link.relative_to(p)}'), which "
                            f"lmmc never makes; it was left untouched: move or delete it yourself, or choose "
                            f"another --out")

    def _owner_words(self) -> str:
        owner = _read_json(self.path / OWNER_FILE) or {}
        if "pid" not in owner:
            return "owner unknown"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(owner.get("started", 0)))
        return f"pid {owner['pid']} on {owner.get('host', '?')}, started {started}"

    def _clear_dead_run(self) -> None:
        """Empty the area of a run that died (its lock is free), keeping only the lock file we hold."""
        leftovers = [c for c in self.path.iterdir() if c.name != LOCK_FILE]
        if not leftovers:
            return
        replaced = self.path / REPLACED_DIR
        if replaced.is_dir() and not replaced.is_symlink() and not os.path.lexists(self.out):
            # killed between moving the earlier output aside and moving the new one in: the earlier goes back
            replaced.rename(self.out)
            leftovers.remove(replaced)
            print(f"lmmc: put the earlier output back at '{self.out}': an interrupted compile had moved it aside "
                  f"to '{replaced}' and stopped before its own output took its place", file=sys.stderr)
        state = self.latest_state()
        done = int(state.name[len(STATE_PREFIX):]) if state else 0
        if state is not None and not self.output.exists():  # only placing the output takes that folder away
            print(f"lmmc: removing '{self.path}', left by a compile ({self._owner_words()}) stopped after it had put "
                  f"its output in place", file=sys.stderr)
        else:
            print(f"lmmc: removing '{self.path}', left by an interrupted compile ({self._owner_words()}, {done} "
                  f"pass(es) finished); run with --resume to continue such a compile instead", file=sys.stderr)
        for child in leftovers:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    # --- ending ---------------------------------------------------------------------------------------

    def placing(self) -> None:
        """Mark the area as one whose output is about to move to --out."""
        if self.writer:
            (self.path / PLACING_FILE).touch()

    def finish(self) -> None:
        """The output is in place: drop the area (and its lock)."""
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def discard(self) -> None:
        """Bad input: nothing of this run is worth resuming."""
        self.finish()

    def release(self) -> None:
        """Unlock, keeping what was saved for --resume."""
        if not self.writer and self.output != self.path / OUTPUT_DIR:
            shutil.rmtree(self.output, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # --- state after each pass ------------------------------------------------------------------------

    def scratch(self, index: int, name: str) -> Path:
        """The folder pass `index` keeps its own resumable state in (distillation checkpoints)."""
        return self.path / f"pass-{index:02d}-{name}"

    def kept_passes(self) -> int:
        """How many finished passes a --resume would skip, by the last whole state saved; a state whose writing
        failed (a full disk) is removed, giving its space back."""
        for partial in self.path.glob(f".{STATE_PREFIX}*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
        state = self.latest_state()
        return int(state.name[len(STATE_PREFIX):]) if state else 0

    def latest_state(self) -> Path | None:
        if not self.path.is_dir():
            return None
        states = sorted(p for p in self.path.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX)
                        and p.name[len(STATE_PREFIX):].isdigit())
        return states[-1] if states else None

    def save(self, art: Artifact, done: int, seconds: float) -> None:
        """Record what the passes after the first `done` need. Written under a temporary name and renamed,
        so a kill leaves either the whole state or none of it."""
        if not self.writer:
            return
        target = self.path / f"{STATE_PREFIX}{done:02d}"
        tmp = self.path / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_student_weights(art.student, tmp / "student", {})
        if art.masks:
            save_tensors({k: v.detach().cpu().contiguous() for k, v in art.masks.items()}, tmp / "masks.safetensors")
        _write_json(tmp / "state.json", {
            # how many masks the state holds: a masks file gone missing must not resume as a dense student
            "passes_done": done, "seconds": seconds, "masks": len(art.masks), "allocation": art.allocation,
            "records": [asdict(r) for r in art.records], "validation": art.validation,
            "onnx": {k: str(Path(v).relative_to(self.output)) for k, v in art.onnx.items()},
            "exports": [{**asdict(e), "path": str(Path(e.path).relative_to(self.output))} for e in art.exports],
        })
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        for old in self.path.iterdir():
            if old != target and (old.name.startswith(STATE_PREFIX) or old.name.startswith("pass-")):
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, art: Artifact) -> tuple[int, float]:
        """Load the newest saved state into `art`; return (finished passes, seconds they took)."""
        state_dir = self.latest_state()
        if state_dir is None:
            return 0, 0.0
        state = _read_json(state_dir / "state.json")
        if state is None:
            raise LmmcError(f"the saved state '{state_dir}' is unreadable; run without --resume to start afresh")
        try:
            art.student = load_student(state_dir / "student").to(art.device)
            masks = state_dir / "masks.safetensors"
            art.masks = {k: v.to(art.device) for k, v in load_file(str(masks)).items()} if state["masks"] else {}
            if len(art.masks) != state["masks"]:
                raise ValueError(f"{masks.name} holds {len(art.masks)} masks, and {state['masks']} were saved")
            art.allocation = state["allocation"]
            art.records = [PassRecord(**r) for r in state["records"]]
            art.validation = state["validation"]
            # Rank 0's files: the other ranks read the ONNX files where rank 0 wrote them.
            output = self.path / OUTPUT_DIR
            art.onnx = {k: _inside(output, v) for k, v in state["onnx"].items()}
            art.exports = [ExportRecord(**{**e, "path": _inside(output, e["path"])}) for e in state["exports"]]
            return state["passes_done"], state["seconds"]
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:  # a truncated or edited file
            raise LmmcError(f"the saved state '{state_dir}' is damaged ({type(err).__name__}: {err}); run without "
                            f"--resume to start afresh") from None
