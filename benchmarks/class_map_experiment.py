"""A 10-class CIFAR teacher distilled into a 4-class student (the vehicles) through a class map, against CE.

    python benchmarks/class_map_experiment.py --data-dir ../shared/data/cifar10 --teacher-ckpt ../shared/models/resnet56-4bfd9763.th

1. Subset shards: the airplane, automobile, ship and truck images of the first --train-shards train shards and of
   all test shards, copied byte for byte and relabelled 0..3 (the student's classes), with a classes.json.
2. cache-teacher once: cifar_resnet56 (10 classes, its CIFAR-10 class names recorded) over the subset's train
   shards, --views views, full logits, temperatures {1, 2}. The cache knows nothing of the student.
3. The map, by name: ["airplane", "automobile", "ship", "truck"]; `inspect_class_map` reports the teacher's
   out-of-map mass and its top-1 in the student's 4 classes.
4. For each seed: CE (labels only), KD (T 2) and PLD (T 1) through the map, the same 4-class student, cached views
   and schedule.
   Top-1 on the subset's test images after the last epoch. Pre-registered in docs/results.md.
Every run is an ordinary `distill` run directory; rerunning skips finished runs. Writes results.json and
results.md under --out.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import webdataset as wds

from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.class_map import inspect_class_map
from pld_pipeline.distill import DistillConfig, distill

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES = ["airplane", "automobile", "ship", "truck"]


def subset_shards(sources: list[str], out_pattern: str, per_shard: int = 1000) -> str:
    """The vehicle samples of ``sources``, relabelled to the student's classes, as shards; their brace pattern."""
    folder = os.path.dirname(out_pattern)
    os.makedirs(folder, exist_ok=True)
    existing = sorted(glob.glob(out_pattern % "*"))
    if not existing:
        with wds.ShardWriter(out_pattern % "%06d", maxcount=per_shard, verbose=0) as sink:
            for src in sources:
                for s in wds.WebDataset(src, shardshuffle=False):
                    name = CIFAR10[int(s["cls"].decode())]
                    if name in VEHICLES:
                        sink.write({"__key__": s["__key__"], "jpg": s["jpg"],
                                    "cls": str(VEHICLES.index(name)).encode()})
        with open(os.path.join(folder, "classes.json"), "w") as f:
            json.dump({"class_names": VEHICLES}, f)
        existing = sorted(glob.glob(out_pattern % "*"))
    return out_pattern % f"{{000000..{len(existing) - 1:06d}}}"


def run(name: str, args: argparse.Namespace, **kw) -> dict:
    out = os.path.join(args.out, "runs", name)
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    base = dict(data=args.train, out=out, student=args.student, epochs=args.epochs, batch_size=args.batch_size,
                opt="adamw", lr=args.lr, weight_decay=0.05, warmup_epochs=1.0, workers=args.workers, device="cpu",
                val_data=args.test, eval_every=args.epochs)
    base.update(kw)
    t0 = time.perf_counter()
    summary = distill(DistillConfig(**base))
    summary["wall_seconds"] = time.perf_counter() - t0
    print(f"{name}: last top-1 {summary['last_val_top1']:.2f}, {summary['wall_seconds']:.0f}s", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet56-4bfd9763.th")
    ap.add_argument("--train-shards", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student", default="cifar_resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/class_map")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train_src = [os.path.join(args.data_dir, f"cifar10-train-{i:06d}.tar") for i in range(args.train_shards)]
    test_src = sorted(glob.glob(os.path.join(args.data_dir, "cifar10-test-*.tar")))
    args.train = subset_shards(train_src, os.path.join(args.out, "data", "train-%s.tar"))
    args.test = subset_shards(test_src, os.path.join(args.out, "data", "test-%s.tar"))
    cache = os.path.join(args.out, "cache.zarr")
    t0 = time.perf_counter()
    cache_teacher(CacheTeacherConfig(
        data=args.train, out=cache, teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")],
        views=args.views, recipe="cifar", size=32, k=None, temperatures=(1.0, 2.0), workers=args.workers,
        num_classes=10, class_names=CIFAR10, device="cpu"))
    cache_seconds = time.perf_counter() - t0
    class_map = os.path.join(args.out, "vehicles.json")
    with open(class_map, "w") as f:
        json.dump(VEHICLES, f)
    mapped = inspect_class_map(cache, class_map)["teachers"]["r56"]
    print(f"cache {cache_seconds:.0f}s; teacher in the student's classes: {mapped}", flush=True)

    acc: dict[str, list[float]] = {}
    # CE reads the same cached views (the cache's replayed augmentations) and, through the map, has the same
    # 4-class student; it reads no teacher values
    arms = {"CE (labels only)": "ce", "KD (T 2, alpha 0.1), mapped": "kd", "PLD (T 1), mapped": "pld"}
    for seed in args.seeds:
        for label, loss in arms.items():
            s = run(f"{loss}-seed{seed}", args, seed=seed, loss=loss, cache=cache, class_map=class_map)
            acc.setdefault(label, []).append(s["last_val_top1"])
    results = {"args": vars(args), "cache_seconds": cache_seconds, "teacher_mapped": mapped, "accuracy": acc}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    ce = statistics.mean(acc["CE (labels only)"])
    lines = [f"| arm | mean ± std ({len(args.seeds)} seeds) | vs CE | " + " | ".join(f"seed {s}" for s in args.seeds)
             + " |", "|---|---|---|" + "---|" * len(args.seeds)]
    for label, xs in acc.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(xs):.2f} ± {sd:.2f} | {statistics.mean(xs) - ce:+.2f} | "
                     + " | ".join(f"{x:.2f}" for x in xs) + " |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
