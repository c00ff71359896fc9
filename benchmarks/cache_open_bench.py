"""Opening a cache, against its shard count: wall and CPU seconds, and the store requests one open makes, for
`Cache(url)`, `StudentData(data, cache=url)` (what `pld distill` does first), `inspect_cache` and `verify_cache`,
over a local folder, a plain HTTP host and an S3 server (moto), side by side for one or more source trees.

    python benchmarks/cache_open_bench.py [--shards 8 32 128] [--where local http s3] [--rounds 2] [--ops ...]
                                          [--tree after=. --tree before=/tmp/old-checkout]
                                          [--out benchmarks/results/cache_open.json]

Each --tree NAME=PATH is a checkout of this repository (e.g. `git archive <commit> | tar -x -C /tmp/old`), imported
from PATH (PYTHONPATH first). The caches are tiny (2 digits images per shard, 2 views, a random cifar_resnet8
teacher), made once with the current tree, so the time is the per-shard overhead of opening, not data. Every
measurement is a fresh process (imports excluded from the figures); trees and cases run round-robin within each
round, so they share the machine's load; medians over rounds are reported, with `uptime`'s load beside them.

``requests``: store ``get`` calls one operation made; ``rounds``: round trips one after another, the longest chain
of gets each issued after the one before it returned (a loop of blocking reads makes one per request; a gather,
one per batch; it misses the link from a get in one task to a get issued after awaiting that task, so it can
undercount: an opened array's chunk read shows at the open's depth). ``busy``: how often the number of requests
in flight rose from zero (an upper figure: a get that ends just before a gathered neighbour starts counts twice).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from _results import write_results  # benchmarks/ helper (scripts run from this folder)
from _servers import start_s3

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OPS = ("cache", "student", "inspect", "verify")


# -- the child: one process per (tree, shard count, place) -----------------------------------------------------
class Requests:
    """Counts store gets and ``rounds``: the longest chain of gets each issued after the one before it returned
    (in its task and the tasks it was started from), chained through zarr's ``sync`` calls in order, as
    tests/test_cache_open.py counts them. Causal, so it does not depend on the machine's load."""

    def __init__(self) -> None:
        import contextvars
        self.gets = self.rounds = self.busy = self.in_flight = 0
        self.depth: contextvars.ContextVar[int] = contextvars.ContextVar("depth", default=0)

    def patch(self, cls: type) -> None:
        original = cls.get

        @functools.wraps(original)
        async def get(store, *args, **kwargs):
            depth = self.depth.get() + 1
            self.depth.set(depth)
            self.gets, self.rounds = self.gets + 1, max(self.rounds, depth)
            self.busy += self.in_flight == 0
            self.in_flight += 1
            try:
                return await original(store, *args, **kwargs)
            finally:
                self.in_flight -= 1

        cls.get = get

    def chain_sync_calls(self) -> None:
        import asyncio
        submit = asyncio.run_coroutine_threadsafe  # how zarr's sync() hands a coroutine to its event loop

        def chained(coro, loop):
            async def after_the_calls_before():
                self.depth.set(self.rounds)
                return await coro
            return submit(after_the_calls_before(), loop)

        asyncio.run_coroutine_threadsafe = chained


def child(url: str, data: str, names: list[str]) -> None:
    import zarr.storage

    counter = Requests()
    counter.patch(zarr.storage.LocalStore)  # LocalObjects (local folders) calls it once per object
    counter.patch(zarr.storage.FsspecStore)  # HTTP and S3
    counter.chain_sync_calls()
    import pld_pipeline
    from pld_pipeline.cache import Cache, inspect_cache, verify_cache
    from pld_pipeline.student_data import StudentData

    ops = {"cache": lambda: Cache(url), "student": lambda: StudentData(data, cache=url, workers=0, batch_size=2),
           "inspect": lambda: inspect_cache(url), "verify": lambda: verify_cache(url)}
    out = {"module": pld_pipeline.__file__}
    for name in names:
        counter.gets = counter.rounds = counter.busy = 0
        wall, cpu = time.perf_counter(), time.process_time()
        result = ops[name]()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if name == "verify":
            assert result.ok, result.problems
        out[name] = {"wall": wall, "cpu": cpu, "requests": counter.gets, "rounds": counter.rounds,
                     "busy": counter.busy}
    print("RESULT " + json.dumps(out))


# -- the parent: inputs, servers, interleaved rounds ----------------------------------------------------------
class Ranges(SimpleHTTPRequestHandler):
    """A static host: files by path and single byte range, no folder listing (as CDNs and object hosts)."""

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            self.send_error(404, "No listing here")
            return None
        spec = self.headers.get("Range")
        if not (spec and spec.startswith("bytes=") and os.path.isfile(path)):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = spec[len("bytes="):].partition("-")
        start, end = (size - int(last), size - 1) if not first else (int(first), min(int(last or size - 1), size - 1))
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, *args):
        pass


class Backlog(ThreadingHTTPServer):
    """A listen backlog like a real web server's (nginx: 511): http.server's default of 5 drops the connections of
    a reader with many requests in flight, which the client's kernel retries after a second (a test-server
    artefact: measured at first, 0.79 -> 2.70 s for 128 shards)."""
    request_queue_size = 512


def make_caches(tmp: str, counts: list[int]) -> dict[int, dict[str, str]]:
    """Per shard count: a folder of that many 2-sample shards and its cache (2 views, top-5)."""
    import torch
    from safetensors.torch import save_file

    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    from pld_pipeline.models import load_model
    from pld_pipeline.shards import digits_arrays, split_arrays

    images, labels, names = digits_arrays(upscale=2)
    torch.manual_seed(0)
    ckpt = os.path.join(tmp, "teacher.safetensors")
    save_file(load_model("cifar_resnet8", num_classes=10).state_dict(), ckpt)
    out = {}
    for n in counts:
        folder = os.path.join(tmp, f"n{n}")
        splits = split_arrays(images[:2 * n + 1], labels[:2 * n + 1], names, os.path.join(folder, "shards"),
                              val_fraction=0.4 / n, shard_size=2, seed=0)
        cache = os.path.join(folder, "cache.zarr")
        cache_teacher(CacheTeacherConfig(data=splits["train"].pattern, out=cache,
                                         teachers=[TeacherSpec("cifar_resnet8", ckpt, "r8")], views=2, size=16, k=5,
                                         batch_size=64, workers=0, device="cpu", recipe_overrides={"pad": 2}))
        out[n] = {"data": splits["train"].pattern, "cache": cache, "rel": os.path.relpath(cache, tmp)}
    return out


def run_child(tree: str, url: str, data: str, env: dict[str, str], ops: list[str]) -> dict:
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([tree, HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", url, data, "--ops", *ops],
                          env=full,
                          capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"child failed for {url}:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def load() -> str:
    """The 1-minute load average (`uptime`'s first figure)."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("URL", "DATA"))
    ap.add_argument("--shards", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--where", nargs="+", default=["local", "http", "s3"], choices=["local", "http", "s3"])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH (default: this=.)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cache_open.json"))
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.ops)
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": ROOT}
    trees = {k: os.path.abspath(v) for k, v in trees.items()}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        caches = make_caches(tmp, args.shards)
        print(f"made {len(caches)} caches in {time.time() - t0:.0f} s", flush=True)
        urls = {(n, "local"): c["cache"] for n, c in caches.items()}
        servers = []
        env: dict[str, str] = {}
        if "http" in args.where:
            server = Backlog(("127.0.0.1", 0), functools.partial(Ranges, directory=tmp))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
            urls.update({(n, "http"): f"http://127.0.0.1:{server.server_port}/{c['rel']}" for n, c in caches.items()})
        moto = None
        if "s3" in args.where:
            moto, env = start_s3()
            import s3fs
            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            for n, c in caches.items():
                fs.put(c["cache"], f"bench/n{n}.zarr", recursive=True)
                urls[(n, "s3")] = f"s3://bench/n{n}.zarr"
        results: dict[str, list] = {}
        try:
            for r in range(args.rounds):
                for n in args.shards:
                    for where in args.where:
                        for name, tree in trees.items():
                            got = run_child(tree, urls[(n, where)], caches[n]["data"], env, args.ops)
                            got["load"] = load()
                            results.setdefault(f"{name}|{n}|{where}", []).append(got)
                            print(f"round {r} {name:>7} {n:4d} shards {where:5s} load {got['load']}: " + "  ".join(
                                f"{op} {got[op]['wall']:.2f}s/{got[op]['cpu']:.2f}s cpu {got[op]['requests']} req "
                                f"{got[op]['rounds']}/{got[op]['busy']} rounds" for op in args.ops), flush=True)
        finally:
            for server in servers:
                server.shutdown()
            if moto is not None:
                moto.terminate()
                moto.wait(10)
    table = summarise(results, trees, args)
    print(table)
    write_results(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args),
                             "trees": trees, "runs": results, "table": table})


def summarise(results: dict[str, list], trees: dict[str, str], args: argparse.Namespace) -> str:
    """Medians per (op, shards, place, tree): wall / CPU seconds, requests, rounds; then after/before ratios."""
    names = list(trees)
    head = "| op | shards | where | " + " | ".join(f"{t} wall s / CPU s / requests / rounds (busy)" for t in names)
    head += " | load (1 min) |" + ("".join(f" {names[0]}/{t} wall |" for t in names[1:]))
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for op in args.ops:
        for n in args.shards:
            for where in args.where:
                cells, walls, loads = [], [], []
                for t in names:
                    runs = results[f"{t}|{n}|{where}"]
                    med = {k: statistics.median(run[op][k] for run in runs) for k in ("wall", "cpu", "requests",
                                                                                       "rounds", "busy")}
                    walls.append(med["wall"])
                    loads += [float(run["load"]) for run in runs]
                    cells.append(f"{med['wall']:.2f} / {med['cpu']:.2f} / {med['requests']:.0f} / {med['rounds']:.0f} ({med['busy']:.0f})")
                ratio = "".join(f" {walls[0] / w:.1f}x |" if w else " - |" for w in walls[1:])
                rows.append(f"| {op} | {n} | {where} | " + " | ".join(cells)
                            + f" | {statistics.median(loads):.1f} |" + ratio)
    return "\n".join(rows)


if __name__ == "__main__":
    main()
