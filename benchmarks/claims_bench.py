"""Independent cache-teacher workers on one --out: do N overlapping workers finish in about 1/N of the time?

    python benchmarks/claims_bench.py [--data '../shared/data/cifar10/cifar10-train-{000000..000003}.tar']

Each worker is a separate `pld cache-teacher` process limited to one CPU thread (as if each had a machine of its
own); they share nothing but the cache folder and its claims (cache/claims.py). One worker alone, then two
started together with the same command: wall time, which shards each wrote, and whether the two-worker cache
equals the one-worker cache. Writes benchmarks/results/claims_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from pld_pipeline.cache import Cache, verify_cache

from _results import write_results  # benchmarks/ helper (scripts run from this folder)


def workers(n: int, args: argparse.Namespace, out: str) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "pld_pipeline", "cache-teacher", "--data", args.data, "--teacher", "cifar_resnet20",
           "--teacher-checkpoint", args.checkpoint, "--teacher-name", "r20", "--views", str(args.views), "--top-k", "10",
           "--workers", "0", "--device", "cpu", "--json", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {stderr[-2000:]}")
        results.append(json.loads(stdout))
    return time.perf_counter() - t0, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10/cifar10-train-{000000..000003}.tar")
    ap.add_argument("--checkpoint", default="../shared/models/resnet20-12fca82f.th")
    ap.add_argument("--views", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pld-claims-")
    try:
        one_s, _ = workers(1, args, os.path.join(tmp, "one.zarr"))
        two_s, two = workers(2, args, os.path.join(tmp, "two.zarr"))
        a, b = Cache(os.path.join(tmp, "one.zarr")), Cache(os.path.join(tmp, "two.zarr"))
        same = all(np.array_equal(a.read(s, "r20").topk_logp, b.read(s, "r20").topk_logp)
                   for s in range(len(a.meta.shards)))
        result = {"args": vars(args), "one_worker_seconds": one_s, "two_workers_seconds": two_s,
                  "two_over_one": two_s / one_s, "shards_written_by_each": [r["shards_written"] for r in two],
                  "shards": len(a.meta.shards), "same_cache": same,
                  "verify_ok": verify_cache(os.path.join(tmp, "two.zarr")).ok}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one worker {one_s:.1f}s; two workers {two_s:.1f}s ({result['two_over_one']:.2f}x), shards written by each: "
          f"{result['shards_written_by_each']} of {result['shards']}; same cache: {same}")
    write_results("benchmarks/results/claims_bench.json", result)


if __name__ == "__main__":
    main()
