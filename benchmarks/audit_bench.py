"""`pld verify --audit`: what it reports on an honest cache and on four forged ones, and what it costs per audited
view against a bare teacher forward of the same views (one process, run side by side, medians).

    python benchmarks/audit_bench.py [--n 256] [--repeats 3] [--out benchmarks/results/audit.json]

Real data (scikit-learn's digits, 16x16), a cifar_resnet14 teacher trained with CE for 4 epochs on all 1,438
training digits, cached over the first 400 with 4 views each (full logits, T {1, 2}). The forged caches are made
the way a wrong or dishonest writer would: targets from other weights (the record claiming the honest weights'
sha256), from bf16 autocast (recorded as fp32), from another normalisation (the record keeping the declared one),
and an honest cache with one unit edited and rewritten through the cache's own writer (valid checksums).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

import pld_pipeline.cache_teacher as CT
from pld_pipeline.audit import audit_cache
from pld_pipeline.cache import Cache, TeacherBlock, schema, verify_cache
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.models import file_sha256, load_model, load_state_dict
from pld_pipeline.shards import digits_arrays, split_arrays
from pld_pipeline.views import normalize

from _results import write_results  # benchmarks/ helper (scripts run from this folder)

TEACHER = "cifar_resnet14"


def build(data: str, ckpt: str, url: str) -> str:
    cache_teacher(CacheTeacherConfig(data=data, out=url, teachers=[TeacherSpec(TEACHER, ckpt, "t")], views=4, size=16,
                                     k=None, temperatures=(1.0, 2.0), batch_size=128, workers=0, device="cpu",
                                     recipe_overrides={"pad": 2}))
    return url


def forged(kind: str, data: str, ckpt: str, tmp: str) -> str:
    url = os.path.join(tmp, kind.replace(" ", "_") + ".zarr")
    saved = {name: getattr(CT, name) for name in ("file_sha256", "nullcontext", "normalize")}
    try:
        if kind == "other checkpoint":
            from safetensors.torch import save_file
            torch.manual_seed(0)
            state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in load_state_dict(ckpt).items()}
            other = os.path.join(tmp, "other.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, other)
            CT.file_sha256 = lambda path: file_sha256(ckpt)
            return build(data, other, url)
        if kind == "bf16 recorded as fp32":
            CT.nullcontext = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        elif kind == "another normalisation":
            CT.normalize = lambda x, mean, std: normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        return build(data, ckpt, url)
    finally:
        for name, value in saved.items():
            setattr(CT, name, value)


def edited(honest: str, tmp: str) -> str:
    """Rows 0-9 of view 0: the top-2 classes swapped (the label's log-prob kept consistent), re-signed."""
    url = os.path.join(tmp, "edited.zarr")
    shutil.copytree(honest, url)
    c = Cache(url, mode="r+")
    unit = next(iter(c.units(0, "teacher", "t")))
    n = c.meta.shards[0].nsamples
    a = {k: v[:n].copy() for k, v in schema.decode_teacher(c.read_unit(unit), "t").items()}
    labels = c.samples(0)[schema.LABEL.path()]
    a["topk_idx"][:10, 0, [0, 1]] = a["topk_idx"][:10, 0, [1, 0]]
    for r in range(10):
        a["label_logp"][r, 0] = a["topk_logp"][r, 0, np.flatnonzero(a["topk_idx"][r, 0] == labels[r])[0]]
    m = c.marker(unit)
    c.write_teacher(0, "t", unit.views, TeacherBlock(a["topk_idx"], a["topk_logp"], a["label_logp"], a["logz"],
                                                     m["correct"], m["count"]))
    assert verify_cache(url).ok
    return url


def bare_forward(cache: str, ckpt: str, n: int, batch: int) -> float:
    """Seconds for the teacher forward alone on n views (uint8 views made beforehand), the model loaded."""
    model = load_model(TEACHER, num_classes=10, checkpoint=ckpt).eval().to(memory_format=torch.channels_last)
    prep = Cache(cache).teacher("t").preprocessing
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch):
            xb = x[i:i + batch].contiguous(memory_format=torch.channels_last)
            torch.log_softmax(model(normalize(xb, prep["mean"], prep["std"])).double(), 1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "audit.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        images, labels, names = digits_arrays(upscale=2)
        splits = split_arrays(images, labels, names, os.path.join(tmp, "data"), val_fraction=0.2, shard_size=400, seed=0)
        distill(DistillConfig(data=splits["train"].pattern, val_data=splits["val"].pattern, out=os.path.join(tmp, "t"),
                              student=TEACHER, loss="ce", epochs=4, batch_size=64, lr=3e-3, workers=0, device="cpu",
                              num_classes=10, recipe={"name": "cifar", "size": 16, "pad": 2}))
        ckpt = os.path.join(tmp, "t", "best.safetensors")
        data = splits["train"].shards[0]
        honest = build(data, ckpt, os.path.join(tmp, "honest.zarr"))
        caches = {"honest": honest}
        for kind in ("other checkpoint", "bf16 recorded as fp32", "another normalisation"):
            caches[kind] = forged(kind, data, ckpt, tmp)
        caches["edited and re-signed"] = edited(honest, tmp)
        rows = []
        print(f"{'cache':24} {'exit':>4} {'failed':>10} {'top-1 agree':>11} {'top-k diff':>10} {'label diff':>10} "
              f"{'logz diff':>9} {'ranks off':>9} weights")
        for name, url in caches.items():
            r = audit_cache(url, data, TEACHER, checkpoint=ckpt, n=args.n, seed=0, device="cpu")
            s = r.summary()
            rows.append({"cache": name, "exit": 0 if r.ok else 1, **s, "weights_match": r.weights["match"],
                         "worst": [v.key for v in r.worst(3)]})
            print(f"{name:24} {0 if r.ok else 1:>4} {s['failed']:>4}/{s['views']:<5} {s['top1_agreement'] * 100:>10.1f}% "
                  f"{s['max_logp_diff']:>10.2g} {s['max_label_logp_diff']:>10.2g} {s['max_logz_diff']:>9.2g} "
                  f"{s['rank_mismatches']:>9} {r.weights['match']}")
        audit_s, forward_s = [], []
        for _ in range(args.repeats):  # side by side: audit (everything: open, load, read, replay, forward, compare)
            t0 = time.perf_counter()
            audit_cache(honest, data, TEACHER, checkpoint=ckpt, n=args.n, seed=1, device="cpu")
            audit_s.append(time.perf_counter() - t0)
            forward_s.append(bare_forward(honest, ckpt, args.n, 64))
    a, f = statistics.median(audit_s) / args.n, statistics.median(forward_s) / args.n
    print(f"audit {a * 1000:.2f} ms per view, bare teacher forward {f * 1000:.2f} ms per view: {a / f:.1f}x "
          f"(N = {args.n}, 1 thread, load {os.getloadavg()[0]:.1f})")
    write_results(args.out, {"machine": platform.platform(), "torch_threads": 1, "n": args.n, "repeats": args.repeats,
                             "load_avg": os.getloadavg(), "cases": rows, "audit_ms_per_view": a * 1000,
                             "forward_ms_per_view": f * 1000, "ratio": a / f})


if __name__ == "__main__":
    main()
