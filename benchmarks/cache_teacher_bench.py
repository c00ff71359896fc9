"""cache-teacher throughput against the same teacher's bare forward on the same batches, in one run.

    python benchmarks/cache_teacher_bench.py --data '../shared/data/cifar10/cifar10-train-{000000..000001}.tar' \
        --teacher cifar_resnet56 --checkpoint ../shared/models/resnet56-4bfd9763.th

The bare forward is the ceiling: pre-decoded uint8 views already in memory, normalise + forward under
inference_mode, nothing else. cache-teacher does everything (decode in workers, view replay, top-k encoding,
compression, zarr writes in a background thread). Reported: steady-state views/s (first batch to last
shard written) and end to end (including model load, shard indexing with full sha256, metadata).

``--rounds R`` adds CPU per view (issue 32 item 4): each case runs in a fresh subprocess, rounds interleaved
(bare, cache-teacher, [before]; order alternating per round), CPU = ``getrusage(SELF) + getrusage(CHILDREN)``
around the timed part (decode workers are children, reaped when the loader ends; the writer thread is in SELF).
The bare side is what a user writes: ``model(normalize(x))`` under ``torch.inference_mode`` on the same replayed
batches, same torch threads. cache-teacher's CPU is the whole ``cache_teacher()`` call (model load and shard
indexing included: small next to the forward). ``--before TREE`` runs another checkout's pld_pipeline as a third
case, side by side. ``--profile`` adds a cProfile breakdown of cache-teacher's CPU (workers 0 so decode and
replay run in the profiled process; the writer thread profiled on its own):

    python benchmarks/cache_teacher_bench.py --data '../shared/data/cifar10/cifar10-test-{000000..000001}.tar' \
        --teacher cifar_resnet20 --views 2 --rounds 3 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
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
    batches = [b.to(device) for b in replayed_batches(args)]
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
        return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def replayed_batches(args: argparse.Namespace) -> list[torch.Tensor]:
    """The views cache-teacher computes (same recipe, seed 0), batched as it batches them."""
    recipe = ViewRecipe("cifar", size=32)
    views = []
    for url in expand_shards(args.data):
        for s in iter_shard(url):
            image = decode_image(pick_field(s, IMAGE_FIELDS))
            views += [replay_view(image, view_params(recipe, 0, s["__key__"], v, 32, 32), recipe) for v in range(args.views)]
    return [torch.stack(views[i:i + args.batch_size]) for i in range(0, len(views), args.batch_size)]


def child_bare(args: argparse.Namespace) -> dict:
    """CPU and wall of the bare forward over every replayed batch (decode and replay done before timing)."""
    model = load_model(args.teacher, checkpoint=args.checkpoint, num_classes=10).eval()
    model = model.to(memory_format=torch.channels_last)
    prep = preprocessing_of(model)
    batches = replayed_batches(args)
    with torch.inference_mode():
        model(normalize(batches[0], prep["mean"], prep["std"]).contiguous(memory_format=torch.channels_last))
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        for b in batches:
            model(normalize(b, prep["mean"], prep["std"]).contiguous(memory_format=torch.channels_last)).float()
        return {"cpu_s": cpu_seconds() - cpu0, "wall_s": time.perf_counter() - wall0,
                "views": sum(len(b) for b in batches)}


def _config(args: argparse.Namespace, out: str, workers: int) -> CacheTeacherConfig:
    return CacheTeacherConfig(
        data=args.data, out=out, teachers=[TeacherSpec(args.teacher, args.checkpoint)], views=args.views,
        recipe="cifar", size=32, batch_size=args.batch_size, workers=workers, num_classes=10, device=args.device,
        precision=args.precision, **({"save_seconds": args.save_seconds} if args.save_seconds else {}))


def child_cache(args: argparse.Namespace) -> dict:
    """CPU and wall of one whole cache_teacher() call into a fresh folder (decode workers reaped at its end)."""
    import multiprocessing
    root = tempfile.mkdtemp(prefix="pld-ct-bench-")
    try:
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        summary = cache_teacher(_config(args, os.path.join(root, "c.zarr"), args.workers))
        for p in multiprocessing.active_children():
            p.join()
        cpu, kids = cpu_seconds() - cpu0, resource.getrusage(resource.RUSAGE_CHILDREN)
        workers = kids.ru_utime + kids.ru_stime - kids0.ru_utime - kids0.ru_stime
        return {"cpu_s": cpu, "workers_cpu_s": workers, "wall_s": time.perf_counter() - wall0,
                "views": summary["items"], "stored_bytes_sha256": stored_bytes_hash(os.path.join(root, "c.zarr"))}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def stored_bytes_hash(root: str) -> str:
    """sha256 over every stored chunk file (path and bytes): equal across runs and trees when not one stored byte
    changed (the cache digest covers markers, which carry the time they were written, so it differs per run)."""
    import hashlib
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root)
            if f"{os.sep}c{os.sep}" in f"{os.sep}{rel}":
                h.update(rel.encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def measure(args: argparse.Namespace, side: str) -> dict:
    argv = [a for a in sys.argv[1:] if a not in ("--profile",)]
    env = dict(os.environ)
    if side == "before":  # that tree's pld_pipeline ahead of the installed one
        env["PYTHONPATH"] = os.path.abspath(args.before) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", side], check=True,
                         capture_output=True, text=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"side": side, **got, "load1": os.getloadavg()[0]}


#: (label, (file suffix, function name) as pstats spells them, cumulative or own time)
PARTS = [
    ("tar reading (iter_shard members)", ("data.py", "_members"), "cum"),
    ("sample digests (sample_digest)", ("format.py", "sample_digest"), "cum"),
    ("decode (decode_image)", ("views.py", "decode_image"), "cum"),
    ("view params (view_params)", ("views.py", "view_params"), "cum"),
    ("replay (replay_view)", ("views.py", "replay_view"), "cum"),
    ("collation (default_collate)", ("collate.py", "collate"), "cum"),
    ("teacher forward (Module._call_impl)", ("module.py", "_call_impl"), "cum"),
    ("top-k / log-softmax encode (encode_teacher_logits)", ("encode.py", "encode_teacher_logits"), "cum"),
    ("buffer fill (_ShardBuffer.add)", ("cache_teacher.py", "add"), "cum"),
    ("writer thread: shard units (_write_shard; zarr's codec threads not profiled)", ("cache_teacher.py", "_write_shard"), "cum"),
    ("  of it: checksums (sha256 of unit bytes)", ("~", "<built-in method _hashlib.openssl_sha256>"), "tot"),
    ("writer: progress saves (_save_rows)", ("cache_teacher.py", "_save_rows"), "cum"),
    ("shard indexing (index_shard)", ("data.py", "index_shard"), "cum"),
    ("model load (load_model)", ("models.py", "load_model"), "cum"),
]


def profile(args: argparse.Namespace) -> dict:
    """cProfile of one cache_teacher() call with workers 0, CPU clock; the writer thread's calls profiled in that
    thread and added in. cProfile inflates many small calls: read it as shares; the subprocess runs are costs."""
    import threading
    from pld_pipeline import cache_teacher as ct
    writer_stats: list[cProfile.Profile] = []
    lock = threading.Lock()

    def profiled(fn):
        def run(*a, **kw):
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            try:
                return fn(*a, **kw)
            finally:
                prof.disable()
                with lock:
                    writer_stats.append(prof)
        return run

    originals = ct._write_shard, ct._save_rows
    ct._write_shard, ct._save_rows = profiled(ct._write_shard), profiled(ct._save_rows)
    root = tempfile.mkdtemp(prefix="pld-ct-prof-")
    prof = cProfile.Profile(time.thread_time)
    try:
        prof.enable()
        summary = cache_teacher(_config(args, os.path.join(root, "c.zarr"), 0))
        prof.disable()
    finally:
        ct._write_shard, ct._save_rows = originals
        shutil.rmtree(root, ignore_errors=True)
    st = pstats.Stats(prof)
    for p in writer_stats:
        st.add(p)
    total = sum(tt for (_, _, tt, _, _) in st.stats.values())
    rows = {}
    for label, (suffix, name), how in PARTS:
        secs = 0.0
        for (path, _, fn), (_, _, tt, ct_, _) in st.stats.items():
            if path.endswith(suffix) and fn == name:
                secs += tt if how == "tot" else ct_
        rows[label] = secs
    n = summary["items"]
    return {"views": n, "total_s": total, "us_per_view": {k: 1e6 * v / n for k, v in rows.items()},
            "total_us_per_view": 1e6 * total / n}


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
    ap.add_argument("--rounds", type=int, default=0, help="CPU-per-view rounds (fresh subprocesses, interleaved)")
    ap.add_argument("--before", default=None, help="another checkout's tree: a third case, its pld_pipeline")
    ap.add_argument("--profile", action="store_true", help="cProfile breakdown of cache-teacher's CPU")
    ap.add_argument("--save-seconds", type=float, default=None, help="cache-teacher's --save-seconds")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps((child_bare if args.child == "bare" else child_cache)(args)))
        return
    if args.rounds:
        cpu_rounds(args)
        return
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


def cpu_rounds(args: argparse.Namespace) -> None:
    """CPU per view and views/s of each case, fresh subprocesses, interleaved rounds; then the profile."""
    sides = ["bare", "cache"] + (["before"] if args.before else [])
    runs = []
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            m = measure(args, side)
            runs.append(m)
            print(f"round {r} {side:6s} cpu {1e6 * m['cpu_s'] / m['views']:7.1f} us/view  "
                  f"{m['views'] / m['wall_s']:7.0f} views/s  load {m['load1']:.1f}", flush=True)
    def median(side: str, f) -> float:
        import statistics
        return statistics.median(f(m) for m in runs if m["side"] == side)
    table = {side: {"cpu_us_per_view": median(side, lambda m: 1e6 * m["cpu_s"] / m["views"]),
                    "views_per_s": median(side, lambda m: m["views"] / m["wall_s"]),
                    "load1": [m["load1"] for m in runs if m["side"] == side]} for side in sides}
    bare = table["bare"]
    for side in sides:
        t = table[side]
        t["cpu_ratio"] = t["cpu_us_per_view"] / bare["cpu_us_per_view"]
        t["throughput_ratio"] = t["views_per_s"] / bare["views_per_s"]
        print(f"{side:6s} median cpu {t['cpu_us_per_view']:7.1f} us/view ({t['cpu_ratio']:.2f}x bare), "
              f"{t['views_per_s']:7.0f} views/s ({t['throughput_ratio']:.2f}x)")
    digests = {m["stored_bytes_sha256"] for m in runs if m["side"] != "bare"}
    print(f"stored chunk bytes across cache-teacher runs (and trees): {len(digests)} distinct")
    result = {"args": vars(args), "threads": torch.get_num_threads(), "runs": runs, "median": table,
              "digests": sorted(digests), "uptime": os.popen("uptime").read().strip()}
    if args.profile:
        result["profile"] = prof = profile(args)
        print(f"profile (workers 0, cProfile CPU, {prof['views']} views): {prof['total_us_per_view']:.0f} us/view")
        for label, us in prof["us_per_view"].items():
            print(f"  {label:55s} {us:7.1f} us/view")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
