"""The main job on an embedded default: real data (scikit-learn's digits), every real stage, one results table.

The setting is the one this tool is for: a teacher that knows more than the student's labels can teach. The
teacher trains with CE on all 1,438 training digits; the students get a labelled subset of 200 (train shard 0)
and the teacher's cached outputs on those 200 (8 views each). make-shards -> distill --loss ce (the teacher) ->
cache-teacher (the subset, once) -> distill --loss ce|kd|pld from the cache, 3 seeds each (same student, same
budget) -> the same PLD student with --online-teacher (the cost side) -> table + plot. Pre-registered in
docs/results.md ("The demo"). Each stage calls the same library function as its command, and the equivalent
command lines are recorded so users can repeat them on their own data.
"""
from __future__ import annotations

import io
import json
import math
import os
import shlex
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from .cache import inspect_cache
from .cache.store import store_nbytes
from .cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from .distill import DistillConfig, distill
from .files import write_bytes, write_json, write_text
from .shards import digits_arrays, split_arrays

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class DemoConfig:
    out: str = "pld-demo"
    quick: bool = False  # seconds, for the test suite
    teacher: str = "cifar_resnet20"
    student: str = "cifar_resnet8"
    losses: tuple[str, ...] = ("ce", "kd", "pld")
    seeds: tuple[int, ...] = (0, 1, 2)
    labelled: int = 200  # the students' labelled subset: train shard 0 (the teacher trains on every shard)
    teacher_epochs: int = 12
    student_epochs: int = 30
    eval_every: int = 3
    views: int = 8
    batch_size: int = 32
    teacher_batch_size: int = 64
    lr: float = 3e-3
    workers: int = 1
    online: bool = True  # the PLD student once more, with the teacher run on every step instead of the cache
    device: str = "auto"

    def resolved(self) -> "DemoConfig":
        if not self.quick:
            return self
        return DemoConfig(**{**self.__dict__, "teacher": "cifar_resnet8", "teacher_epochs": 1, "student_epochs": 1,
                             "eval_every": 1, "views": 2, "workers": 0, "seeds": (0,), "labelled": 64,
                             "batch_size": 16})


def _cmd(*parts: Any) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def _curve(run_dir: str) -> list[tuple[int, float]]:
    """(epoch, val top-1) of the evaluated epochs."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            v = row.get("val_top1")
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append((int(row["epoch"]) + 1, float(v)))
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_demo(cfg: DemoConfig, progress: ProgressFn | None = None, stage: ProgressFn | None = None) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` and return the results (also written to results.json / results.md)."""
    cfg = cfg.resolved()
    say = stage or (lambda event: None)
    t_demo = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    data_dir = os.path.join(cfg.out, "data")
    commands: list[str] = []
    timings: dict[str, float] = {}

    t = time.perf_counter()
    images, labels, names = digits_arrays(upscale=2)
    if cfg.quick:
        images, labels = images[:320], labels[:320]
    splits = split_arrays(images, labels, names, data_dir, val_fraction=0.2, shard_size=cfg.labelled, seed=0)
    train, val = splits["train"].pattern, splits["val"].pattern
    subset = splits["train"].shards[0]  # the students' labelled images: the first `labelled` of the shuffled train split
    timings["make-shards"] = time.perf_counter() - t
    commands.append(_cmd("pld", "make-shards", "digits", "--out", data_dir, "--shard-size", cfg.labelled))
    say({"stage": "make-shards", "detail": f"{splits['train'].samples} train / {splits['val'].samples} val digits "
                                           f"(16x16); the students' labelled subset: {subset} ({cfg.labelled})"})

    recipe = {"name": "cifar", "size": 16, "pad": 2}
    common = dict(lr=cfg.lr, workers=cfg.workers, device=cfg.device, weight_decay=0.05, warmup_epochs=1.0)
    teacher_dir = os.path.join(cfg.out, "teacher")
    ckpt = os.path.join(teacher_dir, "best.safetensors")
    say({"stage": "teacher", "detail": f"training {cfg.teacher} with --loss ce on all {splits['train'].samples} "
                                       "training digits"})
    t = time.perf_counter()
    teacher = distill(DistillConfig(data=train, val_data=val, out=teacher_dir, student=cfg.teacher, loss="ce",
                                    epochs=cfg.teacher_epochs, num_classes=10, recipe=recipe, seed=0,
                                    batch_size=cfg.teacher_batch_size, **common), progress)
    timings["teacher"] = time.perf_counter() - t
    commands.append(_cmd("pld", "distill", "--loss", "ce", "--data", train, "--val-data", val, "--student", cfg.teacher,
                         "--recipe", "cifar", "--size", 16, "--pad", 2, "--epochs", cfg.teacher_epochs,
                         "--batch-size", cfg.teacher_batch_size, "--out", teacher_dir))

    cache_url = os.path.join(cfg.out, "cache.zarr")
    say({"stage": "cache-teacher", "detail": f"{cfg.views} views of each of the {cfg.labelled} labelled digits, once"})
    t = time.perf_counter()
    cached = cache_teacher(CacheTeacherConfig(
        data=subset, out=cache_url, teachers=[TeacherSpec(cfg.teacher, ckpt)], views=cfg.views, recipe="cifar",
        size=16, recipe_overrides={"pad": 2}, k=None, temperatures=(1.0, 2.0, 4.0), batch_size=256,
        workers=cfg.workers, device=cfg.device, seed=0, class_names=names, overwrite=True), progress)
    timings["cache-teacher"] = time.perf_counter() - t
    commands.append(_cmd("pld", "cache-teacher", "--data", subset, "--teacher", cfg.teacher, "--teacher-checkpoint",
                         ckpt, "--views", cfg.views, "--recipe", "cifar", "--size", 16, "--pad", 2, "--full", "--out",
                         cache_url))

    student = dict(data=subset, val_data=val, student=cfg.student, epochs=cfg.student_epochs,
                   eval_every=cfg.eval_every, batch_size=cfg.batch_size, **common)
    rows, curves = [], {}
    for loss in cfg.losses:
        runs = []
        for seed in cfg.seeds:
            run_dir = os.path.join(cfg.out, f"student-{loss}-seed{seed}")
            say({"stage": f"distill {loss} seed {seed}", "detail": f"{cfg.student} on the {cfg.labelled} labelled "
                                                                   "digits, targets from the cache"})
            runs.append(distill(DistillConfig(out=run_dir, loss=loss, cache=cache_url, seed=seed, **student), progress))
            curves.setdefault(loss, []).append(_curve(run_dir))
        commands.append(_cmd("pld", "distill", "--loss", loss, "--cache", cache_url, "--data", subset, "--val-data",
                             val, "--student", cfg.student, "--epochs", cfg.student_epochs, "--batch-size",
                             cfg.batch_size, "--seed", cfg.seeds[0], "--out",
                             os.path.join(cfg.out, f"student-{loss}-seed{cfg.seeds[0]}")))
        rows.append(_row(f"student {loss}", cfg.student, runs, cfg.seeds))
    online = None
    if cfg.online:
        run_dir = os.path.join(cfg.out, "student-pld-online")
        say({"stage": "distill pld, online teacher", "detail": f"the same PLD student (seed {cfg.seeds[0]}) with "
                                                               f"{cfg.teacher} run on every step instead of the cache"})
        summary = distill(DistillConfig(out=run_dir, loss="pld", online_teacher=cfg.teacher,
                                        online_teacher_checkpoint=ckpt, num_classes=10, recipe=recipe,
                                        seed=cfg.seeds[0], **student), progress)
        online = _row("student pld, online teacher", cfg.student, [summary], cfg.seeds[:1])
        commands.append(_cmd("pld", "distill", "--loss", "pld", "--online-teacher", cfg.teacher,
                             "--online-teacher-checkpoint", ckpt, "--data", subset, "--val-data", val, "--student",
                             cfg.student, "--recipe", "cifar", "--size", 16, "--pad", 2, "--epochs", cfg.student_epochs,
                             "--batch-size", cfg.batch_size, "--out", run_dir))
    info = inspect_cache(cache_url)
    results = {
        "setting": {"train_images": splits["train"].samples, "labelled": cfg.labelled, "val_images": splits["val"].samples,
                    "seeds": list(cfg.seeds), "student_epochs": cfg.student_epochs, "teacher_epochs": cfg.teacher_epochs},
        "teacher": {"model": cfg.teacher, "best_val_top1": teacher["best_val_top1"], "params": teacher["params"],
                    "train_seconds": teacher["train_seconds"],
                    "top1_on_cached_views": cached["teacher_accuracy"].get(cfg.teacher)},
        "students": rows, "online": online,
        "cache": {"url": cache_url, "bytes": store_nbytes(cache_url), "bytes_per_view": info["bytes_per_view"],
                  "views": cfg.views, "teacher_pass_seconds": timings["cache-teacher"]},
        "timings": timings, "commands": commands, "quick": cfg.quick,
        "curves": {loss: runs for loss, runs in curves.items()},
    }
    results["caption"] = caption(results)
    timings["total"] = time.perf_counter() - t_demo
    write_json(os.path.join(cfg.out, "results.json"), results)
    write_text(os.path.join(cfg.out, "results.md"), results_markdown(results))
    results["plot"] = plot_curves(curves, os.path.join(cfg.out, "val_top1.png"),
                                  title=f"{cfg.student} on {cfg.labelled} labelled digits, targets from a cached "
                                        f"{cfg.teacher} (mean of {len(cfg.seeds)} seed(s))")
    return results


def _row(run: str, model: str, runs: list[dict[str, Any]], seeds: tuple[int, ...]) -> dict[str, Any]:
    best, last = [r["best_val_top1"] for r in runs], [r["last_val_top1"] for r in runs]
    return {"run": run, "model": model, "params": runs[0]["params"], "seeds": list(seeds),
            "best_val_top1": _mean_std(best), "last_val_top1": _mean_std(last), "last_by_seed": last,
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}


def caption(results: dict[str, Any]) -> str:
    """What the table shows, whichever way it went. The pre-registered metric is the last-epoch mean over seeds.
    A seed fixes a run's init and data order in every arm, so arms are compared paired by seed: a gain counts
    only beyond twice the standard error of its per-seed differences."""
    rows = {r["run"].split()[-1]: r for r in results["students"]}
    if "ce" not in rows or len(rows) < 2:
        return ""
    n = len(rows["ce"]["seeds"])
    said, wins = [], []
    for loss, r in rows.items():
        if loss == "ce":
            continue
        diffs = [a - b for a, b in zip(r["last_by_seed"], rows["ce"]["last_by_seed"])]
        gain, se = statistics.mean(diffs), (statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0)
        said.append(f"{loss.upper()} {gain:+.2f} ± {se:.2f}")
        wins.append(n > 1 and gain > 2 * se)
    if n == 1:
        verdict = "One seed: no claim either way"
    elif all(wins):
        verdict = "Distillation from the cache beats CE here"
    elif any(wins):
        verdict = "Only some distillation losses beat CE here"
    else:
        verdict = "Distillation does NOT clearly beat CE here (every gain is within twice its standard error)"
    text = (f"{verdict}: last-epoch val top-1 vs CE, mean over {n} seed(s) of the same-seed differences ± standard "
            f"error: {', '.join(said)} points.")
    c, o = results["cache"], results.get("online")
    cached_pld = rows.get("pld")
    if o and cached_pld:
        ratio = o["train_seconds"] / max(cached_pld["train_seconds"], 1e-9)
        text += (f" Cost: the teacher pass ran once ({c['teacher_pass_seconds']:.1f}s) for all "
                 f"{sum(len(r['seeds']) for r in results['students'])} students; the PLD student trained in "
                 f"{cached_pld['train_seconds']:.1f}s from the cache and {o['train_seconds']:.1f}s with the teacher "
                 f"run on every step ({ratio:.2f}x)")
        text += "." if ratio >= 1.2 else (": a teacher this small costs little per step, so the cache saves little "
                                          "here; it pays with big teachers (docs/results.md).")
    return text


def _pm(ms: tuple[float, float] | list[float], n: int) -> str:
    return f"{ms[0]:.2f} ± {ms[1]:.2f}%" if n > 1 else f"{ms[0]:.2f}%"


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The results table (terminal and results.md): teacher, cached students, the online-teacher student."""
    t, s = results["teacher"], results["setting"]
    out = [["teacher (ce)", t["model"], f"{t['params']:,}", f"all {s['train_images']:,}", "0", f"{t['best_val_top1']:.2f}%",
            "-", f"{t['train_seconds']:.1f}s"]]
    for r in results["students"] + ([results["online"]] if results.get("online") else []):
        n = len(r["seeds"])
        out.append([r["run"], r["model"], f"{r['params']:,}", f"{s['labelled']:,}", ",".join(map(str, r["seeds"])),
                    _pm(r["best_val_top1"], n), _pm(r["last_val_top1"], n), f"{r['train_seconds']:.1f}s"])
    return out


TABLE_COLUMNS = ("run", "model", "params", "labelled images", "seeds", "best val top-1", "last val top-1",
                 "train time per run")


def results_markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    c = results["cache"]
    lines += ["", results["caption"], "",
              f"Cache: {c['bytes'] / 1024:.1f} KiB for {c['views']} views per labelled sample "
              f"({c['bytes_per_view']:.1f} bytes per view); the teacher pass took {c['teacher_pass_seconds']:.1f}s, "
              "once.", "", "Commands:", "```"] + results["commands"] + ["```"]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: str, title: str) -> str:
    """Validation top-1 per evaluated epoch, mean over seeds (band: min..max): the whole run on the left, its last
    third zoomed on the right, where the losses' curves end a point or two apart and the full scale hides it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for loss, runs in curves.items():
        epochs = [e for e, _ in runs[0]]
        acc = [[v for _, v in run] for run in runs]
        mean = [statistics.mean(col) for col in zip(*acc)]
        lo, hi = [min(c) for c in zip(*acc)], [max(c) for c in zip(*acc)]
        tail = slice(len(epochs) - max(2, len(epochs) // 3), None)
        for a, sl in ((ax, slice(None)), (zoom, tail)):
            line, = a.plot(epochs[sl], mean[sl], marker="o", label=loss)
            if len(runs) > 1:
                a.fill_between(epochs[sl], lo[sl], hi[sl], alpha=0.15, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=8)
    zoom.set_xlabel("epoch")
    zoom.set_title("last epochs, zoomed (the y-axis fits them: not from 0)", fontsize=8)
    for a in (ax, zoom):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_bytes(path, png.getvalue())
    return path
