"""The student data path (StudentData) against a plain webdataset + torchvision loader: CPU per sample and samples/s.

    python benchmarks/data_path_bench.py [--quick] [--rounds 3] [--workers 0 2] [--work DIR] [--profile-only]
                                         [--before TREE]

Issue #32's comparison, on the same shards, same workers, batch 128, one epoch per measurement:

- plain: ``wds.WebDataset(urls, shardshuffle=True).shuffle(1000).decode("pil")`` then ``RandomResizedCrop(S) +
  RandomHorizontalFlip + PILToTensor`` (``cifar``: ``RandomCrop(32, padding=4)`` instead of the resized crop) in
  a DataLoader: what a user writes without pld.
- pld: ``StudentData(urls, cache=...)``: the replayed view of each sample (bit-identical to the teacher's) plus
  its cached top-k targets, joined by key and checked (cache block reads, sample digests).

Cases: ``cifar32`` (real CIFAR-10 JPEG shards from ../shared/data/cifar10, cifar recipe, 8 views, a random
cifar_resnet8 teacher); ``in224`` (synthetic 400x350 JPEG shards made here, imagenet recipe at 224 px, 1000
classes, k=32, 8 views, a random pooled linear teacher); ``in224to160`` (the same 224 cache read by a 160-px
student, ``student_size=160``; plain side RandomResizedCrop(160)). Caches are built with ``pld cache-teacher`` in
--work (a temp dir unless given; reused when already there).

Each measurement is a fresh subprocess; CPU is ``getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN)`` around the
epoch (DataLoader workers are joined, hence counted, before the second reading), so it covers the process and its
workers but not imports or the cache open. Rounds interleave every (case, side, workers) in a shuffled order;
the ratio is per round (pld / plain of the same round), reported as the median with its range. The machine's
load average is recorded next to each round: other people share it.

The profile (cProfile, workers 0, in-process) says where StudentData's time goes: decode, replay crop/resize,
the student resize, cache block reads and checks, sample digests, tar reading, view choice, shuffle buffer,
collation and batch assembly.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: the CIFAR-10 JPEG shards (experiments only, never committed); PLD_CIFAR10 overrides
CIFAR = os.environ.get("PLD_CIFAR10", "/work/shared/data/cifar10")
BATCH = 128


# -- the teacher of the 224-px cache: its outputs' quality is irrelevant here, its cost nearly zero -----------------
def pooled_teacher(num_classes: int = 1000, **_: object):
    """A random 4x4-pooled linear teacher (cache-teacher imports it as ``data_path_bench:pooled_teacher``)."""
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, num_classes))


# -- data --------------------------------------------------------------------------------------------------------
def make_jpeg_shards(out: str, shards: int, per_shard: int, classes: int = 1000) -> list[str]:
    """Smooth random 400x350 RGB JPEGs (quality 90, 4:2:0): an upscaled random 20x18 image plus mild noise, so they
    compress and decode like photographs rather than like noise."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    urls = []
    for s in range(shards):
        url = os.path.join(out, f"synth-{s:06d}.tar")
        with tarfile.open(url, "w") as tar:
            for i in range(per_shard):
                small = Image.fromarray(rng.integers(0, 256, (18, 20, 3), dtype=np.uint8))
                img = np.asarray(small.resize((400, 350), Image.BICUBIC), dtype=np.int16)
                img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(int(rng.integers(classes))).encode())):
                    info = tarfile.TarInfo(f"s{s}_{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(url)
    return urls


def pld(*args: str) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "pld")
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([exe, *args], check=True, env=env, stdout=subprocess.DEVNULL)


def setup(work: str, quick: bool) -> dict[str, dict]:
    """The cases: shards, cache, plain transform and student size. Caches already in ``work`` are reused."""
    os.makedirs(work, exist_ok=True)
    n_cifar = 2 if quick else 4
    cifar = [os.path.abspath(os.path.join(CIFAR, f"cifar10-train-{i:06d}.tar")) for i in range(n_cifar)]
    cifar_cache = os.path.join(work, f"cifar{n_cifar}.zarr")
    if not os.path.exists(cifar_cache):
        t = time.time()
        pld("cache-teacher", "--data", "::".join(cifar), "--out", cifar_cache, "--teacher", "cifar_resnet8",
            "--num-classes", "10", "--views", "8", "--recipe", "cifar", "--size", "32", "--top-k", "10",
            "--mean", "0.4914,0.4822,0.4465", "--std", "0.247,0.243,0.261", "--quiet")
        print(f"cached {cifar_cache} in {time.time() - t:.0f} s", flush=True)
    per_shard = 128 if quick else 384
    synth_dir = os.path.join(work, f"synth{per_shard}")
    synth = [os.path.join(synth_dir, f"synth-{s:06d}.tar") for s in range(4)]
    if not all(os.path.exists(u) for u in synth):
        os.makedirs(synth_dir, exist_ok=True)
        synth = make_jpeg_shards(synth_dir, 4, per_shard)
    synth_cache = os.path.join(work, f"synth{per_shard}.zarr")
    if not os.path.exists(synth_cache):
        t = time.time()
        pld("cache-teacher", "--data", "::".join(synth), "--out", synth_cache,
            "--teacher", "data_path_bench:pooled_teacher", "--num-classes", "1000", "--views", "8",
            "--recipe", "imagenet", "--size", "224", "--top-k", "32", "--mean", "0.485,0.456,0.406",
            "--std", "0.229,0.224,0.225", "--quiet")
        print(f"cached {synth_cache} in {time.time() - t:.0f} s", flush=True)
    return {
        "cifar32": {"urls": cifar, "cache": cifar_cache, "plain": "cifar", "size": 32, "student_size": None},
        "in224": {"urls": synth, "cache": synth_cache, "plain": "rrc", "size": 224, "student_size": None},
        "in224to160": {"urls": synth, "cache": synth_cache, "plain": "rrc", "size": 160, "student_size": 160},
    }


# -- one measurement (a fresh process) -----------------------------------------------------------------------------
def plain_loader(case: dict, workers: int):
    import torch
    import webdataset as wds
    from torchvision import transforms as T
    if case["plain"] == "cifar":
        crop = T.RandomCrop(32, padding=4)
    else:
        crop = T.RandomResizedCrop(case["size"])  # bilinear, antialiased (PIL)
    tf = T.Compose([crop, T.RandomHorizontalFlip(), T.PILToTensor()])
    ds = (wds.WebDataset(case["urls"], shardshuffle=True, empty_check=False).shuffle(1000).decode("pil")
          .map(lambda s: (tf(s["jpg"]), s["cls"])))
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers)
    return ((images, labels) for images, labels in loader)


def pld_loader(case: dict, workers: int):
    from pld_pipeline.student_data import StudentData
    data = StudentData(case["urls"], cache=case["cache"], batch_size=BATCH, workers=workers,
                       student_size=case["student_size"])
    return ((b.images, b.labels) for b in data.epoch(0))


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def child(spec: dict) -> dict:
    """One epoch of one loader in this (fresh) process: CPU seconds, wall seconds and samples."""
    import gc
    import multiprocessing
    case = spec["case"]
    batches = (plain_loader if spec["side"] == "plain" else pld_loader)(case, spec["workers"])
    cpu0, wall0, n = cpu_seconds(), time.perf_counter(), 0
    for images, labels in batches:
        assert images.dtype.is_floating_point is False and images.shape[-1] == case["size"]
        n += len(labels)
    del batches
    gc.collect()
    for p in multiprocessing.active_children():
        p.join()
    return {"cpu_s": cpu_seconds() - cpu0, "wall_s": time.perf_counter() - wall0, "samples": n}


def measure(case_name: str, case: dict, side: str, workers: int, before: str | None = None) -> dict:
    spec = json.dumps({"case": case, "side": "pld" if side == "before" else side, "workers": workers})
    env = dict(os.environ)
    if side == "before":  # that tree's pld_pipeline ahead of the installed one
        env["PYTHONPATH"] = os.path.abspath(before) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], check=True,
                         capture_output=True, text=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"case": case_name, "side": side, "workers": workers, **got, "load1": os.getloadavg()[0]}


# -- where StudentData's time goes ---------------------------------------------------------------------------------
#: (label, function name as pstats spells it (file suffix, name), cumulative or own time)
PARTS = [
    ("decode (decode_image)", ("views.py", "decode_image"), "cum"),
    ("replay crop/resize/flip (replay_view)", ("views.py", "replay_view"), "cum"),
    ("  of it: box check (box_problem)", ("views.py", "box_problem"), "cum"),
    ("student resize (at_size)", ("student_data.py", "at_size"), "cum"),
    ("cache block reads + checks (Cache.read)", ("cache.py", "read"), "cum"),
    ("sample digests (sample_digest)", ("format.py", "sample_digest"), "cum"),
    ("tar reading (_members)", ("data.py", "_members"), "cum"),
    ("view choice (choose_view)", ("student_data.py", "choose_view"), "cum"),
    ("key join + per-sample bookkeeping (_samples, own)", ("student_data.py", "_samples"), "tot"),
    ("target slices (np.stack)", ("~", "<built-in method numpy"), "tot"),
    ("shuffle buffer (wds shuffle, own)", ("filters.py", "_shuffle"), "tot"),
    ("collation (default_collate)", ("collate.py", "collate"), "cum"),
    ("batch assembly (rebatch, own)", ("student_data.py", "rebatch"), "tot"),
    ("batch targets (batch_targets)", ("student_data.py", "batch_targets"), "cum"),
]


def profile(case: dict) -> dict:
    """cProfile of one StudentData epoch, workers 0, in this process (cProfile's own overhead inflates the many
    small calls: read it as shares, the subprocess runs as costs)."""
    import torch
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    batches = pld_loader(case, 0)
    prof = cProfile.Profile(time.process_time)  # CPU time: wall time on a shared machine counts others' work
    prof.enable()
    n = sum(len(labels) for _, labels in batches)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    rows = {}
    for label, (suffix, name), how in PARTS:
        secs = 0.0
        for (path, _, fn), (_, _, tt, ct, _) in stats.items():
            if path.endswith(suffix) and (fn == name or name.startswith("<") and fn.startswith(name[:-1])):
                secs += tt if how == "tot" else ct
        rows[label] = secs
    return {"samples": n, "total_s": total, "us_per_sample": {k: 1e6 * v / n for k, v in rows.items()},
            "total_us_per_sample": 1e6 * total / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, --quick 1)")
    ap.add_argument("--before", default=None, help="a source tree of an earlier pld (git archive of a commit): its "
                    "StudentData is measured too, as side 'before', in the same rounds")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--cases", nargs="+", default=["cifar32", "in224", "in224to160"])
    ap.add_argument("--work", default=None, help="where shards and caches are made (default: a temp dir)")
    ap.add_argument("--profile-only", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "data_path.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rounds = args.rounds or (1 if args.quick else 3)
    work = args.work or tempfile.mkdtemp(prefix="pld-data-path-")
    cases = {k: v for k, v in setup(work, args.quick).items() if k in args.cases}
    result = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "quick": args.quick, "profile": {}, "runs": []}
    for name, case in cases.items():
        if name != "in224to160":
            result["profile"][name] = prof = profile(case)
            print(f"\nprofile {name} (workers 0, 1 torch thread, cProfile): {prof['total_us_per_sample']:.0f} us/sample")
            for label, us in prof["us_per_sample"].items():
                print(f"  {label:52s} {us:8.1f} us")
    if not args.profile_only:
        sides = ("plain", "pld") + (("before",) if args.before else ())
        plan = [(n, side, w) for n in cases for side in sides for w in args.workers]
        for r in range(rounds):
            random.Random(r).shuffle(plan)
            for name, side, w in plan:
                got = measure(name, cases[name], side, w, args.before)
                got["round"] = r
                result["runs"].append(got)
                print(f"round {r} {name:10s} {side:5s} w{w}: {1e6 * got['cpu_s'] / got['samples']:7.0f} us CPU/sample "
                      f"{got['samples'] / got['wall_s']:7.0f} samples/s  load {got['load1']:.1f}", flush=True)
        result["summary"] = summary(result["runs"], cases, args.workers, rounds)
        print("\n| case | workers | plain CPU us/sample | pld CPU us/sample | CPU ratio pld/plain (median, range) | "
              "--before/plain | plain samples/s | pld samples/s | load1 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in result["summary"]:
            print(f"| {row['case']} | {row['workers']} | {row['plain_us']:.0f} | {row['pld_us']:.0f} | "
                  f"{row['ratio']:.2f}x ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | {row['before_ratio']:.2f}x | "
                  f"{row['plain_sps']:.0f} | {row['pld_sps']:.0f} | {row['load']:.1f} |")
    result["load_after"] = os.getloadavg()
    from _results import write_results
    write_results(args.out, result)


def summary(runs: list[dict], cases: dict, workers: list[int], rounds: int) -> list[dict]:
    rows = []
    for name in cases:
        for w in workers:
            pick = lambda side, r: next(x for x in runs if (x["case"], x["side"], x["workers"], x["round"])  # noqa: E731
                                        == (name, side, w, r))
            per = [(pick("plain", r), pick("pld", r)) for r in range(rounds)]
            ratios = [(b["cpu_s"] / b["samples"]) / (a["cpu_s"] / a["samples"]) for a, b in per]
            if any(x["side"] == "before" for x in runs):
                old = [pick("before", r) for r in range(rounds)]
                before = [(o["cpu_s"] / o["samples"]) / (a["cpu_s"] / a["samples"]) for (a, _), o in zip(per, old)]
            else:
                before = [float("nan")]
            med = lambda f: statistics.median(f(a, b) for a, b in per)  # noqa: E731
            rows.append({"case": name, "workers": w, "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios), "plain_us": med(lambda a, b: 1e6 * a["cpu_s"] / a["samples"]),
                         "pld_us": med(lambda a, b: 1e6 * b["cpu_s"] / b["samples"]),
                         "plain_sps": med(lambda a, b: a["samples"] / a["wall_s"]),
                         "pld_sps": med(lambda a, b: b["samples"] / b["wall_s"]),
                         "before_ratio": statistics.median(before),
                         "load": statistics.mean(x["load1"] for pair in per for x in pair)})
    return rows


if __name__ == "__main__":
    main()
