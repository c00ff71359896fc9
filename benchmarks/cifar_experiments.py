"""Speed and accuracy of distillation from the cache on the real CIFAR-10 shards (../shared), in one script.

    python benchmarks/cifar_experiments.py --data-dir ../shared/data/cifar10 --teacher-ckpt ../shared/models/resnet56-4bfd9763.th

1. cache-teacher: cifar_resnet56 over the first N train shards, V views, full logits (C = 10).
2. speed, side by side: the same student and data, one epoch timed per setting after a warm-up epoch:
   CE without a cache, CE / KD / PLD from the cache, PLD with the teacher online (fresh views every epoch).
3. accuracy: CE, KD, DIST, PLD from the cache for each seed; PLD from the top-3 of the cache; online PLD.
   Top-1 on all 10k test images after the last epoch.
Every run is an ordinary `distill` run directory; rerunning skips finished runs. Writes results.json and
results.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pld_pipeline.cache import inspect_cache
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.distill import DistillConfig, distill


def run(name: str, args: argparse.Namespace, **kw) -> dict:
    out = os.path.join(args.out, "runs", name)
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    base = dict(data=args.train, out=out, student=args.student, epochs=args.epochs, batch_size=args.batch_size,
                opt="adamw", lr=args.lr, weight_decay=0.05, warmup_epochs=1.0, workers=args.workers, device="cpu",
                num_classes=10)
    base.update(kw)
    if base.get("cache"):
        base.pop("num_classes")
    t0 = time.perf_counter()
    summary = distill(DistillConfig(**base))
    summary["wall_seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        summary["epoch_seconds"] = [json.loads(line)["epoch_seconds"] for line in f]
    with open(done, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{name}: last top-1 {summary['last_val_top1']}, train {summary['train_seconds']:.0f}s", flush=True)
    return summary


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet56-4bfd9763.th")
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student", default="cifar_resnet8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-online-accuracy", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/cifar")
    args = ap.parse_args()
    args.train = os.path.join(args.data_dir, f"cifar10-train-{{000000..{args.shards - 1:06d}}}.tar")
    test = os.path.join(args.data_dir, "cifar10-test-{000000..000004}.tar")
    os.makedirs(args.out, exist_ok=True)
    cache = os.path.join(args.out, "cache.zarr")
    t0 = time.perf_counter()
    cached = cache_teacher(CacheTeacherConfig(
        data=args.train, out=cache, teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")],
        views=args.views, recipe="cifar", size=32, k=None, temperatures=(1.0, 2.0, 4.0), workers=args.workers,
        num_classes=10, device="cpu"))
    cache_seconds = time.perf_counter() - t0
    print(f"cache: {cached}", flush=True)

    # Speed: 2 epochs each (the first warms up), no eval; the second epoch's train time is compared.
    online = dict(online_teacher="cifar_resnet56", online_teacher_checkpoint=args.teacher_ckpt)
    speed_settings = {"ce (no cache)": dict(loss="ce"), "ce from cache": dict(loss="ce", cache=cache),
                      "kd from cache": dict(loss="kd", cache=cache), "pld from cache": dict(loss="pld", cache=cache),
                      "pld online teacher": dict(loss="pld", **online)}
    speed = {}
    for label, kw in speed_settings.items():
        s = run("speed-" + label.replace(" ", "-").replace("(", "").replace(")", ""), args, **{**kw, "epochs": 2})
        speed[label] = s["epoch_seconds"][-1]
    print({k: round(v, 1) for k, v in speed.items()}, flush=True)

    acc: dict[str, list[float]] = {}
    for seed in args.seeds:
        for loss in ("ce", "kd", "dist", "pld"):
            s = run(f"{loss}-seed{seed}", args, loss=loss, cache=cache, val_data=test, eval_every=args.epochs, seed=seed)
            acc.setdefault(f"{loss} (cache, full)", []).append(s["last_val_top1"])
        s = run(f"pld-top3-seed{seed}", args, loss="pld", cache=cache, val_data=test, eval_every=args.epochs, seed=seed,
                top_k=3)
        acc.setdefault("pld (cache, top-3)", []).append(s["last_val_top1"])
    if not args.skip_online_accuracy:
        s = run("pld-online-seed0", args, loss="pld", val_data=test, eval_every=args.epochs, seed=0, **online)
        acc["pld (online teacher, seed 0)"] = [s["last_val_top1"]]
    previous = os.path.join(args.out, "results.json")
    if cached["items"] == 0 and os.path.isfile(previous):  # the cache was made by an earlier run of this script
        with open(previous) as f:
            cache_seconds = json.load(f).get("cache_seconds", cache_seconds)
    teacher_top1 = inspect_cache(cache)["teachers"]["r56"]["accuracy_on_cached_views"]
    results = {"args": {k: v for k, v in vars(args).items()}, "cache_seconds": cache_seconds,
               "teacher_top1_on_cached_views": teacher_top1, "speed_epoch_seconds": speed,
               "speed_ratio_to_ce_no_cache": {k: v / speed["ce (no cache)"] for k, v in speed.items()},
               "accuracy": acc}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| setting | epoch time (s) | x CE without cache |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / speed['ce (no cache)']:.2f} |" for k, v in speed.items()]
    lines += ["", f"| loss | test top-1 (%), mean ± std over {len(args.seeds)} seeds |", "|---|---|"]
    lines += [f"| {k} | {mean_std(v)} |" for k, v in acc.items()]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
