"""Cache size, precision, write and read throughput, side by side in one run.

    python benchmarks/cache_bench.py [--samples-per-shard 2000] [--shards 4] [--views 4]

For C in {10, 100, 1000} and k in {8, 32, C}: bytes per view on disk against raw float16 full logits
(2*C bytes), the worst error of the reconstructed teacher weights at tau in {0.5, 1, 2, 4}, write throughput,
and read throughput of whole shard blocks (what distill does) against random single-key reads. Each case is
written twice, side by side: in the cache's layout (per-view arrays: 16 views' chunks per object, zarr's sharding
codec) and in the layout before it (every chunk its own object), so the table gives both and their ratio.
Teacher logits are synthetic but shaped like a trained classifier's: a confident class, a few
plausible ones, a long tail.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from pld_pipeline.cache import CacheMeta, Cache, SampleStatus, ShardRecord, TeacherBlock, TeacherRecord
from pld_pipeline.cache import schema
from pld_pipeline.cache.encode import encode_teacher_logits, targets_from_arrays
from pld_pipeline.cache.store import store_nbytes
from pld_pipeline.losses import TeacherTargets

from _results import write_results  # benchmarks/ helper (scripts run from this folder)

TEMPS = (0.5, 1.0, 2.0, 4.0)


def teacher_logits(n: int, c: int, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    logits = torch.randn(n, c, generator=g) * 2.0
    logits[torch.arange(n), labels] += 6.0 + 2 * torch.rand(n, generator=g)  # usually right, confident
    similar = torch.randint(0, c, (n, 3), generator=g)
    logits.scatter_add_(1, similar, 3.0 * torch.rand(n, 3, generator=g))  # a few plausible confusions
    return logits


def raw_block(reader: Cache, shard: int, tid: str) -> list[np.ndarray]:
    """What a block read costs without the integrity checks (v1's reader): the same regions, read raw."""
    s, n = reader.meta.rows_per_shard, reader.meta.shards[shard].nsamples
    rows = slice(shard * s, shard * s + n)
    paths = [schema.KEY.path(), schema.LABEL.path(), schema.STATUS.path(), schema.DIGEST.path(), schema.PARAMS.path()] + [
        spec.path(tid) for spec in schema.BY_KIND["teacher"]]
    return [np.asarray(reader.array(p)[rows]) for p in paths]


def round_robin(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each case, run in turn ``rounds`` times so drifting machine load hits them alike.
    Used to set checked block reads (every unit against its marker) beside raw reads of the same arrays."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


@contextlib.contextmanager
def one_chunk_per_object():
    """Create arrays in the layout before the sharding codec: every chunk its own object."""
    real = schema.layout

    def unsharded(*a, **kw):
        return {**real(*a, **kw), "shards": None}
    schema.layout = unsharded
    try:
        yield
    finally:
        schema.layout = real


def run(c: int, k: int, args: argparse.Namespace, root: str, layout: str = "sharded") -> dict:
    g = torch.Generator().manual_seed(c * 7 + k)
    rng_np = np.random.default_rng(c * 7 + k)
    n, v = args.samples_per_shard, args.views
    shards = [ShardRecord(f"s-{i:06d}.tar", f"/x/s-{i:06d}.tar", n, 0, f"{i:064x}", f"q{i}") for i in range(args.shards)]
    teacher = TeacherRecord("t", "synthetic", None, None, {}, k, TEMPS, "int16" if c < 32768 else "int32")
    meta = CacheMeta(num_classes=c, rows_per_shard=n, key_bytes=16, shards=shards, recipe={"name": "none"},
                     num_views=v, seed=0, teachers={"t": teacher})
    url = os.path.join(root, f"c{c}_k{k}_{layout}.zarr")
    with one_chunk_per_object() if layout == "one_chunk_per_object" else contextlib.nullcontext():
        writer = Cache.create_or_extend(url, meta, overwrite=True)
    write_s, max_err = 0.0, 0.0
    for s in range(args.shards):
        labels = torch.randint(0, c, (n,), generator=g)
        logits = teacher_logits(n * v, c, labels.repeat_interleave(v), g)
        enc = encode_teacher_logits(logits, labels.repeat_interleave(v), k=k, temperatures=TEMPS)
        block = TeacherBlock(enc["topk_idx"].reshape(n, v, k).numpy(), enc["topk_logp"].reshape(n, v, k).numpy(),
                             enc["label_logp"].reshape(n, v).numpy(), enc["logz"].reshape(n, v, -1).numpy(),
                             correct=0, count=n * v)
        t0 = time.perf_counter()
        writer.write_samples(s, [f"k{s}_{i:07d}" for i in range(n)], labels.numpy().astype(np.int32),
                             np.full(n, SampleStatus.OK, np.uint8), rng_np.integers(0, 256, (n, 16), np.uint8))
        writer.write_views(s, (0, v), np.zeros((n, v, 5), np.int32))
        writer.write_teacher(s, "t", (0, v), block)
        write_s += time.perf_counter() - t0
        if s == 0:  # precision: stored float16 values against exact float32 teacher weights
            stored = Cache(url).read(0, "t")
            for col, tau in enumerate(TEMPS):
                logz = np.asarray(Cache(url).array("teachers/t/logz")[0:n])[..., col]
                got = targets_from_arrays(stored.topk_idx.reshape(n * v, k), stored.topk_logp.reshape(n * v, k),
                                          stored.label_logp.reshape(-1), logz.reshape(-1), temperature=tau, num_classes=c)
                want = TeacherTargets.from_logits(logits, labels.repeat_interleave(v), k=k, temperature=tau)
                err = max(float((got.topk_log_probs().exp() - want.topk_log_probs().exp()).abs().max()),
                          float((got.label_log_prob().exp() - want.label_log_prob().exp()).abs().max()))
                max_err = max(max_err, err)
    views = args.shards * n * v
    teacher_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(url, "teachers"))
                        for f in fs)
    total_bytes = store_nbytes(url)
    reader = Cache(url)
    times = round_robin({"checked": lambda: [reader.read(s, "t", temperature=1.0) for s in range(args.shards)],
                         "raw": lambda: [raw_block(reader, s, "t") for s in range(args.shards)]}, rounds=3)
    stream, stream_raw = views / times["checked"], views / times["raw"]
    rng = np.random.default_rng(0)
    arr = reader.array("teachers/t/topk_dlogp")
    picks = rng.integers(0, args.shards * n, args.random_reads)
    t0 = time.perf_counter()
    for row in picks:
        np.asarray(arr[int(row), int(rng.integers(0, v))])
    random_rate = args.random_reads / (time.perf_counter() - t0)
    objects = sum(1 for _, _, fs in os.walk(os.path.join(url, "teachers")) for f in fs if f != "zarr.json")
    return {"layout": layout, "classes": c, "k": k, "views": views, "teacher_objects": objects, "teacher_bytes_per_view": teacher_bytes / views,
            "total_bytes_per_view": total_bytes / views, "fp16_full_bytes_per_view": 2 * c,
            "ratio_to_fp16_full": teacher_bytes / views / (2 * c), "max_weight_error": max_err,
            "write_views_per_s": views / write_s, "stream_read_views_per_s": stream,
            "stream_read_unchecked_views_per_s": stream_raw, "check_cost": stream_raw / stream - 1,
            "random_read_views_per_s": random_rate, "stream_over_random": stream / random_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples-per-shard", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--random-reads", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results/cache.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="pld-cache-bench-")
    rows = []
    try:
        for c in (10, 100, 1000):
            for k in sorted({min(8, c), min(32, c), c}):
                for layout in ("one_chunk_per_object", "sharded"):
                    row = run(c, k, args, root, layout)
                    rows.append(row)
                    print(f"C={c:>5} k={k:>5} {layout:>20}: {row['teacher_bytes_per_view']:7.1f} B/view teacher "
                          f"({row['ratio_to_fp16_full']:.3f}x fp16 full), {row['total_bytes_per_view']:7.1f} B/view all, "
                          f"{row['teacher_objects']} teacher objects | max weight err {row['max_weight_error']:.1e} | "
                          f"write {row['write_views_per_s']:,.0f} views/s | stream {row['stream_read_views_per_s']:,.0f} "
                          f"views/s (unchecked {row['stream_read_unchecked_views_per_s']:,.0f}, check "
                          f"+{100 * row['check_cost']:.0f}%) vs random {row['random_read_views_per_s']:,.0f} "
                          f"({row['stream_over_random']:,.0f}x)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write_results(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
