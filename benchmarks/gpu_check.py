"""The body of benchmarks/gpu_check.sh: everything the first GPU should tell us, in one run under 9 minutes.

1. the CUDA-marked tests (tests/test_cuda.py: losses under bf16 autocast against float64, pinned batches,
   cache-teacher and distill smoke runs on the GPU, fp32 GPU cache against the CPU one, a one-rank NCCL group);
2. cache-teacher throughput against the bare teacher forward on the same views (bf16, resnet56, 50k images);
3. one distill epoch from the cache (PLD) against one CE epoch without a cache, same student and data.
``--tiny``: the same steps on CPU with 64 images and a small teacher, so CI keeps the script working.
Writes gpu_check.json (and the steps' own JSON) under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step(name: str, cmd: list[str], results: dict, timeout: int) -> None:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, text=True, capture_output=True)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, f"timed out after {timeout}s"
    print(tail, flush=True)
    results["steps"][name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def synthetic_shards(out: str, n: int) -> str:
    """CIFAR-10-sized data (32x32 JPEG, 10 classes) when no real shards are given: same decode and compute."""
    from pld_pipeline.shards import write_split
    import io
    from PIL import Image
    rng = np.random.default_rng(0)

    def jpeg(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        return buf.getvalue()

    split = write_split(((f"img{i:06d}", jpeg(i), "jpg", i % 10) for i in range(n)), out, "train", 2000)
    return split.pattern


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU, 64 images, a small teacher: a one-minute smoke run")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                     "torch": torch.__version__, "tiny": args.tiny, "steps": {}}
    py = sys.executable

    step("cuda tests", [py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", f"--junitxml={out}/cuda_tests.xml"],
         results, timeout=180)

    data = os.environ.get("DATA") or synthetic_shards(os.path.join(out, "data"), 64 if args.tiny else 50_000)
    teacher, ckpt = ("cifar_resnet8", None) if args.tiny else ("cifar_resnet56", os.environ.get("TEACHER_CKPT"))
    bench = [py, "benchmarks/cache_teacher_bench.py", "--data", data, "--teacher", teacher, "--views", "1",
             "--device", device, "--precision", "bf16" if cuda else "fp32", "--workers", "2" if args.tiny else "12",
             "--batch-size", "32" if args.tiny else "1024", "--out", f"{out}/cache_teacher.json"]
    step("cache-teacher vs bare forward", bench + (["--checkpoint", ckpt] if ckpt else []), results, timeout=300)

    cache = os.path.join(out, "cache.zarr")
    pld = [py, "-m", "pld_pipeline"]
    common = ["--data", data, "--student", "cifar_resnet20", "--epochs", "2",
              "--batch-size", "32" if args.tiny else "256", "--workers", "2" if args.tiny else "12",
              "--device", device, "--quiet", "--json"]
    step("cache for distill", pld + ["cache-teacher", "--data", data, "--teacher", teacher, "--views", "2",
                                     "--size", "32", "--num-classes", "10", "--device", device, "--quiet",
                                     "--workers", "2" if args.tiny else "12", "--out", cache]
         + (["--teacher-checkpoint", ckpt] if ckpt else []), results, timeout=240)
    for name, extra in (("distill pld from cache", ["--loss", "pld", "--cache", cache]),
                        ("distill ce without cache", ["--loss", "ce", "--num-classes", "10"])):
        step(name, pld + ["distill", *common, *extra, "--out", os.path.join(out, name.replace(" ", "-"))],
             results, timeout=240)
        metrics = os.path.join(out, name.replace(" ", "-"), "metrics.jsonl")
        if os.path.isfile(metrics):
            rows = [json.loads(line) for line in open(metrics)]
            results["steps"][name]["epoch_seconds"] = rows[-1]["epoch_seconds"]  # the second epoch (warm)
    e = results["steps"]
    if "epoch_seconds" in e.get("distill pld from cache", {}) and "epoch_seconds" in e.get("distill ce without cache", {}):
        results["distill_from_cache_over_ce"] = e["distill pld from cache"]["epoch_seconds"] / e["distill ce without cache"]["epoch_seconds"]
    ct = os.path.join(out, "cache_teacher.json")
    if os.path.isfile(ct):
        results["cache_teacher_over_bare_forward"] = json.load(open(ct))["ratio_steady"]
    results["ok"] = all(s["rc"] == 0 for s in results["steps"].values())
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
