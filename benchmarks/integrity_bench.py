"""What the read-time integrity checks cost a student, against one distill epoch, on the real CIFAR-10 shards.

    python benchmarks/integrity_bench.py --data-dir ../shared/data/cifar10 \
        --teacher-ckpt ../shared/models/resnet20-12fca82f.th

1. cache-teacher: cifar_resnet20 over the first N train shards, V views, full logits (C = 10).
2. one distill epoch from it (PLD, cifar_resnet20 student, after a warm-up epoch): what the checks are weighed
   against.
3. side by side, round robin: every shard block read the way distill reads it (each unit checked against its
   marker: sha256 per array, metadata binding) against the same arrays read raw (what v1's reader did), and the
   per-sample content digests (blake2b of every sample's bytes) that distill recomputes while joining samples.
Cost = (checked - raw) + digests, per epoch, as a fraction of the epoch. Target: <= 2%.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


from pld_pipeline.cache import Cache
from pld_pipeline.cache import format as fmt
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.data import iter_shard
from pld_pipeline.distill import DistillConfig, distill

from _results import write_results
from cache_bench import raw_block, round_robin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--teacher-ckpt", default="../shared/models/resnet20-12fca82f.th")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/integrity.json")
    args = ap.parse_args()
    urls = [os.path.join(args.data_dir, f"cifar10-train-{i:06d}.tar") for i in range(args.shards)]
    data = "::".join(urls)
    root = tempfile.mkdtemp(prefix="pld-integrity-bench-")
    try:
        cache = os.path.join(root, "cache.zarr")
        t0 = time.perf_counter()
        cache_teacher(CacheTeacherConfig(data=data, out=cache, teachers=[TeacherSpec("cifar_resnet20", args.teacher_ckpt, "r20")],
                                         views=args.views, k=None, workers=args.workers, device="cpu"))
        cache_seconds = time.perf_counter() - t0
        distill(DistillConfig(data=data, out=os.path.join(root, "run"), student="cifar_resnet20", loss="pld", cache=cache,
                              epochs=2, batch_size=128, workers=args.workers, device="cpu"))
        with open(os.path.join(root, "run", "metrics.jsonl")) as f:
            epoch_seconds = [json.loads(line)["epoch_seconds"] for line in f][-1]  # the epoch after the warm-up

        reader = Cache(cache)
        samples = [s for url in urls for s in iter_shard(url)]
        med = round_robin({
            "checked": lambda: [reader.read(shard, "r20", temperature=1.0) for shard in range(args.shards)],
            "raw": lambda: [raw_block(reader, shard, "r20") for shard in range(args.shards)],
            "digests": lambda: [fmt.sample_digest(s) for s in samples]}, rounds=args.rounds)
        cost = max(med["checked"] - med["raw"], 0.0) + med["digests"]
        row = {"samples": len(samples), "views": args.views, "cache_teacher_seconds": cache_seconds,
               "epoch_seconds": epoch_seconds, "block_reads_checked_s": med["checked"], "block_reads_raw_s": med["raw"],
               "sample_digests_s": med["digests"], "check_cost_s_per_epoch": cost,
               "check_cost_fraction_of_epoch": cost / epoch_seconds}
        print(f"{len(samples)} samples x {args.views} views: epoch {epoch_seconds:.1f}s | block reads checked "
              f"{med['checked'] * 1e3:.0f} ms vs raw {med['raw'] * 1e3:.0f} ms | sample digests {med['digests'] * 1e3:.0f} ms "
              f"| checks cost {cost * 1e3:.0f} ms = {100 * cost / epoch_seconds:.2f}% of an epoch (target <= 2%)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(args.out, {"args": vars(args), "row": row})


if __name__ == "__main__":
    main()
