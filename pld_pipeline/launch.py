"""Where a sweep's runs execute: here (one after another, or a process pool), on a Ray cluster, or anywhere
else as printed ``pld distill`` command lines (SLURM job arrays, Kubernetes job lists).

Every launcher runs the same thing: one ordinary ``distill`` run per run directory, resumed when the
directory holds a started run. On Ray a run is a task with its own CPUs and GPUs; a task whose worker dies
(a killed process, a lost node) is retried by Ray and the retry resumes from the run's last finished epoch.
A run of several processes (``procs_per_run > 1``) is started with ``torchrun`` inside its task.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shlex
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Callable

from .files import STATE_FILE
from .options import require_module

# distill (torch) is imported where a run is built or trained: `pld report` reads sweeps without torch.

LAUNCHERS = ("local", "ray")
ProgressFn = Callable[[dict[str, Any]], None]
# Settings that name local files: made absolute before they travel to another process or machine.
_PATH_SETTINGS = ("data", "val_data", "cache", "cache_dir", "init_checkpoint", "online_teacher_checkpoint", "out",
                  "sweep", "class_map")
# Environment a Ray task gets from the driver: tracking, object-store and hub credentials, debugging.
_PASSED_ENV = ("MLFLOW_", "WANDB_", "AWS_", "HF_", "PLD_", "FSSPEC_", "GOOGLE_")


@dataclass(frozen=True)
class Launch:
    kind: str = "local"
    jobs: int = 1  # local: runs at once
    address: str | None = None  # ray: cluster address (None: start a local Ray instance; "auto": this node's cluster)
    cpus_per_run: float = 1.0  # ray: CPUs reserved per run (torch threads follow)
    gpus_per_run: float = 0.0  # ray: GPUs reserved per run (a run with procs_per_run > 1 needs one per process)
    procs_per_run: int = 1  # ray: processes of one DDP run (torchrun inside the task)
    max_retries: int = 3  # ray: retries of a run whose worker died; each retry resumes

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise ValueError(f"Unknown --launcher '{self.kind}'. Use one of: {', '.join(LAUNCHERS)}.")
        if self.kind == "ray":
            require_module("ray", "--launcher ray", "ray")
        if self.jobs < 1 or self.procs_per_run < 1 or self.cpus_per_run <= 0 or self.gpus_per_run < 0:
            raise ValueError("--jobs, --procs-per-run and --cpus-per-run must be >= 1 (CPUs > 0) and --gpus-per-run >= 0.")
        if self.kind == "local" and (self.procs_per_run > 1 or self.address):
            raise ValueError("--procs-per-run and --ray-address need --launcher ray (locally, run one DDP run with "
                             "torchrun ... pld distill).")


def absolute(settings: dict[str, Any]) -> dict[str, Any]:
    """Local paths (not URLs or ``pipe:`` commands) made absolute: another machine has another working directory."""
    out = dict(settings)
    for key in _PATH_SETTINGS:
        value = out.get(key)
        if isinstance(value, str) and "://" not in value and not value.startswith("pipe:"):
            out[key] = os.path.abspath(value)
    return out


# -- the command line of one run ------------------------------------------------------------------------------
def distill_argv(settings: dict[str, Any]) -> list[str]:
    """The ``pld distill`` arguments that make exactly ``DistillConfig(**settings)`` (defaults left out)."""
    from .distill import DistillConfig
    cfg = DistillConfig(**settings)
    defaults = DistillConfig(data="", out="", student="")
    argv = ["--data", cfg.data, "--student", cfg.student, "--out", cfg.out]
    for f in dataclasses.fields(DistillConfig):
        name, value = f.name, getattr(cfg, f.name)
        if name in ("data", "student", "out") or value == getattr(defaults, name):
            continue
        flag = "--" + name.replace("_", "-")
        if name == "recipe":
            argv += [arg for key in ("name", "size", "pad") if key in value
                     for arg in (("--recipe" if key == "name" else f"--{key}"), str(value[key]))]
            unknown = set(value) - {"name", "size", "pad"}
            if unknown:
                raise ValueError(f"recipe settings {sorted(unknown)} have no `pld distill` option; use a cache.")
        elif name in ("channels_last", "amp"):
            argv.append(f"--no-{name.replace('_', '-')}")  # their defaults are True: only the opt-out is a flag
        elif isinstance(value, bool):
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def _resuming(settings: dict[str, Any]) -> dict[str, Any]:
    """The run's settings, resuming when its directory already holds a started run (a crash, a retried task)."""
    return {**settings, "resume": os.path.isfile(os.path.join(settings["out"], STATE_FILE))}


def command_line(settings: dict[str, Any], program: str = "pld") -> str:
    """One shell line that runs (or resumes) this run."""
    argv = distill_argv(_resuming(absolute(settings)))
    return " ".join(shlex.quote(a) for a in [*program.split(), "distill", *argv])


# -- running one -----------------------------------------------------------------------------------------------
def run_one(settings: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) one run in this process; its summary.json marks it finished."""
    from .distill import DistillConfig, distill
    return distill(DistillConfig(**_resuming(settings)))


def run_task(settings: dict[str, Any], procs: int, cpus: float) -> str:
    """A Ray task: one run, resumed if a previous attempt (a killed worker) left a state behind."""
    import torch
    if str(settings.get("device", "auto")).startswith("cuda:"):
        settings = {**settings, "device": "cuda"}  # Ray already narrowed CUDA_VISIBLE_DEVICES to this task's GPUs
    if procs == 1:
        torch.set_num_threads(max(1, int(cpus)))
        run_one(settings)
        return settings["out"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "pld_pipeline", "distill", *distill_argv(_resuming(settings)), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(cpus // procs)))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"torchrun run {settings['out']} failed (exit {done.returncode}): {tail[0]}")
    return settings["out"]


# -- the launchers ---------------------------------------------------------------------------------------------
def launch(runs: dict[str, dict[str, Any]], how: Launch, emit: ProgressFn) -> None:
    """Run every run in ``runs`` (name -> full settings); ``run_done`` is emitted as each finishes."""
    if not runs:
        return
    if how.kind == "ray":
        _on_ray(runs, how, emit)
    elif how.jobs == 1 or len(runs) == 1:
        for name, settings in runs.items():
            run_one(settings)
            emit({"event": "run_done", "name": name})
    else:
        _in_pool(runs, how.jobs, emit)


def job_gpus(jobs: int, n_gpu: int, device: str, visible: str | None) -> list[str]:
    """What each parallel job's CUDA_VISIBLE_DEVICES becomes: the parent's *physical* ids (its own
    CUDA_VISIBLE_DEVICES, when set, lists them; ids or UUIDs), dealt round-robin, or all on one GPU when
    ``device`` names an index (relative to the parent's visible GPUs, as torch counts them)."""
    physical = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n_gpu)]
    physical = physical[:n_gpu]
    index = torch_device_index(device)
    if index is not None:
        if index >= len(physical):
            raise ValueError(f"--device {device}: only {len(physical)} GPU(s) are visible.")
        return [physical[index]] * jobs
    return [physical[i % len(physical)] for i in range(jobs)]


def torch_device_index(device: str) -> int | None:
    kind, _, index = str(device).partition(":")
    return int(index) if kind == "cuda" and index else None


def _init_worker(threads: int, gpus: Any) -> None:
    import torch
    # A job inherits its pool's start method as its default, so its DataLoader would start a fresh interpreter
    # (re-importing torch) for every worker of every epoch: measured 5x slower runs. Jobs start from a clean
    # server process for isolation; inside one, the platform default (fork on Linux) is what DataLoader expects.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    torch.set_num_threads(threads)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())  # before any CUDA call in this process


def _in_pool(runs: dict[str, dict[str, Any]], jobs: int, emit: ProgressFn) -> None:
    import torch
    gpus = None
    n_gpu = torch.cuda.device_count()
    # Jobs fork from a server process started clean (no CUDA, none of this process's threads) that has imported
    # torch, timm and the trainer once, instead of each job spawning an interpreter that imports them again
    # (~10 s of CPU each). Where there is no fork server (Windows), jobs are spawned.
    methods = multiprocessing.get_all_start_methods()
    ctx = get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["pld_pipeline.distill"])
    device = str(next(iter(runs.values())).get("device", "auto"))
    if n_gpu > 1:
        gpus = ctx.Manager().Queue()
        for gpu in job_gpus(jobs, n_gpu, device, os.environ.get("CUDA_VISIBLE_DEVICES")):
            gpus.put(gpu)
        if device.startswith("cuda"):
            runs = {n: {**s, "device": "cuda"} for n, s in runs.items()}  # each job sees exactly its own GPU
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, gpus)) as pool:
        futures = {pool.submit(run_one, settings): name for name, settings in runs.items()}
        for fut in as_completed(futures):
            fut.result()
            emit({"event": "run_done", "name": futures[fut]})


def _on_ray(runs: dict[str, dict[str, Any]], how: Launch, emit: ProgressFn) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--launcher ray needs Ray: pip install 'pld-pipeline[ray]'.") from None
    env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV)}
    if any("mlflow" in str(s.get("log") or "") for s in runs.values()) and "MLFLOW_TRACKING_URI" not in env:
        import mlflow
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # the driver's (absolute) store, not each worker's cwd
    started_here = not ray.is_initialized()
    if started_here:
        local = {} if how.address else {"include_dashboard": False}  # options only a new instance takes
        ray.init(address=how.address, runtime_env={"env_vars": env}, log_to_driver=False, configure_logging=False,
                 **local)
    try:
        task = ray.remote(run_task).options(num_cpus=how.cpus_per_run, num_gpus=how.gpus_per_run,
                                            max_retries=how.max_retries, retry_exceptions=False)
        pending = {task.remote(absolute(s), how.procs_per_run, how.cpus_per_run): n for n, s in runs.items()}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                name = pending.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the run itself failed: its own one-line error
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, Exception) else RuntimeError(f"run {name} failed: {e}")) from None
                except ray.exceptions.RayError as e:  # its worker died more than max_retries times
                    raise RuntimeError(f"run {name} failed on Ray after {how.max_retries} retries: "
                                       f"{type(e).__name__}; rerun the sweep to resume it.") from None
                emit({"event": "run_done", "name": name})
    finally:
        if started_here:
            ray.shutdown()
