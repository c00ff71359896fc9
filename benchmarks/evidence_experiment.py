"""Does distillation from the cache make better students? The pre-registered CIFAR-10 experiment of
docs/results.md ("Evidence"), as one resumable script.

    python benchmarks/evidence_experiment.py [--data-dir ../shared/data/cifar10] [--out benchmarks/results/evidence]

Few labels, a strong teacher: 2,000 training images (train shard 0), the published cifar_resnet56 (trained on
all 50,000) cached once with 8 views each, a cifar_resnet20 student trained from scratch for 30 epochs with CE,
KD, DIST and PLD (3 seeds each), top-1 on 4,000 test images (test shards 0-1) every 3 epochs. Every run is an
ordinary `distill` run directory; rerunning skips finished runs (an interrupted one is resumed).
Writes results.json, results.md and val_top1.png under --out.
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

# loss name -> distill settings. Primary arms: the project's defaults (the paper's tuned baselines: KD T=2,
# alpha 0.1; DIST T=1; PLD T=1). Secondary: PLD at T=4, the paper's CIFAR-100 temperature.
ARMS = {"ce": dict(loss="ce"), "kd": dict(loss="kd"), "dist": dict(loss="dist"), "pld": dict(loss="pld"),
        "pld T=4 (secondary)": dict(loss="pld", temperature=4.0)}


def run(name: str, args: argparse.Namespace, **kw) -> list[dict]:
    out = os.path.join(args.out, "runs", name)
    metrics = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(os.path.join(out, "done")):
        cfg = DistillConfig(data=args.train, val_data=args.test, out=out, student="cifar_resnet20", cache=args.cache,
                            epochs=args.epochs, eval_every=args.eval_every, batch_size=128, opt="adamw", lr=3e-3,
                            weight_decay=0.05, warmup_epochs=1.0, workers=args.workers, device="cpu",
                            resume=os.path.isfile(os.path.join(out, "last_state.pt")), **kw)
        t0 = time.perf_counter()
        distill(cfg)
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)
        open(os.path.join(out, "done"), "w").close()
    with open(metrics) as f:
        return [json.loads(line) for line in f]


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def plot(curves: dict[str, list[list[dict]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in curves.items():
        rows = [[r for r in h if r.get("val_top1") == r.get("val_top1")] for h in runs]  # evaluated epochs (not NaN)
        epochs = [r["epoch"] + 1 for r in rows[0]]
        acc = np.array([[r["val_top1"] for r in h] for h in rows])
        line, = ax.plot(epochs, acc.mean(0), label=f"{arm} ({acc[:, -1].mean():.1f})")
        ax.fill_between(epochs, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%), 4,000 images")
    ax.set_title("cifar_resnet20 on 2,000 CIFAR-10 images; teacher cifar_resnet56, 8 cached views\n"
                 "mean over 3 seeds, band = min..max", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def setting_parser(description: str, out: str) -> argparse.ArgumentParser:
    """The pre-registered setting's options (data, teacher, schedule, views, seeds), shared with mix_experiment.py."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet56-4bfd9763.th")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=out)
    return ap


def setting_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed options plus the setting's shards: 2,000 training images (train shard 0), 4,000 test images."""
    args = ap.parse_args()
    args.train = os.path.join(args.data_dir, "cifar10-train-000000.tar")
    args.test = os.path.join(args.data_dir, "cifar10-test-{000000..000001}.tar")
    os.makedirs(args.out, exist_ok=True)
    return args


def main() -> None:
    ap = setting_parser(__doc__.splitlines()[0], "benchmarks/results/evidence")
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    args = setting_args(ap)
    args.cache = os.path.join(args.out, "cache.zarr")
    t0 = time.perf_counter()
    cache_teacher(CacheTeacherConfig(data=args.train, out=args.cache, views=args.views, k=None, workers=args.workers,
                                     teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")], device="cpu"))
    print(f"cache ready in {time.perf_counter() - t0:.0f}s", flush=True)
    curves: dict[str, list[list[dict]]] = {}
    for seed in args.seeds:  # seed-major: partial results cover every arm early
        for arm in args.arms:
            curves.setdefault(arm, []).append(run(f"{arm.split(' ')[0].replace('=', '')}-seed{seed}"
                                                  + ("-t4" if "T=4" in arm else ""), args, seed=seed, **ARMS[arm]))
    final = {arm: [h[-1]["val_top1"] for h in runs] for arm, runs in curves.items()}
    teacher = inspect_cache(args.cache)["teachers"]["r56"]["accuracy_on_cached_views"]
    results = {"args": vars(args), "teacher_top1_on_cached_views": teacher, "final_test_top1": final,
               "curves": {arm: [[{k: r[k] for k in ("epoch", "val_top1", "train_loss")} for r in h] for h in runs]
                          for arm, runs in curves.items()}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    ce = statistics.mean(final["ce"])
    lines = [f"| loss | test top-1 (%), mean ± std over {len(args.seeds)} seeds | vs CE | seeds |", "|---|---|---|---|"]
    lines += [f"| {arm} | {mean_std(v)} | {statistics.mean(v) - ce:+.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
              for arm, v in final.items()]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(curves, os.path.join(args.out, "val_top1.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
