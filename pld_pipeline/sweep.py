"""Cheap student sweeps over one cache: a grid or list of ordinary `distill` runs, then one report.

Each run is a normal run directory under the sweep directory, named by its settings. A finished run (with
``summary.json``) is skipped on rerun, a started one resumes. ``jobs > 1`` runs several at once in separate
processes, splitting CPU threads between them and giving each its own GPU where several exist. The cache is
only ever opened read-only, and no teacher is loaded.
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import statistics
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, Callable

from .distill import STATE_FILE, DistillConfig, distill

ProgressFn = Callable[[dict[str, Any]], None]
_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
_NOT_SWEPT = {"out", "resume"}


def _check_key(key: str) -> str:
    if key not in _FIELDS or key in _NOT_SWEPT:
        allowed = ", ".join(sorted(k for k in _FIELDS if k not in _NOT_SWEPT))
        raise ValueError(f"Unknown sweep setting '{key}'. Use one of: {allowed}.")
    return key


def _convert(key: str, text: str) -> Any:
    """A grid value typed like the DistillConfig field it sets."""
    kind = str(_FIELDS[key].type)
    if text.lower() in ("none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("int") or kind == "int | None":
            return int(text)
        if kind.startswith("float") or kind == "float | None":
            return float(text)
        if kind.startswith("bool"):
            return text.lower() in ("1", "true", "yes", "on")
    except ValueError:
        raise ValueError(f"Sweep setting {key}={text!r} must be a {kind.split(' ')[0]}.") from None
    return text


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["loss=pld,kd lr=1e-3,3e-3", "seed=0,1"]`` -> ``{"loss": ["pld", "kd"], "lr": [...], "seed": [0, 1]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        for part in item.split():
            key, sep, values = part.partition("=")
            if not sep or not values:
                raise ValueError(f"Grid entry {part!r} must look like key=v1,v2.")
            key = _check_key(key.replace("-", "_"))
            grid[key] = [_convert(key, v) for v in values.split(",") if v]
    return grid


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["data=...", "epochs=10"]`` -> typed base settings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Setting {item!r} must look like key=value.")
        key = _check_key(key.replace("-", "_"))
        out[key] = _convert(key, value)
    return out


def load_sweep_file(path: str) -> tuple[dict[str, Any], dict[str, list[Any]], list[dict[str, Any]]]:
    """A TOML or YAML file with ``base`` (settings), ``grid`` (lists) and/or ``runs`` (a list of settings)."""
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            doc = yaml.safe_load(f) or {}
        else:
            doc = tomllib.load(f)
    unknown = set(doc) - {"base", "grid", "runs"}
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; use base, grid and runs.")
    base, grid = dict(doc.get("base", {})), {k: list(v) for k, v in doc.get("grid", {}).items()}
    runs = [dict(r) for r in doc.get("runs", [])]
    for key in list(base) + list(grid) + [k for r in runs for k in r]:
        _check_key(key)
    return base, grid, runs


def expand(grid: dict[str, list[Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, for each listed run (or once when no runs are listed)."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    out = [{**r, **c} for r in (runs or [{}]) for c in combos]
    if not out or out == [{}]:
        raise ValueError("The sweep has no runs: give --grid key=v1,v2 or runs in the sweep file.")
    return out


def run_name(overrides: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in sorted(overrides.items())]
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", "__".join(parts))[:200] or "run"


def _run_one(base: dict[str, Any], overrides: dict[str, Any], out: str) -> dict[str, Any]:
    done = os.path.join(out, "summary.json")
    resume = os.path.isfile(os.path.join(out, STATE_FILE))
    summary = distill(DistillConfig(**{**base, **overrides, "out": out, "resume": resume}))
    with open(done, "w") as f:
        json.dump({**summary, "overrides": overrides}, f, indent=1)
    return summary




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
    import multiprocessing

    import torch
    # A spawned job inherits "spawn" as its default start method, so its DataLoader would start a fresh
    # interpreter (re-importing torch) for every worker of every epoch: measured 5x slower runs. Jobs are
    # spawned for isolation; inside one, the platform default (fork on Linux) is what DataLoader expects.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    torch.set_num_threads(threads)
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())  # before any CUDA call in this process


def run_sweep(base: dict[str, Any], grid: dict[str, list[Any]], runs: list[dict[str, Any]], out: str, *,
              jobs: int = 1, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Run every configuration not yet finished, then write the report. Returns the report rows."""
    emit = progress or (lambda event: None)
    plan = expand(grid, runs)
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}.")
    for key in list(base) + [k for p in plan for k in p]:
        _check_key(key)
    missing = [k for k in ("data", "student") if k not in base and not all(k in p for p in plan)]
    if missing:
        raise ValueError(f"The sweep needs {', '.join(missing)} (in base settings or in every run).")
    os.makedirs(out, exist_ok=True)
    named = {run_name(o): o for o in plan}
    if len(named) != len(plan):
        raise ValueError("Two runs of the sweep have the same settings; remove the duplicate.")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"base": base, "grid": grid, "runs": runs, "names": named}, f, indent=1, default=str)
    todo = {n: o for n, o in named.items() if not os.path.isfile(os.path.join(out, n, "summary.json"))}
    emit({"event": "sweep_start", "runs": len(named), "todo": len(todo), "jobs": jobs})
    base = {**base, "device": base.get("device", "auto")}
    if jobs == 1 or len(todo) <= 1:
        for name, overrides in todo.items():
            _run_one(base, overrides, os.path.join(out, name))
            emit({"event": "run_done", "name": name})
    else:
        import torch
        gpus = None
        n_gpu = torch.cuda.device_count()
        ctx = get_context("spawn")
        if n_gpu > 1:
            gpus = ctx.Manager().Queue()
            for gpu in job_gpus(jobs, n_gpu, base["device"], os.environ.get("CUDA_VISIBLE_DEVICES")):
                gpus.put(gpu)
            if str(base["device"]).startswith("cuda"):
                base = {**base, "device": "cuda"}  # each job sees exactly its own GPU, as cuda:0
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads, gpus)) as pool:
            futures = {pool.submit(_run_one, base, o, os.path.join(out, n)): n for n, o in todo.items()}
            for fut in as_completed(futures):
                fut.result()
                emit({"event": "run_done", "name": futures[fut]})
    return report(out)


def _runs_in(sweep_dir: str) -> list[tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no sweep.json); run `pld sweep` first.")
    with open(path) as f:
        names = json.load(f)["names"]
    out = []
    for name, overrides in names.items():
        run_dir = os.path.join(sweep_dir, name)
        summary_path = os.path.join(run_dir, "summary.json")
        summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        metrics = [json.loads(line) for line in open(metrics_path)] if os.path.isfile(metrics_path) else []
        out.append((name, overrides, summary, metrics))
    return out


def report(sweep_dir: str) -> list[dict[str, Any]]:
    """(Re)write results.csv, results.md and results.png from the run directories."""
    runs = _runs_in(sweep_dir)
    keys = sorted({k for _, o, _, _ in runs for k in o})
    rows = []
    for name, overrides, summary, metrics in runs:
        rows.append({**{k: overrides.get(k) for k in keys}, "run": name, "done": bool(summary),
                     "epochs_done": len(metrics), "best_val_top1": summary.get("best_val_top1"),
                     "last_val_top1": summary.get("last_val_top1"), "train_seconds": summary.get("train_seconds")})
    with open(os.path.join(sweep_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    groups = _group_by_config(rows, keys)
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write(_markdown(rows, keys, groups))
    _plot(groups, os.path.join(sweep_dir, "results.png"))
    return rows


def _group_by_config(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs that differ only in seed form one configuration (mean +- std over seeds)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = " ".join(f"{k}={r[k]}" for k in keys if k != "seed") or "all"
        groups.setdefault(label, []).append(r)
    return groups


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _markdown(rows: list[dict[str, Any]], keys: list[str], groups: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| " + " | ".join(keys + ["best top-1", "last top-1", "train s", "done"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        cells = [str(r[k]) for k in keys] + [_fmt([r["best_val_top1"]]), _fmt([r["last_val_top1"]]),
                                             f"{r['train_seconds']:.1f}" if r["train_seconds"] else "-",
                                             "yes" if r["done"] else f"{r['epochs_done']} epochs"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "| configuration | runs | best top-1 (mean ± std) | last top-1 (mean ± std) |", "|---|---|---|---|"]
        for label, g in groups.items():
            lines.append(f"| {label} | {len(g)} | {_fmt([r['best_val_top1'] for r in g])} | "
                         f"{_fmt([r['last_val_top1'] for r in g])} |")
    return "\n".join(lines) + "\n"


def _plot(groups: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(groups)
    means, errs = [], []
    for g in groups.values():
        vals = [r["best_val_top1"] for r in g if r["best_val_top1"] is not None]
        means.append(statistics.mean(vals) if vals else 0.0)
        errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4), dpi=120)
    ax.bar(range(len(labels)), means, yerr=errs, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("best validation top-1 (%)")
    lo = min((m - e for m, e in zip(means, errs)), default=0)
    ax.set_ylim(max(0, lo - 5), min(100, max(means, default=100) + 5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
