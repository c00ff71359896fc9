"""Full grid versus successive halving: what early stopping saves on a real sweep, and whether it finds the same best.

    python benchmarks/halving_bench.py [--data-dir ../shared/data/cifar10] [--out benchmarks/results/halving]

The evidence setting (docs/results.md): 2,000 CIFAR-10 training images, the cifar_resnet56 teacher cached once
(8 views, full logits; reused from benchmarks/results/evidence when present), cifar_resnet20 students. A grid of
12 configurations (loss kd, dist, pld x learning rate 3e-4, 1e-3, 3e-3, 1e-2), 9 epochs each, validation top-1
on 2,000 test images after every epoch. The same grid is swept three times, one run at a time: to the end
(`pld sweep`), and with `--scheduler halving --grace-epochs 1` at reduction factor 3 (rungs at 1, 3, 9 epochs;
the setting chosen before the first run) and 4 (rungs at 1, 4; Optuna's and Ray Tune's default, since made ours).
Seed noise: the full grid's best configuration and each halving pick are trained again with seeds 1 and 2.
Because training is deterministic, a stopped run's curve is the start of the same configuration's full run, so
every (grace, factor) setting can also be replayed through Optuna's pruner on the full grid's recorded curves
(`replay`): it shows how much the outcome depends on the knobs.
Resumable: rerunning skips finished runs. Writes results.json and results.md under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.halving import HalvingRule
from pld_pipeline.sweep import parse_grid, report, run_sweep

GRID = ["loss=kd,dist,pld lr=3e-4,1e-3,3e-3,1e-2"]


def sweep(mode: str, base: dict, args: argparse.Namespace, halving: HalvingRule | None) -> dict:
    out = os.path.join(args.out, mode)
    t0 = time.perf_counter()
    rows = run_sweep(base, parse_grid(GRID), [], out, halving=halving,
                     progress=lambda e: print(f"{mode}: {e['name']} done", flush=True) if e["event"] == "run_done" else None)
    wall = time.perf_counter() - t0
    seconds = [json.load(open(os.path.join(out, r["run"], "summary.json")))["seconds"] for r in rows]
    finished = [r for r in rows if not r["stopped_after_epochs"]]
    best = max(finished, key=lambda r: r["best_val_top1"])
    return {"runs": len(rows), "epochs": sum(r["epochs_done"] for r in rows), "stopped": len(rows) - len(finished),
            "run_seconds": sum(seconds), "wall_seconds_this_call": wall, "best": best["run"],
            "best_val_top1": best["best_val_top1"],
            "table": [{k: r[k] for k in ("run", "epochs_done", "best_val_top1", "stop_reason")} for r in rows]}


def replay(full_dir: str) -> list[dict]:
    """Successive halving replayed through Optuna's pruner on the full grid's recorded per-epoch top-1."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = json.load(open(os.path.join(full_dir, "sweep.json")))["names"]
    curves = {n: [json.loads(line)["val_top1"] for line in open(os.path.join(full_dir, n, "metrics.jsonl"))] for n in names}
    out = []
    for grace, factor in [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 3)]:
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.SuccessiveHalvingPruner(
            min_resource=grace, reduction_factor=factor))
        epochs, finished = 0, {}
        for name in names:
            trial = study.ask()
            for epoch, value in enumerate(curves[name]):
                trial.report(value, epoch + 1)
                epochs += 1
                if trial.should_prune():
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curves[name][-1])
                finished[name] = max(curves[name])
        pick = max(finished, key=finished.get)
        out.append({"grace": grace, "factor": factor, "epochs": epochs, "pick": pick, "pick_top1": finished[pick]})
    return out


def seeds_of(run: str, base: dict, args: argparse.Namespace) -> list[float]:
    """Best top-1 of one configuration over seeds 0 (from the full grid), 1 and 2."""
    overrides = dict(part.split("=", 1) for part in run.split("__"))
    grid = parse_grid([f"{k}={v}" for k, v in overrides.items()] + ["seed=1,2"])
    rows = run_sweep(base, grid, [], os.path.join(args.out, "seeds", run))
    full = [r for r in report(os.path.join(args.out, "full")) if r["run"] == run][0]
    return [full["best_val_top1"]] + [r["best_val_top1"] for r in rows]  # this configuration's own sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet56-4bfd9763.th")
    ap.add_argument("--cache", default="benchmarks/results/evidence/cache.zarr")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/halving")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train = os.path.join(args.data_dir, "cifar10-train-000000.tar")
    cache_teacher(CacheTeacherConfig(data=train, out=args.cache, views=8, k=None, workers=args.workers, device="cpu",
                                     teachers=[TeacherSpec("cifar_resnet56", args.teacher_ckpt, "r56")]))
    base = {"data": train, "val_data": os.path.join(args.data_dir, "cifar10-test-000000.tar"), "cache": args.cache,
            "student": "cifar_resnet20", "epochs": args.epochs, "batch_size": 128, "opt": "adamw",
            "weight_decay": 0.05, "warmup_epochs": 1.0, "workers": args.workers, "device": "cpu"}
    modes = {"full grid": sweep("full", base, args, None),
             "halving, grace 1, factor 3": sweep("halving", base, args, HalvingRule(grace_epochs=1, reduction_factor=3)),
             "halving, grace 1, factor 4 (default)": sweep("halving4", base, args, HalvingRule(1, 4))}
    full = modes["full grid"]
    noise = {run: seeds_of(run, base, args) for run in dict.fromkeys(m["best"] for m in modes.values())}
    replays = replay(os.path.join(args.out, "full"))
    results = {"grid": GRID, "epochs": args.epochs, "modes": modes, "seeds": noise, "replay": replays,
               "ratios": {mode: {"epochs": m["epochs"] / full["epochs"], "run_seconds": m["run_seconds"] / full["run_seconds"]}
                          for mode, m in modes.items()}}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    fmt = lambda xs: f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"  # noqa: E731
    lines = ["| mode | runs stopped early | student epochs | vs full | run time (s) | vs full | best configuration | "
             "its top-1 (seed 0) | its top-1, seeds 0-2 |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in modes.items():
        ratio = results["ratios"][mode]
        lines.append(f"| {mode} | {r['stopped']} of {r['runs']} | {r['epochs']} | {ratio['epochs']:.2f}x | "
                     f"{r['run_seconds']:.0f} | {ratio['run_seconds']:.2f}x | {r['best']} | {r['best_val_top1']:.2f} | "
                     f"{fmt(noise[r['best']])} |")
    lines += ["", "Replayed on the full grid's curves (Optuna's pruner, same order):", "",
              "| grace | factor | student epochs | vs full | pick | its top-1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['grace']} | {r['factor']} | {r['epochs']} | {r['epochs'] / full['epochs']:.2f}x | {r['pick']} | "
              f"{r['pick_top1']:.2f} |" for r in replays]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
