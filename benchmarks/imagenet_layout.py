"""The cache at ImageNet scale on an object store: how many objects, how big, how fast a student epoch reads.

    python benchmarks/imagenet_layout.py [--shards 2] [--views 16] [--k 32]

1. Layout. ImageNet-1k in the usual webdataset form, 1,281,167 images in 1,024 shards (1,252 rows each), 16
   views, top-32 of 1,000 classes, temperatures 1, 2, 4. `--shards` of those data shards are written with the
   real writer (synthetic teacher logits shaped like a trained classifier's, benchmarks/cache_bench.py); every
   object they add is counted and sized by array, and the counts are scaled to all 1,024 shards (the per-shard
   layout is identical; root metadata is written once).
2. Read rate. The same cache is copied to a local S3 server (moto's, in its own process) and read the way a
   student epoch reads it: per data shard, the samples unit and every view of one teacher (`Cache.read`, each
   unit checked against its marker). Beside it, the same cache in the layout before the sharding codec (every
   per-view chunk its own object), read the same way: what adopting the codec changed.

Writes benchmarks/results/imagenet_layout.json and prints the tables.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from pld_pipeline.cache import CacheMeta, Cache, SampleStatus, ShardRecord, TeacherBlock, TeacherRecord
from pld_pipeline.cache import schema
from pld_pipeline.cache.encode import encode_teacher_logits
from pld_pipeline.views import ViewRecipe

from _results import write_results  # benchmarks/ helper (scripts run from this folder)
from _servers import start_s3
from cache_bench import teacher_logits

IMAGES, SHARDS, CLASSES, TEMPS = 1_281_167, 1024, 1000, (1.0, 2.0, 4.0)


def write_cache(url: str, shards: int, views: int, k: int) -> CacheMeta:
    rows = -(-IMAGES // SHARDS)
    g = torch.Generator().manual_seed(0)
    records = [ShardRecord(f"imagenet-train-{i:06d}.tar", f"/x/imagenet-train-{i:06d}.tar", rows, 0, f"{i:064x}",
                           f"q{i}") for i in range(shards)]
    prep = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": [3, 224, 224]}
    teacher = TeacherRecord("t", "synthetic", None, None, prep, k, TEMPS, "int16")
    meta = CacheMeta(num_classes=CLASSES, rows_per_shard=rows, key_bytes=24, shards=records,
                     recipe=ViewRecipe(name="imagenet", size=224).to_dict(), num_views=views, seed=0,
                     teachers={"t": teacher})
    writer = Cache.create_or_extend(url, meta, overwrite=True)
    for s in range(shards):
        labels = torch.randint(0, CLASSES, (rows,), generator=g)
        per_view = labels.repeat_interleave(views)
        enc = encode_teacher_logits(teacher_logits(rows * views, CLASSES, per_view, g), per_view, k=k, temperatures=TEMPS)
        block = TeacherBlock(enc["topk_idx"].reshape(rows, views, k).numpy(), enc["topk_logp"].reshape(rows, views, k).numpy(),
                             enc["label_logp"].reshape(rows, views).numpy(), enc["logz"].reshape(rows, views, -1).numpy(),
                             correct=0, count=rows * views)
        keys = [f"n{int(labels[i]):08d}_{s * rows + i:08d}" for i in range(rows)]  # ImageNet-like keys
        writer.write_samples(s, keys, labels.numpy().astype(np.int32), np.full(rows, SampleStatus.OK, np.uint8),
                             np.random.default_rng(s).integers(0, 256, (rows, 16), np.uint8))
        params = np.random.default_rng(s).integers(0, 224, (rows, views, 5), np.int32)  # boxes and flips
        params[..., 4] &= 1
        writer.write_views(s, (0, views), params)
        writer.write_teacher(s, "t", (0, views), block)
    return meta


def objects_by_array(url: str, shards: int) -> dict[str, list[int]]:
    """Sizes of the objects the data shards added, grouped by array (markers and indexes as their own groups)."""
    out: dict[str, list[int]] = defaultdict(list)
    for folder, _, files in os.walk(url):
        rel = os.path.relpath(folder, url)
        for f in files:
            if f == "zarr.json" and not rel.startswith(("units", "unit_index")):
                continue  # array and group metadata: written once per cache, not per shard
            group = "units (markers)" if rel.startswith("units") else "unit_index" if rel.startswith("unit_index") \
                else rel.split("/c")[0] if "/c" in rel else rel
            out[group].append(os.path.getsize(os.path.join(folder, f)))
    return out


def one_chunk_per_object(src: str, dst: str, meta: CacheMeta) -> list[str]:
    """The same cache in the layout before the sharding codec: every per-view chunk its own object. Same data,
    same markers (their checksums cover array values, not objects), so it is a valid cache to read alike."""
    import zarr
    shutil.copytree(src, dst)
    root_in, root_out = zarr.open_group(src, mode="r"), zarr.open_group(dst, mode="r+")
    paths = schema.per_view_paths(meta)
    for path in paths:
        a = root_in[path]
        root_out.create_array(path, shape=a.shape, chunks=a.chunks, dtype=a.dtype, fill_value=a.fill_value,
                              compressors=schema.compressors(), overwrite=True)
        root_out[path][...] = a[...]
    return paths


def timed(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="pld-imagenet-")
    try:
        url = os.path.join(tmp, "cache.zarr")
        t0 = time.perf_counter()
        meta = write_cache(url, args.shards, args.views, args.k)
        write_s = time.perf_counter() - t0
        groups = objects_by_array(url, args.shards)
        scale = SHARDS / args.shards
        layout = {g: {"objects_per_data_shard": len(s) / args.shards, "objects_total": round(len(s) * scale),
                      "median_bytes": int(statistics.median(s)), "min_bytes": min(s), "max_bytes": max(s),
                      "bytes_total": round(sum(s) * scale)} for g, s in sorted(groups.items())}
        total_objects = sum(v["objects_total"] for v in layout.values())
        total_bytes = sum(v["bytes_total"] for v in layout.values())
        small = sum(v["objects_total"] for v in layout.values() if v["median_bytes"] < 16 * 1024)
        print("| array | objects per data shard | objects (1,024 shards) | median / min / max bytes | total GiB |\n"
              "|---|---|---|---|---|")
        for g, v in layout.items():
            print(f"| {g} | {v['objects_per_data_shard']:.0f} | {v['objects_total']:,} | {v['median_bytes']:,} / "
                  f"{v['min_bytes']:,} / {v['max_bytes']:,} | {v['bytes_total'] / 2**30:.3f} |")
        print(f"total: {total_objects:,} objects, {total_bytes / 2**30:.2f} GiB, "
              f"{total_bytes / (IMAGES * args.views):.1f} bytes per view; {small:,} objects under 16 KiB")

        proc, _ = start_s3()
        try:
            import s3fs
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("pld-bench")
            fs.put(url, "pld-bench/cache.zarr", recursive=True)
            s3_url = "s3://pld-bench/cache.zarr"
            before_url = os.path.join(tmp, "one_chunk_per_object.zarr")
            paths = one_chunk_per_object(url, before_url, meta)
            fs.put(before_url, "pld-bench/before.zarr", recursive=True)
            before_s3 = "s3://pld-bench/before.zarr"
            local, remote, remote_before = Cache(url), Cache(s3_url), Cache(before_s3)
            rows = meta.rows_per_shard
            epoch = lambda cache: [cache.read(s, "t", 1.0) for s in range(args.shards)]  # noqa: E731
            t_local, t_s3, t_s3_before = timed(lambda: epoch(local)), timed(lambda: epoch(remote)), \
                timed(lambda: epoch(remote_before))
            import zarr
            raw = lambda root: [np.asarray(root[p][s * rows:(s + 1) * rows]) for s in range(args.shards) for p in paths]  # noqa: E731
            t_raw, t_raw_before = timed(lambda: raw(zarr.open_group(s3_url, mode="r"))), \
                timed(lambda: raw(zarr.open_group(before_s3, mode="r")))
            objects = sum(len(fs.find(f"pld-bench/cache.zarr/{p}")) - 1 for p in paths) / args.shards
            objects_before = sum(len(fs.find(f"pld-bench/before.zarr/{p}")) - 1 for p in paths) / args.shards
        finally:
            proc.terminate()
            proc.wait(10)
        n = args.shards * rows
        reads = {
            "student_epoch_local_samples_per_s": n / t_local,
            "student_epoch_s3_samples_per_s": n / t_s3,
            "student_epoch_s3_one_chunk_per_object_samples_per_s": n / t_s3_before,
            "s3_epoch_minutes_1024_shards": IMAGES / (n / t_s3) / 60,
            "view_arrays_s3_raw_samples_per_s": n / t_raw,
            "view_arrays_s3_raw_one_chunk_per_object_samples_per_s": n / t_raw_before,
            "view_array_objects_per_data_shard": {"sharding_codec": objects, "one_chunk_per_object": objects_before},
        }
        for key, value in reads.items():
            print(f"{key}: {value if isinstance(value, dict) else round(value, 1)}")
        write_results("benchmarks/results/imagenet_layout.json",
                      {"args": vars(args), "images": IMAGES, "shards": SHARDS, "rows_per_shard": meta.rows_per_shard,
                       "write_seconds_per_shard": write_s / args.shards, "layout": layout,
                       "objects_total": total_objects, "bytes_total": total_bytes,
                       "bytes_per_view": total_bytes / (IMAGES * args.views), "objects_under_16KiB": small,
                       "reads": reads})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
