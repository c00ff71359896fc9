"""One 10-class CIFAR teacher cache, then a 4-class vehicle student and a 2-class superclass student from it, as a
consumer of a shared cache would (issue 29): the same shards, no second teacher pass.

    nohup nice python benchmarks/class_map_experiment.py > class_map.log 2>&1 &

1. cache-teacher ONCE: cifar_resnet56 (10 classes, its CIFAR-10 class names recorded) over the first --train-shards
   CIFAR-10 train shards as they are (labels 0..9, the teacher's classes), --views views, full logits,
   temperatures {1, 2}. The cache knows nothing of any student.
2. Two maps over that cache and those shards (`--labels` left to pld: labels >= the map's size are teacher classes):
   vehicles by name ["airplane", "automobile", "ship", "truck"] (the animals' samples skipped in training and
   test), and the superclass map [vehicles, animals] (every sample, label mapped to its group).
   `inspect_class_map` reports each map's out-of-map mass and the teacher's top-1 in the student's classes.
3. Vehicles: CE (labels only), KD (T 2) and PLD (T 1) through the map, for each seed; superclass: CE and PLD,
   seed 0 (--super-epochs). Order: seed 0's arms, the superclass, then the other seeds, so that a run cut short by
   a deadline has one of each. Top-1 on the first --test-shards test shards' in-map images after the last epoch.
Every run is an ordinary `distill` run directory; rerunning skips finished runs. results.json and results.md under
--out are rewritten after every run (with the machine's load average), so partial results are never lost.
Pre-registered in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.class_map import inspect_class_map
from pld_pipeline.distill import DistillConfig, distill

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES = ["airplane", "automobile", "ship", "truck"]
SUPER = [VEHICLES, [c for c in CIFAR10 if c not in VEHICLES]]  # student class 0: vehicles, 1: animals


def run(name: str, args: argparse.Namespace, epochs: int, **kw) -> dict:
    out = os.path.join(args.out, "runs", name)
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    base = dict(data=args.train, out=out, student=args.student, epochs=epochs, batch_size=args.batch_size,
                opt="adamw", lr=args.lr, weight_decay=0.05, warmup_epochs=1.0, workers=args.workers, device="cpu",
                val_data=args.test, eval_every=epochs, cache=args.cache)
    base.update(kw)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    summary = distill(DistillConfig(**base))
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["load_average_1min"] = [load0, os.getloadavg()[0]]  # at the start and at the end of the run
    with open(done, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{name}: last top-1 {summary['last_val_top1']:.2f}, {summary['wall_seconds']:.0f}s, "
          f"{summary['train_samples']} of {summary['cached_samples']} samples, load {summary['load_average_1min']}",
          flush=True)
    return summary


def table(acc: dict[str, list[float]], seeds: list[int]) -> list[str]:
    ce = statistics.mean(acc["CE (labels only)"]) if acc.get("CE (labels only)") else None
    lines = ["| arm | mean ± std | vs CE, paired by seed | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|" + "---|" * len(seeds)]
    for label, xs in acc.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        ces = acc.get("CE (labels only)", [])
        pairs = ", ".join(f"{x - c:+.2f}" for x, c in zip(xs, ces))
        vs = "-" if label.startswith("CE") or ce is None else f"{statistics.mean(xs) - statistics.mean(ces[:len(xs)]):+.2f} ({pairs})"
        lines.append(f"| {label} | {statistics.mean(xs):.2f} ± {sd:.2f} (n={len(xs)}) | {vs} | "
                     + " | ".join(f"{x:.2f}" for x in xs) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet56-4bfd9763.th")
    ap.add_argument("--train-shards", type=int, default=2)
    ap.add_argument("--test-shards", type=int, default=2)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--super-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student", default="cifar_resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/class_map_shared")
    args = ap.parse_args()
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    t_all, load_start = time.perf_counter(), os.getloadavg()
    # the CIFAR-10 shards as they are: labels 0..9, the teacher's classes; no subset shards, no relabelling
    args.train = os.path.join(args.data_dir, f"cifar10-train-{{000000..{args.train_shards - 1:06d}}}.tar")
    args.test = os.path.join(args.data_dir, f"cifar10-test-{{000000..{args.test_shards - 1:06d}}}.tar")
    args.cache = os.path.join(args.out, "cache.zarr")
    t0 = time.perf_counter()
    made = cache_teacher(CacheTeacherConfig(
        data=args.train, out=args.cache, teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")],
        views=args.views, recipe="cifar", size=32, k=None, temperatures=(1.0, 2.0), workers=args.workers,
        num_classes=10, class_names=CIFAR10, device="cpu"))
    cache_seconds = time.perf_counter() - t0  # ~0 on a rerun: the finished cache is kept
    maps = {}
    for name, doc in (("vehicles", VEHICLES), ("super", SUPER)):
        maps[name] = os.path.join(args.out, f"{name}.json")
        with open(maps[name], "w") as f:
            json.dump(doc, f)
    mapped = {name: inspect_class_map(args.cache, path) for name, path in maps.items()}
    print(f"cache {cache_seconds:.0f}s; teacher through the maps: {json.dumps(mapped)}", flush=True)

    acc: dict[str, list[float]] = {}
    sup: dict[str, list[float]] = {}
    runs: dict[str, dict] = {}
    arms = {"CE (labels only)": "ce", "KD (T 2, alpha 0.1), mapped": "kd", "PLD (T 1), mapped": "pld"}
    super_arms = {"PLD (T 1), mapped": "pld", "CE (labels only)": "ce"}  # the distilled student first
    plan = [("vehicles", args.seeds[0])] + [("super", 0)] + [("vehicles", s) for s in args.seeds[1:]]
    for student, seed in plan:
        for label, loss in (arms if student == "vehicles" else super_arms).items():
            name = f"{student}-{loss}-seed{seed}"
            s = run(name, args, args.epochs if student == "vehicles" else args.super_epochs, seed=seed, loss=loss,
                    class_map=maps[student])
            runs[name] = {k: s.get(k) for k in ("last_val_top1", "wall_seconds", "load_average_1min", "train_samples",
                                                "cached_samples", "labels", "num_classes")}
            (acc if student == "vehicles" else sup).setdefault(label, []).append(s["last_val_top1"])
            results = {"args": vars(args), "cache": made, "cache_seconds": cache_seconds, "teacher_passes": 1,
                       "students_from_the_cache": sorted({n.split("-")[0] for n in runs}),
                       "teacher_through_the_maps": mapped, "vehicles_top1": acc, "super_top1": sup, "runs": runs,
                       "load_average_at_start": load_start, "load_average_now": os.getloadavg(),
                       "wall_seconds_so_far": time.perf_counter() - t_all}
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)
            lines = (["Vehicles (4 classes):", ""] + table(acc, args.seeds) + ["", "Vehicles vs animals (2 classes):", ""]
                     + table(sup, [0]))
            with open(os.path.join(args.out, "results.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
