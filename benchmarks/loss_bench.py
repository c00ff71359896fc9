"""Forward+backward cost of the PLD kernels, side by side in one run, as ratios to plain KD (what a user writes
without pld: `F.kl_div(F.log_softmax(s/T), F.log_softmax(t/T), log_target=True, reduction="batchmean") * T*T`).

    python benchmarks/loss_bench.py [--batch 256] [--classes 100 1000] [--rounds 40] [--threads 1] [--compile]
                                    [--before /tmp/old-checkout] [--loop] [--out benchmarks/results/losses.json]

Cases: PLD from a precomputed ranking with k=32 (the top-k head a cache provides) and k=C (a whole ranking),
`pld_loss` from full teacher logits (one sort per batch), the sort alone (so "after the sort" is `pld_loss` minus
it), the project's KD from a top-32 cache and CE. `--before PATH` adds the same PLD cases from another checkout
(`git archive <commit> | tar -x -C PATH`), imported under another name into this process, so before and after run
interleaved (a checkout with `teacher_order.py` cannot be one: its custom op registers once per process). `--compile` adds every case (and plain KD) through `torch.compile`; the graph count of each kernel
(`torch._dynamo.explain`: 1 graph, 0 breaks means it compiles whole) is reported either way. `--loop` adds the
paper's per-sample loop (slow).

Rounds are interleaved (every case once per round, so all see the same machine state), one torch thread by
default, medians; ratios use the calling thread's CPU time (`time.thread_time`, less sensitive than wall time to
other users of a shared machine), wall time is reported next to it, and the load average before and after each
class count. Other users load a shared machine: read the ratios, not the milliseconds.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from pld_pipeline import losses as current
from pld_pipeline.teacher_order import teacher_order

from _results import write_results  # benchmarks/ helper (scripts run from this folder)


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Plain Hinton KD on full logits, the floor users compare with."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean") * temperature * temperature


def loop_reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The published style: per sample, force the label first, argsort the teacher, reversed logcumsumexp."""
    out = []
    for i in range(student.shape[0]):
        t = teacher[i].clone()
        t[labels[i]] = float("inf")
        perm = torch.argsort(t, descending=True)
        s = student[i][perm]
        w = torch.softmax(teacher[i], 0)[perm]
        out.append((w * (torch.logcumsumexp(s.flip(0), 0).flip(0) - s)).sum())
    return torch.stack(out).mean()


def load_losses(name: str, root: str) -> ModuleType:
    """``pld_pipeline.losses`` of another checkout, imported as ``pld_<name>.losses`` next to this tree's."""
    pkg = f"pld_{name}"
    src = Path(root, "pld_pipeline")
    spec = importlib.util.spec_from_file_location(pkg, src / "__init__.py", submodule_search_locations=[str(src)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{pkg}.losses")


def graphs(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, int]:
    """(graphs, graph breaks) dynamo makes of ``fn``: (1, 0) means it compiles as one graph."""
    e = torch._dynamo.explain(fn)(x)
    torch._dynamo.reset()
    return e.graph_count, e.graph_break_count


def time_rounds(cases: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, rounds: int,
                backward: set[str]) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU milliseconds per case, every case once per round."""
    wall: dict[str, list[float]] = {n: [] for n in cases}
    cpu: dict[str, list[float]] = {n: [] for n in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            x.grad = None
            w0, c0 = time.perf_counter(), time.thread_time()
            out = fn(x)
            if name in backward:
                out.backward()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {n: {"wall_ms": 1e3 * statistics.median(wall[n]), "cpu_ms": 1e3 * statistics.median(cpu[n])}
            for n in cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="also time every case through torch.compile")
    ap.add_argument("--before", help="another checkout whose PLD kernels run side by side with this tree's")
    ap.add_argument("--loop", action="store_true", help="also time the paper's per-sample loop (slow)")
    ap.add_argument("--out", default="benchmarks/results/losses.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    trees = {"after": current} | ({"before": load_losses("before", args.before)} if args.before else {})
    rows = []
    for c in args.classes:
        s = torch.randn(args.batch, c, requires_grad=True)
        t = torch.randn(args.batch, c) * 3
        y = torch.randint(0, c, (args.batch,))
        cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"kd": lambda x: kd(x, t)}
        for tree, L in trees.items():
            tg32 = L.TeacherTargets.from_logits(t, y, k=min(32, c))
            tgc = L.TeacherTargets.from_logits(t, y)
            cases[f"pld_k32/{tree}"] = lambda x, L=L, tg=tg32: L.pld_loss_from_ranking(x, y, tg)
            cases[f"pld_kC/{tree}"] = lambda x, L=L, tg=tgc: L.pld_loss_from_ranking(x, y, tg)
            cases[f"pld_loss/{tree}"] = lambda x, L=L: L.pld_loss(x, t, y)
        tg32_t2 = current.TeacherTargets.from_logits(t, y, k=min(32, c), temperature=2.0)
        cases["kd_loss_k32"] = lambda x: current.kd_loss(x, y, tg32_t2)
        cases["ce"] = lambda x: F.cross_entropy(x, y)
        if args.loop:
            cases["loop_reference"] = lambda x: loop_reference(x, t, y)
        graph_counts = {name: graphs(fn, s) for name, fn in cases.items() if name.startswith(("pld", "kd"))}
        backward = set(cases)
        cases["sort"] = lambda x: teacher_order(t)  # forward only: no gradient flows through the teacher
        compile_s: dict[str, float] = {}
        if args.compile:
            for name in [n for n in cases if n == "kd" or n.endswith("/after")]:
                compiled = torch.compile(cases[name])
                t0 = time.perf_counter()
                compiled(s).backward()  # compiles forward and backward
                compile_s[name] = time.perf_counter() - t0
                cases[f"{name}/compiled"] = compiled
                backward.add(f"{name}/compiled")
        for fn_name, fn in cases.items():  # warm-up
            s.grad = None
            out = fn(s)
            if fn_name in backward:
                out.backward()
        load_before = os.getloadavg()
        ms = time_rounds(cases, s, args.rounds, backward)
        load_after = os.getloadavg()
        base = ms["kd"]["cpu_ms"]
        ms["pld_loss_after_sort/after"] = {k: ms["pld_loss/after"][k] - ms["sort"][k] for k in ms["sort"]}
        row = {"classes": c, "batch": args.batch, "ms": ms, "graphs": graph_counts, "compile_s": compile_s,
               "cpu_ratio_to_kd": {n: v["cpu_ms"] / base for n, v in ms.items()},
               "load_before": load_before, "load_after": load_after}
        rows.append(row)
        print(f"\nC={c} B={args.batch}, {args.threads} thread(s), {args.rounds} rounds, load "
              f"{load_before[0]:.1f} -> {load_after[0]:.1f}; ratios = CPU time / plain KD's ({base:.2f} ms)")
        print(f"{'case':34} {'cpu ms':>8} {'us/sample':>9} {'wall ms':>8} {'x KD':>6}  graphs/breaks")
        for n, v in ms.items():
            g = graph_counts.get(n.removesuffix("/compiled"))
            print(f"{n:34} {v['cpu_ms']:8.3f} {1e3 * v['cpu_ms'] / args.batch:9.2f} {v['wall_ms']:8.3f} "
                  f"{v['cpu_ms'] / base:6.2f}  {'' if g is None else f'{g[0]}/{g[1]}'}", flush=True)
    write_results(args.out, {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
                             "processor": platform.processor(), "cpus": os.cpu_count(), "before": args.before,
                             "rows": rows})


if __name__ == "__main__":
    main()
