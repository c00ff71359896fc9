"""cache-teacher throughput against the same teacher's bare forward on the same batches, in one run.

    python benchmarks/cache_teacher_bench.py --data '../shared/data/cifar10/cifar10-train-{000000..000001}.tar' \
        --teacher cifar_resnet56 --checkpoint ../shared/models/resnet56-4bfd9763.th

The bare forward is the ceiling: pre-decoded uint8 views already in memory, normalise + forward under
inference_mode, nothing else. cache-teacher does everything (decode in workers, view replay, top-k encoding,
compression, zarr writes in a background thread). Reported: steady-state views/s (first batch to last
shard written) and end to end (including model load, shard indexing with full sha256, metadata).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.data import expand_shards, iter_shard, pick_field
from pld_pipeline.views import IMAGE_FIELDS
from pld_pipeline.models import load_model, preprocessing_of
from pld_pipeline.views import ViewRecipe, decode_image, normalize, replay_view, view_params

from _results import write_results  # benchmarks/ helper (scripts run from this folder)


def bare_forward(args: argparse.Namespace) -> float:
    """Views/s of the teacher alone on pre-decoded views already on the device, in the same precision."""
    device = torch.device(args.device)
    model = load_model(args.teacher, checkpoint=args.checkpoint).eval().to(device, memory_format=torch.channels_last)
    prep = preprocessing_of(model)
    recipe = ViewRecipe("cifar", size=32)
    views = []
    for url in expand_shards(args.data):
        for s in iter_shard(url):
            image = decode_image(pick_field(s, IMAGE_FIELDS))
            views += [replay_view(image, view_params(recipe, 0, s["__key__"], v, 32, 32), recipe) for v in range(args.views)]
    batches = [torch.stack(views[i:i + args.batch_size]).to(device) for i in range(0, len(views), args.batch_size)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if device.type == "cuda" and args.precision == "fp32":  # as cache-teacher does: exact fp32, no TF32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode(), autocast:
        model(normalize(batches[0], prep["mean"], prep["std"]).contiguous(memory_format=torch.channels_last))
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            model(normalize(b, prep["mean"], prep["std"]).contiguous(memory_format=torch.channels_last)).float()
        _sync(device)
        return len(views) / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", default="cifar_resnet56")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default="benchmarks/results/cache_teacher.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="pld-ct-bench-")
    marks: dict[str, float] = {}

    def progress(event: dict) -> None:
        if event["event"] == "batch" and "first_batch" not in marks:
            marks["first_batch"] = time.perf_counter()
        if event["event"] in ("start", "end"):
            marks[event["event"]] = time.perf_counter()

    try:
        bare = bare_forward(args)
        t0 = time.perf_counter()
        summary = cache_teacher(CacheTeacherConfig(
            data=args.data, out=os.path.join(root, "c.zarr"), teachers=[TeacherSpec(args.teacher, args.checkpoint)],
            views=args.views, recipe="cifar", size=32, batch_size=args.batch_size, workers=args.workers,
            num_classes=10, device=args.device, precision=args.precision), progress)
        end_to_end = summary["items"] / (time.perf_counter() - t0)
        steady = summary["items"] / (marks["end"] - marks["start"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"args": vars(args), "views": summary["items"], "bare_forward_views_per_s": bare,
              "cache_teacher_views_per_s": steady, "cache_teacher_end_to_end_views_per_s": end_to_end,
              "ratio_steady": steady / bare, "ratio_end_to_end": end_to_end / bare,
              "threads": torch.get_num_threads(), "teacher_top1_on_cached_views": summary["teacher_accuracy"]}
    print(f"bare forward {bare:,.0f} views/s | cache-teacher {steady:,.0f} views/s steady "
          f"({steady / bare:.2f}x), {end_to_end:,.0f} views/s end to end ({end_to_end / bare:.2f}x) | "
          f"{summary['items']} views, top-1 {summary['teacher_accuracy']}")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
