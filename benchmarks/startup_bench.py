"""Start-up cost of the light commands (`pld --help`, `inspect`, `verify`, `report`): wall time and peak RSS of a
fresh process, as ratios to `python -c "import zarr"` (the floor: these commands need zarr and numpy only). Also
how fast mistakes are refused (a typo'd loss, a --data pattern matching no file, a temperature the cache lacks,
an unknown cached teacher, a malformed digest), as a ratio to `pld --help` (goal: within 3x).

    python benchmarks/startup_bench.py [--repeats 7] [--tree after=. --tree before=/tmp/old-checkout]
                                       [--out benchmarks/results/startup.json]

Each --tree NAME=PATH is a checkout of this repository (e.g. `git archive <commit> | tar -x -C /tmp/old`); its
`cli.app` and `pld_pipeline` are imported from PATH (PYTHONPATH first). The cases run round-robin, so every tree
and command sees the same machine load (shared machines drift by 2x within a minute); medians are reported.
One tiny cache and one finished sweep folder are made first, with the current tree.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from _results import write_results  # benchmarks/ helper (scripts run from this folder)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def make_inputs(tmp: str) -> None:
    """A 2-shard digits cache (random cifar_resnet8 teacher) and a one-run sweep folder."""
    import torch
    from safetensors.torch import save_file

    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    from pld_pipeline.models import load_model
    from pld_pipeline.shards import digits_arrays, split_arrays
    from pld_pipeline.sweep import run_sweep

    images, labels, names = digits_arrays(upscale=2)
    splits = split_arrays(images[:200], labels[:200], names, os.path.join(tmp, "shards"), val_fraction=0.2,
                          shard_size=80, seed=0)
    torch.manual_seed(0)
    ckpt = os.path.join(tmp, "teacher.safetensors")
    save_file(load_model("cifar_resnet8", num_classes=10).state_dict(), ckpt)
    cache = os.path.join(tmp, "cache.zarr")
    cache_teacher(CacheTeacherConfig(data=splits["train"].pattern, out=cache,
                                     teachers=[TeacherSpec("cifar_resnet8", ckpt, "r8")], views=2, size=16, k=5,
                                     batch_size=64, workers=0, device="cpu", recipe_overrides={"pad": 2}))
    sweep = os.path.join(tmp, "sweep")
    run_sweep({"data": splits["train"].pattern, "val_data": splits["val"].pattern, "student": "cifar_resnet8",
               "loss": "ce", "epochs": 1, "num_classes": 10, "workers": 0, "device": "cpu",
               "recipe": {"name": "cifar", "size": 16, "pad": 2}}, {"seed": [0]}, [], sweep)


def run_once(argv: list[str], tree: str | None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=tree or ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1, 2):  # 2: a refusal (the mistake cases)
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return seconds, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tree", action="append", default=None, help="NAME=PATH (default: after=this checkout)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "startup.json"))
    ap.add_argument("--make-inputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_inputs:
        make_inputs(args.make_inputs)
        return
    trees = dict(t.split("=", 1) for t in (args.tree or [f"after={ROOT}"]))
    trees = {name: os.path.abspath(path) for name, path in trees.items()}
    with tempfile.TemporaryDirectory() as tmp:
        # made in a child: a child's peak RSS counts its parent's at fork, so this process must stay small
        subprocess.run([sys.executable, __file__, "--make-inputs", tmp], check=True, stdout=subprocess.DEVNULL)
        cache, sweep = os.path.join(tmp, "cache.zarr"), os.path.join(tmp, "sweep")
        pld = [sys.executable, "-c", "import sys; from cli.app import main; sys.argv[0] = 'pld'; main()"]
        commands = {"pld --help": ["--help"], "pld inspect CACHE": ["inspect", cache],
                    "pld verify CACHE": ["verify", cache], "pld report DIR": ["report", sweep]}
        train = os.path.join(tmp, "shards", "train-{000000..000001}.tar")
        distill = ["distill", "--student", "cifar_resnet8", "--out", os.path.join(tmp, "run"), "--cache", cache]
        commands.update({  # mistakes: each must be refused, before torch is imported
            "refuse: --loss pdl": distill + ["--data", train, "--loss", "pdl"],
            "refuse: --data matching no file": distill + ["--data", os.path.join(tmp, "shards", "x-{0..3}.tar")],
            "refuse: uncached --temperature": distill + ["--data", train, "--temperature", "3"],
            "refuse: unknown cached --teacher": distill + ["--data", train, "--teacher", "r9"],
            "refuse: malformed --expect-digest": distill + ["--data", train, "--expect-digest", "sha256:0"],
            "refuse: --student resnet56 (timm name)": ["distill", "--student", "resnet56", "--out",
                                                       os.path.join(tmp, "run"), "--data", train, "--loss", "ce"],
        })
        cases = {("floor", 'python -c "import zarr"'): ([sys.executable, "-c", "import zarr"], None)}
        cases.update({(tree, cmd): (pld + argv, path) for cmd, argv in commands.items() for tree, path in trees.items()})
        for argv, tree in cases.values():  # warm the page cache and the .pyc files
            run_once(argv, tree)
        times: dict = {c: [] for c in cases}
        rss: dict = {c: [] for c in cases}
        for _ in range(args.repeats):
            for c, (argv, tree) in cases.items():
                s, m = run_once(argv, tree)
                times[c].append(s)
                rss[c].append(m)
    floor_s = statistics.median(times[("floor", 'python -c "import zarr"')])
    floor_m = statistics.median(rss[("floor", 'python -c "import zarr"')])
    rows = []
    print(f"{'tree':8} {'command':34} {'wall s':>8} {'x zarr':>7} {'x help':>7} {'peak MiB':>9} {'x zarr':>7}")
    for (tree, cmd), ts in times.items():
        s, m = statistics.median(ts), statistics.median(rss[(tree, cmd)])
        help_s = statistics.median(times.get((tree, "pld --help"), ts))
        rows.append({"tree": tree, "command": cmd, "wall_s": round(s, 3), "wall_ratio": round(s / floor_s, 2),
                     "help_ratio": round(s / help_s, 2), "peak_rss_mib": round(m, 1),
                     "rss_ratio": round(m / floor_m, 2)})
        print(f"{tree:8} {cmd:34} {s:8.3f} {s / floor_s:7.2f} {s / help_s:7.2f} {m:9.1f} {m / floor_m:7.2f}")
    write_results(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "repeats": args.repeats,
                             "load_avg": os.getloadavg(), "trees": trees, "rows": rows})


if __name__ == "__main__":
    main()
