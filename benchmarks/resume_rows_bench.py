"""Teacher work an interruption loses, and what saving a shard's finished rows costs, in one run.

    python benchmarks/resume_rows_bench.py --data ../shared/data/cifar10/cifar10-train-000000.tar \
        --teacher cifar_resnet20 --checkpoint ../shared/models/resnet20-12fca82f.th --views 8 --rounds 3

1. Lost work. A run crashes (an exception from its progress callback: it keeps only what was saved before, like
   a kill) after ``--crash-at`` of the shard's teacher batches; the rerun's teacher forwards minus the views the
   crashed run had not reached = teacher work done twice. ``off`` is the behaviour before rows were saved (a
   whole-shard unit: ``--save-rows`` larger than the shard, no time trigger).
2. Cost. Whole runs with saving off, at the default (every 60 s) and by rows (256, 64), interleaved
   rounds in this process: CPU seconds per view (process time, every thread: decode workers are separate
   processes and not counted, the same in every mode) and views/s, plus the wall time of each save (rows written
   into the arrays + the record), which is what a faster teacher (a GPU) would pay in proportion.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import pld_pipeline.cache.progress as progress_mod
import pld_pipeline.cache_teacher as ct
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher

from _results import write_results  # benchmarks/ helper (scripts run from this folder)

MODES = {"off": (None, 1e9), "60 s (default)": (None, 60.0), "20 s": (None, 20.0), "256 rows or 60 s": (256, 60.0),
         "64 rows or 60 s": (64, 60.0)}


class Crash(Exception):
    pass


def run(args, out: str, save: tuple[int | None, float], crash_at: int | None = None) -> dict:
    forwards, saves = [0], []
    real_encode, real_save = ct.encode_teacher_logits, progress_mod.save

    def counting(logits, *a, **kw):
        forwards[0] += logits.shape[0]
        return real_encode(logits, *a, **kw)

    def timed_save(*a, **kw):
        t = time.perf_counter()
        real_save(*a, **kw)
        saves.append(time.perf_counter() - t)

    batches = [0]

    def emit(event):
        if event["event"] == "batch":
            batches[0] += 1
            if crash_at is not None and batches[0] == crash_at:
                raise Crash()

    ct.encode_teacher_logits, progress_mod.save = counting, timed_save
    cfg = CacheTeacherConfig(data=args.data, out=out, teachers=[TeacherSpec(args.teacher, args.checkpoint, "t")],
                             views=args.views, batch_size=args.batch_size, device="cpu", save_rows=save[0],
                             save_seconds=save[1])
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        cache_teacher(cfg, emit)
    except Crash:
        pass
    finally:
        ct.encode_teacher_logits, progress_mod.save = real_encode, real_save
    return {"forwards": forwards[0], "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0,
            "saves": saves}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", default="cifar_resnet20")
    ap.add_argument("--checkpoint")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crash-at", type=float, default=0.95, help="fraction of the shard's teacher batches")
    ap.add_argument("--modes", default="off,60 s (default),256 rows or 60 s,64 rows or 60 s",
                    help="comma-separated names of MODES to run ('off' first)")
    ap.add_argument("--json", default="benchmarks/results/resume_rows.json")
    args = ap.parse_args()
    modes = {name: MODES[name] for name in args.modes.split(",")}
    tmp = tempfile.mkdtemp(prefix="pld-resume-bench-")
    results: dict = {"load_before": os.getloadavg(), "modes": {}, "lost": {}}
    try:
        views_total = None
        for r in range(args.rounds):
            for name, save in modes.items():
                res = run(args, os.path.join(tmp, f"c{r}-{list(MODES).index(name)}.zarr"), save)
                views_total = res["forwards"]
                results["modes"].setdefault(name, []).append(res)
                print(f"round {r} {name}: {res['cpu_s'] / res['forwards'] * 1e3:.3f} ms CPU/view, "
                      f"{res['forwards'] / res['wall_s']:.0f} views/s, {len(res['saves'])} saves, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        n_batches = -(-views_total // args.batch_size)
        crash = max(1, int(args.crash_at * n_batches))
        for name, save in modes.items():
            out = os.path.join(tmp, f"lost-{list(MODES).index(name)}.zarr")
            first = run(args, out, save, crash_at=crash)
            again = run(args, out, save)
            results["lost"][name] = {"computed_before_crash": first["forwards"], "rerun": again["forwards"],
                                     "redone": first["forwards"] + again["forwards"] - views_total}
            print(f"lost work, saving {name}: crash after {first['forwards']} of {views_total} views, rerun computes "
                  f"{again['forwards']}: {results['lost'][name]['redone']} views redone", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    base = statistics.median(r["cpu_s"] / r["forwards"] for r in results["modes"]["off"])
    print(f"\n| saving | CPU ms/view (median) | vs off | views/s (median) | saves per run | ms per save (median) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results["modes"].items():
        cpu = statistics.median(r["cpu_s"] / r["forwards"] for r in runs)
        rate = statistics.median(r["forwards"] / r["wall_s"] for r in runs)
        saves = [s for r in runs for s in r["saves"]]
        print(f"| {name} | {cpu * 1e3:.3f} | {cpu / base:.3f} | {rate:.0f} | {len(saves) // len(runs)} | "
              f"{statistics.median(saves) * 1e3 if saves else 0:.0f} |")
    print(f"load average before/after: {results['load_before']} / {results['load_after']}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
