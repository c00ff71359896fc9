"""torch.distributed plumbing for torchrun: rank/world from the environment, gloo on CPU, nccl on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    """An integer that torchrun (or SLURM) sets in the environment; a stray value is named, not a bare
    "invalid literal for int()"."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"Environment variable {name}={text!r} is not an integer; torchrun sets it (unset it when "
                         "not running under torchrun).") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device this process uses. ``auto``: a GPU when CUDA is present, else the CPU. ``cuda`` (no index)
    and ``auto`` take GPU ``LOCAL_RANK % visible GPUs``: one process per GPU under torchrun, and one visible GPU
    per process (SLURM style) works too. An explicit ``cuda:N`` under torchrun is refused: every rank would take
    the same GPU (NCCL: "Duplicate GPU detected")."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but no GPU is visible; use --device cpu.")
    world = env_int("WORLD_SIZE", 1)
    if dev.index is not None and world > 1:
        raise ValueError(f"--device {device} names one GPU, but torchrun started {world} processes and each would "
                         "take it; use --device cuda (each process takes GPU LOCAL_RANK).")
    if dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    elif dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible.")
    torch.cuda.set_device(dev)
    return dev


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning on a GPU (fixed input sizes: the fastest kernels are worth the first steps' search), or,
    with ``deterministic``, only deterministic kernels so that a resumed run repeats the uninterrupted one bit for
    bit on CUDA too (cuDNN conv and pooling backward and ``scatter_add_`` are otherwise nondeterministic there).
    An op without a deterministic CUDA kernel then raises, naming itself, instead of silently differing."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GPU op
    torch.use_deterministic_algorithms(deterministic)  # the run's setting, not a leftover of an earlier run
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader decode workers per process: as asked, else 2 on a CPU (the cores train the model) and on a GPU
    the cores of this process's share of the machine, up to 8 (JPEG decoding feeds the GPU)."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--workers must be >= 0, got {requested}.")
        return requested
    if device.type != "cuda":
        return 2
    per_process = (os.cpu_count() or 2) // max(1, env_int("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, per_process - 1))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process)."""
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # Ranks own whole shards and may wait long at the final barrier while others work: NCCL's default
        # 10-minute watchdog would abort them. device_id binds NCCL to this rank's GPU up front.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=6),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", 0))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
