"""The main job on an embedded default: real data (scikit-learn's digits), every real stage, one results table.

make-shards -> distill --loss ce (the teacher) -> cache-teacher (many views) -> distill --loss ce|kd|pld from
the cache (same student, same budget) -> table + plot. Each stage calls the same library function as its
command, and the equivalent command lines are recorded so users can repeat them on their own data.
"""
from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable

from .cache import inspect_cache
from .cache.store import store_nbytes
from .cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from .distill import DistillConfig, distill
from .shards import digits_arrays, split_arrays

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class DemoConfig:
    out: str = "pld-demo"
    quick: bool = False  # seconds, for the test suite
    teacher: str = "cifar_resnet20"
    student: str = "cifar_resnet8"
    losses: tuple[str, ...] = ("ce", "kd", "pld")
    teacher_epochs: int = 12
    student_epochs: int = 12
    views: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    workers: int = 1
    seed: int = 0
    device: str = "auto"

    def resolved(self) -> "DemoConfig":
        if not self.quick:
            return self
        return DemoConfig(**{**self.__dict__, "teacher": "cifar_resnet8", "teacher_epochs": 1, "student_epochs": 1,
                             "views": 2, "workers": 0})


def _cmd(*parts: Any) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def run_demo(cfg: DemoConfig, progress: ProgressFn | None = None, stage: ProgressFn | None = None) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` and return the results (also written to results.json / results.md)."""
    cfg = cfg.resolved()
    say = stage or (lambda event: None)
    os.makedirs(cfg.out, exist_ok=True)
    data_dir = os.path.join(cfg.out, "data")
    commands: list[str] = []
    timings: dict[str, float] = {}

    t = time.perf_counter()
    images, labels, names = digits_arrays(upscale=2)
    if cfg.quick:
        images, labels = images[:320], labels[:320]
    splits = split_arrays(images, labels, names, data_dir, val_fraction=0.2, shard_size=288 if not cfg.quick else 128,
                          seed=cfg.seed)
    train, val = splits["train"].pattern, splits["val"].pattern
    timings["make-shards"] = time.perf_counter() - t
    commands.append(_cmd("pld", "make-shards", "digits", "--out", data_dir))
    say({"stage": "make-shards", "detail": f"{splits['train'].samples} train / {splits['val'].samples} val digits "
                                           f"(16x16) in {len(splits['train'].shards) + len(splits['val'].shards)} shards"})

    common = dict(batch_size=cfg.batch_size, lr=cfg.lr, workers=cfg.workers, device=cfg.device, seed=cfg.seed,
                  weight_decay=0.05, warmup_epochs=1.0)
    teacher_dir = os.path.join(cfg.out, "teacher")
    say({"stage": "teacher", "detail": f"training {cfg.teacher} with --loss ce"})
    t = time.perf_counter()
    teacher = distill(DistillConfig(data=train, val_data=val, out=teacher_dir, student=cfg.teacher, loss="ce",
                                    epochs=cfg.teacher_epochs, num_classes=10,
                                    recipe={"name": "cifar", "size": 16, "pad": 2}, **common), progress)
    timings["teacher"] = time.perf_counter() - t
    commands.append(_cmd("pld", "distill", "--loss", "ce", "--data", train, "--val-data", val, "--student", cfg.teacher,
                         "--recipe", "cifar", "--size", 16, "--pad", 2, "--epochs", cfg.teacher_epochs, "--out", teacher_dir))

    cache_url = os.path.join(cfg.out, "cache.zarr")
    say({"stage": "cache-teacher", "detail": f"{cfg.views} views per sample"})
    t = time.perf_counter()
    cached = cache_teacher(CacheTeacherConfig(
        data=train, out=cache_url, teachers=[TeacherSpec(cfg.teacher, os.path.join(teacher_dir, "best.safetensors"))],
        views=cfg.views, recipe="cifar", size=16, recipe_overrides={"pad": 2}, k=None, temperatures=(1.0, 2.0, 4.0),
        batch_size=256, workers=cfg.workers, device=cfg.device, seed=cfg.seed, class_names=names, overwrite=True),
        progress)
    timings["cache-teacher"] = time.perf_counter() - t
    commands.append(_cmd("pld", "cache-teacher", "--data", train, "--teacher", cfg.teacher, "--teacher-checkpoint",
                         os.path.join(teacher_dir, "best.safetensors"), "--views", cfg.views, "--recipe", "cifar",
                         "--size", 16, "--pad", 2, "--full", "--out", cache_url))

    rows = []
    curves: dict[str, list[float]] = {}
    for loss in cfg.losses:
        run_dir = os.path.join(cfg.out, f"student-{loss}")
        say({"stage": f"distill {loss}", "detail": f"{cfg.student} from the cache"})
        summary = distill(DistillConfig(data=train, val_data=val, out=run_dir, student=cfg.student, loss=loss,
                                        cache=cache_url, epochs=cfg.student_epochs, **common), progress)
        commands.append(_cmd("pld", "distill", "--loss", loss, "--cache", cache_url, "--data", train, "--val-data",
                             val, "--student", cfg.student, "--epochs", cfg.student_epochs, "--out", run_dir))
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            curves[loss] = [json.loads(line)["val_top1"] for line in f]
        rows.append({"run": f"student {loss}", "model": cfg.student, "best_val_top1": summary["best_val_top1"],
                     "last_val_top1": summary["last_val_top1"], "train_seconds": summary["train_seconds"],
                     "params": summary["params"]})
    info = inspect_cache(cache_url)
    results = {
        "teacher": {"model": cfg.teacher, "best_val_top1": teacher["best_val_top1"], "params": teacher["params"],
                    "train_seconds": teacher["train_seconds"],
                    "top1_on_cached_views": cached["teacher_accuracy"].get(cfg.teacher)},
        "students": rows, "cache": {"url": cache_url, "bytes": store_nbytes(cache_url),
                                    "bytes_per_view": info["bytes_per_view"], "views": cfg.views},
        "timings": timings, "commands": commands, "curves": curves, "quick": cfg.quick,
    }
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(results_markdown(results))
    results["plot"] = plot_curves(curves, os.path.join(cfg.out, "val_top1.png"),
                                  title=f"{cfg.student} students from a cached {cfg.teacher} (digits)")
    return results


def results_markdown(results: dict[str, Any]) -> str:
    t = results["teacher"]
    lines = ["| run | model | params | best val top-1 | last val top-1 | train time |", "|---|---|---|---|---|---|",
             f"| teacher (ce) | {t['model']} | {t['params']:,} | {t['best_val_top1']:.2f}% | - | {t['train_seconds']:.1f}s |"]
    for r in results["students"]:
        lines.append(f"| {r['run']} | {r['model']} | {r['params']:,} | {r['best_val_top1']:.2f}% | "
                     f"{r['last_val_top1']:.2f}% | {r['train_seconds']:.1f}s |")
    c = results["cache"]
    lines += ["", f"Cache: {c['bytes'] / 1024:.1f} KiB for {c['views']} views per sample "
                  f"({c['bytes_per_view']:.1f} bytes per view).", "", "Commands:", "```"] + results["commands"] + ["```"]
    return "\n".join(lines) + "\n"


def plot_curves(curves: dict[str, list[float]], path: str, title: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for loss, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=loss)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
