"""Training plumbing for fine-tuning passes: learning-rate schedule, torch.distributed set-up and
collectives, sharding a model over the ranks with torch's FSDP2, and checkpoints (safetensors + JSON,
written atomically) that a run can resume from."""

from __future__ import annotations

import atexit
import contextlib
import copy
import fcntl
import functools
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from lmmc.errors import LmmcError
from lmmc.student import save_tensors


def lr_multiplier(step: int, total: int, warmup: int, final_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `final_ratio` of the peak at `total`.

    `step` is the 0-based index of the optimiser step about to be taken, so step 0 already learns."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def progress_multiplier(progress: float, warmup: float, final_ratio: float) -> float:
    """lr_multiplier over the fraction of the run done rather than steps, for a run that ends on a clock:
    linear warm-up over the first `warmup` of it, then cosine decay to `final_ratio` at 1."""
    if progress < warmup:
        return progress / warmup
    rest = (progress - warmup) / (1.0 - warmup)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, rest)))


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a torch.distributed job; a plain run is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # a process group of its own for the objective's collectives

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


_GROUP: Any = None


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def setup_distributed(device: torch.device) -> Distributed:
    """Join the job torchrun (or the caller) started; gloo on CPU, NCCL on GPU.

    A process group someone already initialised is used as it is; a single process stays single."""
    if not dist.is_available():
        return Distributed()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Distributed()
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        # Left to the interpreter's teardown, a gloo group aborted the process in about one exit in three
        # ("terminate called without an active exception"), and torchrun reported a finished rank as failed.
        atexit.register(_leave_group)
    world = dist.get_world_size()
    if world <= 1:
        return Distributed()
    global _GROUP
    if _GROUP is None:
        # Collectives issued inside backward (gathering embeddings) get their own group so they can never
        # interleave with DDP's gradient buckets on the default one. One per process: a schedule that
        # distils between pruning segments sets up many runs.
        _GROUP = dist.new_group(backend=dist.get_backend())
    return Distributed(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", dist.get_rank())), _GROUP)


def all_reduce_sum(values: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, group=ctx.group)
    return values


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own slice, so a loss over
    the whole gathered batch trains each rank's samples. (Gloo has no reduce_scatter; all_reduce and
    slicing does the same job.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def gather(x: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """Every rank's rows of `x`, in rank order; differentiable when `x` requires grad."""
    if not ctx.enabled:
        return x
    if x.requires_grad:
        return _GatherWithGrad.apply(x, ctx.group)
    parts = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(parts, x.contiguous(), group=ctx.group)
    return torch.cat(parts)


def barrier(ctx: Distributed) -> None:
    if ctx.enabled:
        dist.barrier(group=ctx.group)


def check_same_run(ctx: Distributed, fingerprint: str) -> None:
    """Every rank must train the same run: ranks given another recipe, data or seed trained a silent mix of
    both, hung after rank 0 wrote its output (another step count), or aborted in a collective."""
    if not ctx.enabled:
        return
    prints: list[Any] = [None] * ctx.world
    dist.all_gather_object(prints, fingerprint, group=ctx.group)
    other = next((r for r, p in enumerate(prints) if p != prints[0]), None)
    if other is not None:
        raise LmmcError(f"distill: rank {other} of this torchrun job would train another run than rank 0 (its "
                        f"recipe, data, seed or starting student differ: {prints[other]} against {prints[0]}); "
                        f"start every rank with the same command, recipe and data")


# --- sharding with FSDP2 ------------------------------------------------------------------------------

def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


# torch's FSDP and DTensor packages take seconds to import, and only a sharded run needs them: they are
# imported by shard_copy, and until then no tensor can be a DTensor nor a module an FSDP unit.
def _is_dtensor(x: Any) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(x, tensor.DTensor)


def _is_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if _is_dtensor(x) else x


def _average_over_ranks(grad: torch.Tensor, group: Any) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad / dist.get_world_size(group)


def shard_copy(model: nn.Module, units: list[str], device: torch.device, group: Any = None) -> nn.Module:
    """A copy of `model` sharded over every rank with torch's FSDP2 (`fully_shard`): each unit (a
    transformer block, by its dotted name) is one FSDP unit whose parameters are gathered for its own
    forward and backward only; the root holds the rest. Every rank keeps 1/world of each parameter, and
    the gradients and optimiser state made for the copy are sharded the same way.

    The copy is built on the meta device and filled from `model` one parameter at a time, so the full
    model is never held twice; then `model`'s parameters are emptied (their storage freed) until
    `unshard_into` refills them. The copy shares `model`'s own attributes (configuration, the process
    group); its modules and buffers are copies.

    `copy.as_forward(fn, *args)` runs fn as part of the root's forward: code that calls parts of the
    model directly (an evaluation) then finds the root's parameters gathered, and each unit gathers its
    own when it runs, exactly as in a forward.

    FSDP2 cannot shard a scalar (a CLIP's logit scale): scalars stay whole on every rank, outside FSDP,
    and a gradient they get is averaged over the ranks of `group` (one of its own, so it cannot interleave
    with FSDP's collectives), as DDP and FSDP average every other gradient."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    memo: dict[int, Any] = {id(v): v for k, v in vars(model).items() if not k.startswith("_")}
    memo |= {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
             for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    scalars = {p for p in twin.parameters() if p.dim() == 0}
    for name in units:
        fully_shard(twin.get_submodule(name), mesh=mesh, ignored_params=scalars)
    fully_shard(twin, mesh=mesh, ignored_params=scalars)
    twin.to_empty(device=device)
    plain = dict(model.named_parameters())
    with torch.no_grad():
        buffers = dict(model.named_buffers())
        for name, buf in twin.named_buffers():
            buf.copy_(buffers[name])
        for name, param in twin.named_parameters():
            _local(param).copy_(_local(shard_like(plain[name].detach(), param)))
            plain[name].data = torch.empty(0, dtype=param.dtype, device=plain[name].device)
            if param.dim() == 0 and param.requires_grad:
                param.register_hook(functools.partial(_average_over_ranks, group=group))
    twin.as_forward = _call
    register_fsdp_forward_method(twin, "as_forward")
    return twin


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor, placed as the sharded `like` (returned as it is when `like`
    is not sharded). Every rank holds the full tensor, so nothing is sent."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective: every rank calls it), or `x` as it is."""
    return x.full_tensor() if _is_dtensor(x) else x


def whole(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Each tensor whole, gathered one at a time (every rank calls this); returned only where `keep`, so
    the other ranks never hold more than one whole tensor."""
    out = {}
    for name, value in tensors.items():
        value = full_tensor(value.detach())
        if keep:
            out[name] = value
    return out


def run_gathered(model: nn.Module, fn, *args, **kwargs):
    """fn(*args) with `model`'s parameters reachable as in its forward: for a shard_copy, the root's are
    gathered for the call and freed after it."""
    if not _is_fsdp(model):
        return fn(*args, **kwargs)
    try:
        return model.as_forward(fn, *args, **kwargs)
    finally:
        model.reshard()


def unshard_into(model: nn.Module, sharded: nn.Module) -> None:
    """Refill `model` (emptied by shard_copy) with the sharded copy's weights, whole, on every rank; one
    parameter is gathered at a time."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            params[name].data = full_tensor(param.detach()).to(params[name].device).clone()


def optimizer_tensors(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state as flat named tensors ("<index>.<key>"), for safetensors.

    Sharded state is gathered whole as by `whole` (every rank calls this; only `keep` returns it), so a
    checkpoint is the same whether the run was sharded or not."""
    flat = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimiser state '{key}' is not a tensor; it cannot go to safetensors")
            flat[f"{index}.{key}"] = value
    return {k: v.cpu().contiguous() for k, v in whole(flat, keep).items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of optimizer_tensors. Hyper-parameters stay the optimiser's own: the learning rate is set
    from the step number on every step, so the state is all a resumed run needs. A sharded parameter's
    state is cut to this rank's shard (scalars such as Adam's step count stay whole)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        like = params[int(index)]
        state.setdefault(int(index), {})[key] = shard_like(value, like) if value.shape == like.shape else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


LOCK_FILE = ".lock"  # held by the run writing a checkpoint folder


class Checkpoints:
    """One run's checkpoints under `root/<fingerprint>/`: `step-N/` (resumable, the newest `keep_last`
    kept), `best/` (weights of the best held-out score) and `final/` (the finished run).

    Every checkpoint is written to a temporary directory and renamed into place, so a crash can leave
    a stale temporary directory behind but never a half-written checkpoint under a real name. The
    fingerprint ties checkpoints to the run that wrote them: a different config or starting student
    gets a directory of its own instead of silently resuming someone else's weights."""

    def __init__(self, root: Path, fingerprint: str, keep_last: int) -> None:
        self.dir = Path(root) / fingerprint
        self.keep_last = keep_last
        self._clear_dead()

    def _clear_dead(self) -> None:
        """Temporary directories of a process that died while saving: a checkpoint it had moved aside but
        not yet replaced is put back, the rest removed."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.iterdir()):
            match = re.fullmatch(r"\.(.+)\.(tmp|old)-(\d+)", path.name)
            if not match or not path.is_dir() or _alive(int(match[3])):
                continue
            name, kind = match[1], match[2]
            if kind == "old" and not (self.dir / name).exists():
                path.rename(self.dir / name)
            else:
                shutil.rmtree(path, ignore_errors=True)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """This run's hold on its folder for as long as it trains. Two live runs of one fingerprint (two
        compiles given the same checkpoint_dir) would rename over each other's saves and prune each other's
        steps; the second is refused. A file opened for writing, as NFS's emulated flock needs; on a
        filesystem that has no locks the run goes on without one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LmmcError(f"another distillation with the same settings and starting student is writing its "
                                f"checkpoints to '{self.dir}' now; wait for it to finish, or give this run a "
                                f"checkpoint_dir of its own") from None
            except OSError:
                pass
            yield
        finally:
            os.close(fd)

    def save(self, name: str, files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> Path:
        target = self.dir / name
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for stem, tensors in files.items():
            save_tensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                         tmp / f"{stem}.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if target.exists():
            old = self.dir / f".{name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
        if name.startswith("step-"):
            for stale in self.step_dirs()[:-self.keep_last]:
                shutil.rmtree(stale, ignore_errors=True)
        return target

    def step_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step-")),
                      key=lambda p: int(p.name.split("-")[1]))

    def find(self, name: str) -> Path | None:
        path = self.dir / name
        return path if (path / "state.json").is_file() else None

    def latest(self) -> Path | None:
        dirs = [p for p in self.step_dirs() if (p / "state.json").is_file()]
        return dirs[-1] if dirs else None

    @staticmethod
    def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        files = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise LmmcError(f"checkpoint '{path}' is unreadable ({err}); delete it to start afresh") from None
        return files, state
