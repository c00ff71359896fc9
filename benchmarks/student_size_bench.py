"""Training throughput of a student at its own (lower) resolution against full resolution, from one cache.

    python benchmarks/student_size_bench.py --cache benchmarks/results/evidence/cache.zarr \
        --data ../shared/data/cifar10/cifar10-train-000000.tar --sizes 32 24 16

Each size trains `--student` for 2 epochs from the same cache (views replayed at the cache's size, then resized
to the student's); the second epoch's samples/s is compared, settings interleaved twice to spread machine drift.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

from pld_pipeline.distill import DistillConfig, distill

from _results import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--student", default="cifar_resnet20")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 24, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/student_size.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="pld-size-bench-")
    rates: dict[int, list[float]] = {s: [] for s in args.sizes}
    try:
        for r in range(args.rounds):
            for size in args.sizes:
                out = os.path.join(root, f"{size}-{r}")
                distill(DistillConfig(data=args.data, cache=args.cache, out=out, student=args.student, loss="pld",
                                      epochs=2, batch_size=128, workers=args.workers, device="cpu", student_size=size))
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    rates[size].append([json.loads(line) for line in f][-1]["samples_per_s"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    full = statistics.median(rates[max(args.sizes)])
    rows = {size: {"samples_per_s": statistics.median(v), "speedup_vs_full": statistics.median(v) / full}
            for size, v in rates.items()}
    for size, row in rows.items():
        print(f"student at {size}px: {row['samples_per_s']:.0f} samples/s ({row['speedup_vs_full']:.2f}x full resolution)")
    write_results(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
