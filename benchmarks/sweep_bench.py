"""A sweep of N students costs about N times one student, and no teacher time: measured in one run.

    python benchmarks/sweep_bench.py [--students 3] [--epochs 4]

On the bundled digits: make shards, train a teacher and cache it (the one-off cost), then time one student
alone and a sweep of N students (seeds) sequentially and with --jobs 2, all from the same cache.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.shards import digits_arrays, split_arrays
from pld_pipeline.launch import Launch
from pld_pipeline.sweep import run_sweep

from _results import write_results  # benchmarks/ helper (scripts run from this folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/sweep.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="pld-sweep-bench-")
    try:
        images, labels, names = digits_arrays()
        splits = split_arrays(images, labels, names, os.path.join(root, "data"), val_fraction=0.2, shard_size=288, seed=0)
        common = dict(data=splits["train"].pattern, val_data=splits["val"].pattern, batch_size=64, lr=3e-3,
                      workers=1, device="cpu")
        t0 = time.perf_counter()
        distill(DistillConfig(out=os.path.join(root, "teacher"), student="cifar_resnet20", loss="ce", epochs=3,
                              num_classes=10, recipe={"name": "cifar", "size": 16, "pad": 2}, **common))
        cache = os.path.join(root, "cache.zarr")
        cache_teacher(CacheTeacherConfig(data=common["data"], out=cache, views=4, recipe="cifar", size=16, k=None,
                                         recipe_overrides={"pad": 2}, workers=1, device="cpu",
                                         teachers=[TeacherSpec("cifar_resnet20", os.path.join(root, "teacher", "best.safetensors"))]))
        teacher_once = time.perf_counter() - t0
        base = {**common, "cache": cache, "student": "cifar_resnet8", "loss": "pld", "epochs": args.epochs}
        t0 = time.perf_counter()
        distill(DistillConfig(out=os.path.join(root, "single"), **base))
        single = time.perf_counter() - t0
        seeds = {"seed": list(range(args.students))}
        t0 = time.perf_counter()
        run_sweep(base, seeds, [], os.path.join(root, "sweep1"), launch=Launch(jobs=1))
        sweep_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_sweep(base, seeds, [], os.path.join(root, "sweep2"), launch=Launch(jobs=2))
        sweep_par = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = args.students
    result = {"students": n, "epochs": args.epochs, "teacher_train_and_cache_seconds_once": teacher_once,
              "one_student_seconds": single, "sweep_sequential_seconds": sweep_seq, "sweep_jobs2_seconds": sweep_par,
              "sweep_sequential_over_n_times_one": sweep_seq / (n * single),
              "sweep_jobs2_over_n_times_one": sweep_par / (n * single)}
    print(f"teacher (train + cache, once): {teacher_once:.1f}s | one student: {single:.1f}s | sweep of {n}: "
          f"{sweep_seq:.1f}s sequential ({result['sweep_sequential_over_n_times_one']:.2f}x N*one), "
          f"{sweep_par:.1f}s with --jobs 2 ({result['sweep_jobs2_over_n_times_one']:.2f}x)")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
