"""Mixed views on the evidence setting: do CutMix/Mixup views cached with the teacher's outputs on the mixed
images help the student, and how should a mixed view enter PLD's ranking? One resumable script.

    python benchmarks/mix_experiment.py [--data-dir ../shared/data/cifar10] [--out benchmarks/results/mix]

The setting of benchmarks/evidence_experiment.py (2,000 training images, cifar_resnet56 teacher, 8 views,
cifar_resnet20 student, 30 epochs, AdamW 3e-3, top-1 on 4,000 test images), with a second cache whose views are
half plain, half mixed (`--mix both --mix-prob 0.5`: CutMix or Mixup, timm's defaults alpha 1.0 / 0.8). Arms:
PLD on plain views (the evidence runs, reused), PLD on plain + mixed views with the dominant label first, and
with the teacher's own ranking first (3 seeds each). Also measured: both caches' size and cache-teacher time,
built side by side. Writes results.json and results.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from pld_pipeline.cache import inspect_cache
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.views import MixRecipe

from evidence_experiment import mean_std, run, setting_args, setting_parser  # benchmarks/ helpers

ARMS = {"pld, plain views": None,  # the evidence experiment's runs
        "pld, plain + mixed, dominant label first": dict(loss="pld", mixed_first="dominant"),
        "pld, plain + mixed, teacher ranking": dict(loss="pld", mixed_first="teacher")}


def build(args: argparse.Namespace, out: str, mix: MixRecipe | None) -> dict:
    """Build one cache from scratch (timed) unless it is there; its size and build time."""
    stats_path = out + ".json"
    if os.path.isfile(stats_path):
        with open(stats_path) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = cache_teacher(CacheTeacherConfig(
        data=args.train, out=out, views=args.views, k=None, workers=args.workers, device="cpu",
        teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")],
        recipe_overrides={} if mix is None else {"mix": mix.to_dict()}))
    seconds = time.perf_counter() - t0
    info = inspect_cache(out)
    stats = {"seconds": seconds, "views_per_s": summary["items"] / seconds, "bytes": info["bytes_on_disk"],
             "bytes_per_view": info["bytes_per_view"],
             "teacher_top1_on_cached_views": info["teachers"]["r56"]["accuracy_on_cached_views"]}
    with open(stats_path, "w") as f:
        json.dump(stats, f, indent=1)
    return stats


def throughput(args: argparse.Namespace, repeats: int = 2, views: int = 2) -> dict[str, float]:
    """cache-teacher views/s without and with mixing, alternated on an idle-as-possible machine (the full builds
    above share it with the student runs): end to end, 2,000 images x ``views`` views into a scratch folder."""
    import tempfile
    times: dict[str, list[float]] = {"plain": [], "plain + mixed": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for name, mix in (("plain", None), ("plain + mixed", MixRecipe(mode="both", prob=0.5))):
                out = os.path.join(tmp, f"{r}-{'mixed' if mix else 'plain'}.zarr")
                t0 = time.perf_counter()
                summary = cache_teacher(CacheTeacherConfig(
                    data=args.train, out=out, views=views, k=None, workers=args.workers, device="cpu",
                    teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")],
                    recipe_overrides={} if mix is None else {"mix": mix.to_dict()}))
                times[name].append(summary["items"] / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = setting_parser(__doc__.splitlines()[0], "benchmarks/results/mix")
    ap.add_argument("--evidence", default="benchmarks/results/evidence", help="the evidence experiment's --out")
    ap.add_argument("--choice-seeds", type=int, nargs="+", default=None,
                    help="seeds of the 'teacher ranking' arm (default: --seeds); it only compares the PLD choice")
    args = setting_args(ap)
    caches = {"plain": build(args, os.path.join(args.out, "plain.zarr"), None),
              "plain + mixed": build(args, os.path.join(args.out, "mixed.zarr"), MixRecipe(mode="both", prob=0.5))}
    args.cache = os.path.join(args.out, "mixed.zarr")
    final: dict[str, list[float]] = {}
    for seed in args.seeds:
        for arm, kw in ARMS.items():
            if kw and kw["mixed_first"] == "teacher" and seed not in (args.choice_seeds or args.seeds):
                continue
            if kw is None:
                with open(os.path.join(args.evidence, "runs", f"pld-seed{seed}", "metrics.jsonl")) as f:
                    history = [json.loads(line) for line in f]
            else:
                history = run(f"pld-mix-{kw['mixed_first']}-seed{seed}", args, seed=seed, **kw)
            final.setdefault(arm, []).append(history[-1]["val_top1"])
    rates_path = os.path.join(args.out, "throughput.json")
    if not os.path.isfile(rates_path):
        rates = throughput(args)  # measured before the file is opened: a failure leaves no empty result behind
        with open(rates_path, "w") as f:
            json.dump(rates, f, indent=1)
    with open(rates_path) as f:
        rates = json.load(f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "caches": caches, "final_test_top1": final,
                   "cache_teacher_views_per_s_alternated": rates}, f, indent=1)
    plain = statistics.mean(final["pld, plain views"])
    lines = ["| arm | test top-1 (%), mean ± std | vs plain | seeds |", "|---|---|---|---|"]
    lines += [f"| {arm} | {mean_std(v)} | {statistics.mean(v) - plain:+.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
              for arm, v in final.items()]
    lines += ["", "| cache | cache-teacher s | views/s | bytes | bytes/view | teacher top-1 on its views |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {c['seconds']:.0f} | {c['views_per_s']:.0f} | {c['bytes']:,} | {c['bytes_per_view']:.1f} | "
              f"{100 * c['teacher_top1_on_cached_views']:.2f}% |" for name, c in caches.items()]
    lines += ["", "cache-teacher views/s, alternated runs of 2,000 images x 2 views (median of 2): "
              + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
              + f" (mixed / plain = {rates['plain + mixed'] / rates['plain']:.2f})"]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
