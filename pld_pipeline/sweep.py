"""Cheap student sweeps over one cache: a grid or list of ordinary `distill` runs, then one report.

Each run is a normal run directory under the sweep directory, named by its settings. A finished run (with
``summary.json``) is skipped on rerun, a started one resumes. Where runs execute is the launcher's business
(launch.py: here, a process pool, Ray, or printed command lines); which runs stop early is Optuna's
successive-halving pruner's (halving.py); tracking is MLflow's, W&B's and TensorBoard's (tracking.py). The
cache is only ever opened read-only, and no teacher is loaded.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
import os
import re
import secrets
import statistics
import tomllib
from typing import Any, Callable

from .errors import MetadataError
from .files import (
    SUMMARY_FILE, check_owner, json_field, read_bytes, read_json, refuse_link, write_bytes, write_json, write_text,
)
from .halving import HalvingRule
from .launch import Launch, command_line
from .launch import launch as launch_runs
from .options import require_module
from .sweep_watch import SweepWatch
from .tracking import finish_sweep_parent, parse_log, sweep_parent

ProgressFn = Callable[[dict[str, Any]], None]


@functools.cache
def _fields() -> dict[str, dataclasses.Field]:
    """DistillConfig's fields, imported on first use: `pld report` reads a sweep without torch."""
    from .distill import DistillConfig
    return {f.name: f for f in dataclasses.fields(DistillConfig)}


_NOT_SWEPT = {"out", "resume", "sweep"}
_NONCE = re.compile(r"[0-9a-f]{32}")  # sweep.json's id of the sweep: each run's config.json records it
_PLAIN_NAME = re.compile(r"(?!\.\.?$)[^/\\\x00]{1,255}")  # one folder name inside the sweep folder


def _check_key(key: str) -> str:
    if key not in _fields() or key in _NOT_SWEPT:
        allowed = ", ".join(sorted(k for k in _fields() if k not in _NOT_SWEPT))
        raise ValueError(f"Unknown sweep setting '{key}'. Use one of: {allowed}.")
    return key


def _convert(key: str, text: str) -> Any:
    """A grid value typed like the DistillConfig field it sets."""
    kind = str(_fields()[key].type)
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
    data = read_bytes(path)  # a regular file of bounded size: not /dev/zero, not a FIFO
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            doc = yaml.safe_load(data) or {}
        except yaml.YAMLError as e:
            raise MetadataError(f"{path}: not valid YAML ({' '.join(str(e).split())}); fix the file.") from None
    else:
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise MetadataError(f"{path}: not valid TOML ({e}); fix the file.") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"{path}: expected sections base, grid and runs, got a {type(doc).__name__}.")
    for section, kind in (("base", dict), ("grid", dict), ("runs", list)):
        if not isinstance(doc.get(section, kind()), kind):
            raise MetadataError(f"{path}: section {section} invalid (must be a {'table' if kind is dict else 'list'}).")
    if not all(isinstance(v, list) for v in doc.get("grid", {}).values()) or not all(
            isinstance(r, dict) for r in doc.get("runs", [])):
        raise MetadataError(f"{path}: every grid entry must be a list and every run a table.")
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


def run_sweep(base: dict[str, Any], grid: dict[str, list[Any]], runs: list[dict[str, Any]], out: str, *,
              launch: Launch = Launch(), halving: HalvingRule | None = None,
              progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Run every configuration not yet finished, then write the report. Returns the report rows."""
    emit = progress or (lambda event: None)
    if halving is not None:  # every run opens the study: refuse before sweep.json or a run folder is written
        require_module("optuna", "--scheduler halving", "halving")
    parse_log(base.get("log"))  # a tracker that is not installed, too
    todo = plan_sweep(base, grid, runs, out, halving)
    names = _read_plan(out)
    emit({"event": "sweep_start", "runs": len(names), "todo": len(todo),
          "jobs": launch.jobs if launch.kind == "local" else launch.kind})
    backends = _open_parent(base, grid, out, halving, len(names))
    with SweepWatch(out, todo, emit):  # one run_epoch event per finished epoch of each run, on any launcher
        launch_runs(todo, launch, emit)
    rows = report(out)
    if backends:
        finish_sweep_parent(out, best_run(rows), sweep_nonce(out))
    return rows


def best_run(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep's best: the highest best val top-1 among runs that trained to the end (a run stopped early by
    halving is not a candidate: its number comes from fewer epochs)."""
    finished = [r for r in rows if r["done"] and not r["stopped_after_epochs"] and r["best_val_top1"] is not None
                and not math.isnan(r["best_val_top1"])]
    return max(finished, key=lambda r: r["best_val_top1"], default=None)


def pending_commands(base: dict[str, Any], grid: dict[str, list[Any]], runs: list[dict[str, Any]], out: str,
                     halving: HalvingRule | None = None, program: str = "pld") -> list[str]:
    """One ``pld distill`` line per pending run, for any scheduler (SLURM arrays, Kubernetes jobs): each line
    carries ``--sweep``, so halving and tracking work as under ``pld sweep``; ``pld report`` gathers the results."""
    todo = plan_sweep(base, grid, runs, out, halving)
    _open_parent(base, grid, out, halving, len(_read_plan(out)))
    return [command_line(settings, program) for settings in todo.values()]


def _open_parent(base: dict[str, Any], grid: dict[str, list[Any]], out: str, halving: HalvingRule | None,
                 runs: int) -> tuple[str, ...]:
    """The sweep's tracked parent run (when --log asks for tracking): its settings, grid and scheduler."""
    backends = parse_log(base.get("log"))
    if backends:
        sweep_parent(backends, out, {**base, **{f"grid.{k}": v for k, v in grid.items()},
                                     "scheduler": halving.to_dict() if halving else None, "runs": runs},
                     sweep_nonce(out))
    return backends


def _check_pinned_caches(base: dict[str, Any], plan: list[dict[str, Any]]) -> None:
    """A pinned cache (``expect_digest``) whose digest differs is refused before any run starts or anything is
    written (each run checks it again when it opens the cache); one check per distinct cache."""
    from .cache import Cache
    checked = set()
    for overrides in plan:
        s = {**base, **overrides}
        if s.get("expect_digest") is None:
            continue
        if not s.get("cache"):
            raise ValueError("expect_digest pins a teacher cache; give the cache too (--cache or cache=...).")
        key = (s["cache"], s.get("cache_dir"), s["expect_digest"])
        if key not in checked:
            Cache(s["cache"], cache_dir=s.get("cache_dir"), expect_digest=s["expect_digest"])
            checked.add(key)


def plan_sweep(base: dict[str, Any], grid: dict[str, list[Any]], runs: list[dict[str, Any]], out: str,
               halving: HalvingRule | None = None) -> dict[str, dict[str, Any]]:
    """Check the sweep, record it in ``out/sweep.json`` and return the pending runs (name -> full settings).

    A finished run (``summary.json``: trained to the end, or stopped by halving) is not pending; a started one
    is, and resumes."""
    plan = expand(grid, runs)
    for key in list(base) + [k for p in plan for k in p]:
        _check_key(key)
    missing = [k for k in ("data", "student") if k not in base and not all(k in p for p in plan)]
    if missing:
        raise ValueError(f"The sweep needs {', '.join(missing)} (in base settings or in every run).")
    if halving is not None and not base.get("val_data") and not all(p.get("val_data") for p in plan):
        raise ValueError("--scheduler halving compares runs by validation top-1: give --val-data.")
    _check_pinned_caches(base, plan)
    parse_log(base.get("log"))
    os.makedirs(out, exist_ok=True)
    named = {run_name(o): o for o in plan}
    if len(named) != len(plan):
        raise ValueError("Two runs of the sweep have the same settings; remove the duplicate.")
    plan_path = os.path.join(out, "sweep.json")
    nonce = sweep_nonce(out) if os.path.lexists(plan_path) else secrets.token_hex(16)
    for n in named:
        refuse_link(os.path.join(out, n))  # a run folder planted as a link would send the run's writes elsewhere
        check_own_run(out, os.path.join(out, n), nonce)
    write_json(plan_path, {"base": base, "grid": grid, "runs": runs, "names": named, "nonce": nonce,
                           "scheduler": halving.to_dict() if halving else None}, default=str)
    base = {**base, "device": base.get("device", "auto"), "sweep": os.path.abspath(out)}
    return {n: {**base, **o, "out": os.path.join(out, n)} for n, o in named.items()
            if not os.path.isfile(os.path.join(out, n, SUMMARY_FILE))}


def sweep_nonce(sweep_dir: str) -> str:
    """The sweep's id (``nonce`` in its sweep.json, which the user must own): each run records it in its
    config.json, and a sweep continues only the runs that record it."""
    path = os.path.join(sweep_dir, "sweep.json")
    refuse_link(path)  # the sweep rewrites it: a link is refused before it is read
    check_owner(path)
    nonce = json_field(read_json(path), path, "nonce", kind=str)
    if not _NONCE.fullmatch(nonce):
        raise MetadataError(f"{path}: field nonce invalid; restore the file or rerun `pld sweep` into a new folder.")
    return nonce


def check_own_run(sweep_dir: str, run_dir: str, nonce: str | None = None) -> None:
    """Refuse a run folder this sweep did not start: its config.json (the user's own) must record the sweep's id.
    A stranger who can write a shared sweep folder could otherwise plant a run, at its last epoch with weights of
    their choice, that a rerun would adopt as the user's model."""
    nonce = nonce or sweep_nonce(sweep_dir)
    path = os.path.join(run_dir, "config.json")
    if not os.path.lexists(path):
        if os.path.isdir(run_dir) and any(not n.endswith(".tmp") for n in os.listdir(run_dir)):
            raise MetadataError(f"{run_dir} holds files but no config.json: not a run this sweep started; remove the "
                                "folder to run it afresh.")
        return
    check_owner(path)
    if read_json(path).get("sweep_nonce") != nonce:
        raise MetadataError(f"{run_dir} is not a run this sweep started (its config.json does not record the id in "
                            f"{os.path.join(sweep_dir, 'sweep.json')}); remove the folder to run it afresh.")


def _read_plan(sweep_dir: str) -> dict[str, dict[str, Any]]:
    path = os.path.join(sweep_dir, "sweep.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{sweep_dir} is not a sweep directory (no sweep.json); run `pld sweep` first.")
    names = json_field(read_json(path), path, "names", kind=dict)
    for name, overrides in names.items():
        if not _PLAIN_NAME.fullmatch(name) or not isinstance(overrides, dict):
            raise MetadataError(f"{path}: field names.{name[:80]!r} invalid (a run is a plain folder name with a "
                                "dict of settings); restore the file or rerun `pld sweep` into a new folder.")
    return names


def _runs_in(sweep_dir: str) -> list[tuple[str, dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    out = []
    for name, overrides in _read_plan(sweep_dir).items():
        run_dir = os.path.join(sweep_dir, name)
        summary_path = os.path.join(run_dir, SUMMARY_FILE)
        summary = read_json(summary_path) if os.path.isfile(summary_path) else {}
        if not isinstance(summary, dict):
            raise MetadataError(f"{summary_path}: not a JSON object; remove the run folder to rerun it.")
        for key in ("best_val_top1", "last_val_top1", "train_seconds", "stopped_after_epochs"):
            if summary.get(key) is not None:
                json_field(summary, summary_path, key, kind=(int, float))
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        lines = read_bytes(metrics_path).splitlines() if os.path.isfile(metrics_path) else []
        metrics = [line for line in lines if line.strip()]  # only counted: one line per finished epoch
        out.append((name, overrides, summary, metrics))
    return out


def report(sweep_dir: str) -> list[dict[str, Any]]:
    """(Re)write results.csv, results.md and results.png from the run directories."""
    runs = _runs_in(sweep_dir)
    if not runs:
        raise MetadataError(f"{sweep_dir} holds no runs (its sweep.json names none); run `pld sweep` with a grid first.")
    keys = sorted({k for _, o, _, _ in runs for k in o})
    rows = []
    for name, overrides, summary, metrics in runs:
        rows.append({**{k: overrides.get(k) for k in keys}, "run": name, "done": bool(summary),
                     "epochs_done": len(metrics), "best_val_top1": summary.get("best_val_top1"),
                     "last_val_top1": summary.get("last_val_top1"), "train_seconds": summary.get("train_seconds"),
                     "stopped_after_epochs": summary.get("stopped_after_epochs"), "stop_reason": summary.get("stop_reason")})
    paths = {ext: os.path.join(sweep_dir, f"results.{ext}") for ext in ("csv", "md", "png")}
    for path in paths.values():
        refuse_link(path)  # before any is written: a refused report leaves the folder as it was
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=[csv_cell(k) for k in rows[0]])
    w.writeheader()
    w.writerows([{csv_cell(k): csv_cell(v) for k, v in r.items()} for r in rows])
    write_text(paths["csv"], buf.getvalue())
    groups = _group_by_config(rows, keys)
    write_text(paths["md"], _markdown(rows, keys, groups))
    seeds = max(len(g) for g in groups.values())
    name = os.path.basename(os.path.normpath(sweep_dir)).replace("$", r"\$")  # text, not mathtext
    _plot(groups, paths["png"], f"sweep {name}: best val top-1 per "
          f"configuration ({'mean ± std over seeds' if seeds > 1 else 'one seed each'})")
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


def md_cell(value: Any) -> str:
    """A value as one Markdown table cell that stays one cell of plain text: control characters (newlines) become
    spaces, and pipes, backticks, backslashes, brackets (links) and HTML are escaped. Settings come from untrusted folders."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in str(value))
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\|`\[\]])", r"\\\1", text)


def csv_cell(value: Any) -> Any:
    """A value for a CSV cell that a spreadsheet shows as text: strings starting with =, +, -, @ (or a tab or
    carriage return) get a leading apostrophe (OWASP's CSV-injection rule); the csv module quotes the rest."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _markdown(rows: list[dict[str, Any]], keys: list[str], groups: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| " + " | ".join(md_cell(k) for k in keys + ["best top-1", "last top-1", "train s", "done"]) + " |",
             "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        cells = [md_cell(r[k]) for k in keys] + [_fmt([r["best_val_top1"]]), _fmt([r["last_val_top1"]]),
                                             f"{r['train_seconds']:.1f}" if r["train_seconds"] else "-",
                                             run_status(r)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(len(g) > 1 for g in groups.values()):
        lines += ["", "| configuration | runs | best top-1 (mean ± std) | last top-1 (mean ± std) |", "|---|---|---|---|"]
        for label, g in groups.items():
            lines.append(f"| {md_cell(label)} | {len(g)} | {_fmt([r['best_val_top1'] for r in g])} | "
                         f"{_fmt([r['last_val_top1'] for r in g])} |")
    lines += ["", best_line(rows)]
    return "\n".join(lines) + "\n"


def best_line(rows: list[dict[str, Any]]) -> str:
    best = best_run(rows)
    if best is None:
        return "best run: none yet (no run has trained to the end with a validation score)"
    return f"best run: {md_cell(best['run'])}, best val top-1 {best['best_val_top1']:.2f}%"


def run_status(row: dict[str, Any]) -> str:
    """done, N epochs (unfinished), or stopped after N epochs (halving)."""
    if row["stopped_after_epochs"]:
        return f"stopped after {row['stopped_after_epochs']} epochs (halving)"
    return "yes" if row["done"] else f"{row['epochs_done']} epochs"


def _plot(groups: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """One bar per configuration (mean over seeds), from 0 so bar heights compare; error bars only where there
    are several seeds; configurations with a run stopped by halving hatched and grey (trained fewer epochs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(groups)
    means, errs, stopped = [], [], []
    for g in groups.values():
        vals = [r["best_val_top1"] for r in g if r["best_val_top1"] is not None and not math.isnan(r["best_val_top1"])]
        means.append(statistics.mean(vals) if vals else 0.0)
        errs.append(statistics.stdev(vals) if len(vals) > 1 else math.nan)  # NaN: no error bar for one seed
        stopped.append(any(r["stopped_after_epochs"] for r in g))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels)), 4.4), dpi=120)
    bars = ax.bar(range(len(labels)), means, color=["0.75" if s else "tab:blue" for s in stopped], edgecolor="0.3")
    for bar, s in zip(bars, stopped):
        if s:
            bar.set_hatch("//")
    if any(e == e for e in errs):
        ax.errorbar(range(len(labels)), means, yerr=[0 if e != e else e for e in errs], fmt="none", ecolor="k",
                    capsize=4, elinewidth=1)
    labels = [label.replace("$", r"\$") + (" (stopped)" if s else "") for label, s in zip(labels, stopped)]
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("best validation top-1 (%)")
    ax.set_ylim(0, min(100, max(means, default=100) * 1.1 + 1))  # from 0: a 2-point gap must not look 2x
    ax.set_title(title + ("\nhatched grey: stopped early by halving (fewer epochs)" if any(stopped) else ""),
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
