"""Peak RSS and wall time of each hostile input of issue 30 against the honest one, each in a fresh process
under /usr/bin/time -v (CPU only, tiny data built here).

    python benchmarks/hostile_bench.py
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def timed(code: str, env: dict | None = None) -> tuple[float, int, str]:
    """(wall s, peak RSS MiB, last stderr line) of ``python -c code``."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) // 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    before_time = proc.stderr.split("\tCommand being timed")[0]
    lines = [line for line in before_time.splitlines()
             if line.strip() and not line.startswith((" ", "Command exited"))]
    outcome = lines[-1] if lines and proc.returncode else f"ok: {proc.stdout.strip()}"
    return secs, rss, outcome.split(": ", 1)[-1][:100] if proc.returncode else outcome


def big_shard_cache(d: str) -> tuple[str, str, str, str]:
    """(honest shard, hostile shard, cache, digest): test_hostile_cache's big shard, with s2 repeated at s4."""
    from test_hostile_cache import big_shard, repeat_sample_2
    from pld_pipeline.cache import Cache
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    shard = big_shard(os.path.join(d, "big-000000.tar"))
    cache = os.path.join(d, "c.zarr")
    cache_teacher(CacheTeacherConfig(data=shard, out=cache, teachers=[TeacherSpec("cifar_resnet8", None, "t")],
                                     views=2, size=16, k=5, temperatures=(1.0,), batch_size=8, workers=0,
                                     device="cpu", num_classes=10, recipe_overrides={"pad": 2}))
    os.makedirs(os.path.join(d, "hostile"))
    hostile = os.path.join(d, "hostile", "big-000000.tar")
    data = bytearray(open(shard, "rb").read())
    repeat_sample_2(data, shard)
    open(hostile, "wb").write(bytes(data))
    return shard, hostile, cache, Cache(cache).digest()


class Trickle(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            while True:
                self.wfile.write(b" ")
                self.wfile.flush()
                threading.Event().wait(5)  # one byte every 5 s, as in the audit
        except OSError:
            pass

    def log_message(self, *a):
        pass


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def main() -> None:
    import functools

    import numpy as np
    from PIL import Image
    d = tempfile.mkdtemp(prefix="hostile-bench-")
    rows = []
    base = timed("import pld_pipeline.student_data")
    rows.append(("(reference: importing pld and torch only)", base, base))
    shard, hostile, cache, pin = big_shard_cache(d)
    epoch = """
        from pld_pipeline.student_data import StudentData
        data = StudentData({!r}, cache={!r}, expect_digest={!r}, batch_size=4, workers=1, shuffle_buffer=1)
        print(sum(len(b.labels) for b in data.epoch(0)))"""
    rows.append(("1 shard middle rewritten (s2 repeated), 1 worker", timed(epoch.format(shard, cache, pin)),
                 timed(epoch.format(hostile, cache, pin))))
    # 4: class map at /dev/zero, FIFO vs an honest map
    honest_map = os.path.join(d, "map.json")
    open(honest_map, "w").write(json.dumps([[i] for i in range(10)]))
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    cmap = "from pld_pipeline.class_map import load_class_map\nload_class_map({!r}, 10)"
    rows.append(("4 --class-map /dev/zero", timed(cmap.format(honest_map)), timed(cmap.format("/dev/zero"))))
    rows.append(("4 --class-map FIFO", timed(cmap.format(honest_map)), timed(cmap.format(fifo))))
    # 4: a gzip tar (named .tar) holding a member that claims 3 GiB; the same named .tar.gz; vs the honest shard
    from test_hostile_folders import _png_header, _tar_bytes
    raw = _tar_bytes([("a.cls", b"1"), ("a.png", b"x" * 600)], claim=3 << 30)
    open(os.path.join(d, "bomb.tar"), "wb").write(gzip.compress(raw))
    open(os.path.join(d, "bomb.tar.gz"), "wb").write(gzip.compress(raw))
    read = "from pld_pipeline.data import iter_shard\nprint(len(list(iter_shard({!r}))))"
    rows.append(("4 gzip tar named .tar", timed(read.format(shard)), timed(read.format(os.path.join(d, "bomb.tar")))))
    rows.append(("4 3 GiB member in a .tar.gz", timed(read.format(shard)),
                 timed(read.format(os.path.join(d, "bomb.tar.gz")))))
    # 4: a real 12000x12000 PNG (mostly zeros) vs a 16x16 one
    big_png = os.path.join(d, "big.png")
    Image.new("L", (12000, 12000)).save(big_png, optimize=False)
    small_png = os.path.join(d, "small.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(small_png)
    dec = "from pld_pipeline.views import decode_image\ndecode_image(open({!r}, 'rb').read())"
    rows.append((f"4 PNG 12000x12000 ({os.path.getsize(big_png) // 1024} KB)", timed(dec.format(small_png)),
                 timed(dec.format(big_png))))
    # 4: a host trickling one byte every 5 s (PLD_HTTP_TIMEOUT=10) vs the cache served honestly
    trickle = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    honest = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=d))
    for s in (trickle, honest):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    verify = "from pld_pipeline.cache import verify_cache\nprint(verify_cache({!r}).ok)"
    rows.append(("4 host trickling 1 byte / 5 s (PLD_HTTP_TIMEOUT=10)",
                 timed(verify.format(f"http://127.0.0.1:{honest.server_port}/c.zarr")),
                 timed(verify.format(f"http://127.0.0.1:{trickle.server_port}/c.zarr"), {"PLD_HTTP_TIMEOUT": "10"})))
    print("| case | honest s | honest MiB | hostile s | hostile MiB | hostile outcome |\n|---|---|---|---|---|---|")
    for name, (hs, hr, _), (xs, xr, line) in rows:
        print(f"| {name} | {hs:.1f} | {hr} | {xs:.1f} | {xr} | {line} |")


if __name__ == "__main__":
    main()
