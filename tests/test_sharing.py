"""Caches shared through object storage and plain HTTP, against real servers on 127.0.0.1.

The S3 server is moto's standalone server in its own process (a real HTTP endpoint, not an in-process mock);
the HTTP server is Python's http.server. Both listen on loopback only and stop with the fixture.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from pld_pipeline.cache import Cache, inspect_cache, verify_cache
from pld_pipeline.distill import DistillConfig, distill
import forked
from conftest import free_port
from pld_pipeline_cli.app import app

pytestmark = pytest.mark.slow


def _serve(cmd: list[str], port: int):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server {cmd} did not start")


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    port = free_port()
    proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("pld-bucket")
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_two_ranks_write_to_s3_the_cache_one_process_writes_then_verify_inspect_and_distill(
        tiny_data, teacher_ckpt, s3_endpoint, tmp_path):
    """Ranks split the shards and write them to an object store; the cache equals one process's local one. (The
    ranks are forked with torchrun's environment: tests/test_class_map_subset.py starts a real torchrun.)"""
    from test_cache_teacher import _cli_here, assert_same_cache
    url = "s3://pld-bucket/team-a/cache.zarr"
    args = ["--data", tiny_data["train"].pattern, "--teacher", "cifar_resnet8", "--teacher-checkpoint", teacher_ckpt,
            "--teacher-name", "r8", "--views", "2", "--size", "16", "--top-k", "4", "--batch-size", "10",
            "--workers", "0", "--device", "cpu", "--quiet"]
    procs = forked.ranks(["cache-teacher", *args, "--out", url], 2, free_port(), env={**os.environ, **s3_endpoint},
                         stdout=forked.PIPE, stderr=forked.PIPE)
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    assert verify_cache(url).ok
    one = str(tmp_path / "one.zarr")
    _cli_here("--out", one, *args)
    assert_same_cache(one, url)
    info = inspect_cache(url)
    assert info["shards_done"] == 3 and info["bytes_on_disk"] is None  # remote: size not walked
    local_copy = tmp_path / "blocks"
    summary = distill(DistillConfig(data=tiny_data["train"].pattern, out=str(tmp_path / "run"), student="cifar_resnet8",
                                    cache=url, cache_dir=str(local_copy), epochs=1, batch_size=8, workers=0, device="cpu"))
    assert summary["epochs"] == 1
    fetched = sum(len(files) for _, _, files in os.walk(local_copy))
    assert fetched > 10  # chunks and metadata now come from the local block cache
    reader = Cache(url, cache_dir=str(local_copy))
    assert reader.read(0, "r8").keys == Cache(url).read(0, "r8").keys
    with pytest.raises(Exception):
        reader.array("samples/label")[0:1] = 1  # readers are read-only


def test_objects_on_s3_larger_than_their_layout_are_refused_without_being_fetched(cache, s3_endpoint, tmp_path):
    """A bucket can hold anything under a chunk's name: a 32 MiB object where the layout allows a few KiB is
    refused after at most cap + 1 bytes are asked for (not fetched whole), directly and through --cache-dir."""
    import s3fs

    from pld_pipeline.cache import CacheError, schema
    from conftest import stored_object
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = "s3://pld-bucket/hostile/c.zarr"
    fs.put(cache, url[len("s3://"):], recursive=True)
    key = os.path.relpath(stored_object(cache, schema.STATUS.path(), 0), cache)
    fs.pipe(f"{url[len('s3://'):]}/{key}", b"\0" * (32 << 20))
    asked = []
    real = s3fs.S3FileSystem._cat_file

    async def spy(self, path, *args, start=None, end=None, **kw):
        asked.append((path, start, end))
        return await real(self, path, *args, start=start, end=end, **kw)
    s3fs.S3FileSystem._cat_file = spy
    try:
        for cache_dir in (None, str(tmp_path / "blocks")):
            with pytest.raises(CacheError, match=f"{key} holds more than the [0-9,]+ bytes its cache layout allows"):
                Cache(url, cache_dir=cache_dir).read(0)
        direct = [(s, e) for p, s, e in asked if p.endswith(key)]
        assert direct and all(e is not None and e - (s or 0) < 1 << 20 for s, e in direct), direct
        downloaded = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tmp_path / "blocks") for f in files]
        assert downloaded and max(downloaded) < 1 << 20  # the 32 MiB object was sized, never downloaded
    finally:
        s3fs.S3FileSystem._cat_file = real


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_a_cache_served_over_plain_http_is_read_only_and_trainable(tiny_data, cache, teacher_run, tmp_path):
    """Over HTTP a cache is read, never written: a reader's raw write and a writer's open are refused in one line,
    and inspecting it and training from it leave every served byte as it was."""
    from pld_pipeline.cache import CacheError
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    port = free_port()
    root = os.path.dirname(cache)
    served = _files(cache)
    proc = _serve([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", root], port)
    try:
        url = f"http://127.0.0.1:{port}/{os.path.basename(cache)}"
        result = CliRunner().invoke(app, ["inspect", url, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["shards_done"] == 3
        summary = distill(DistillConfig(data=tiny_data["train"].pattern, out=str(tmp_path / "run"),
                                        student="cifar_resnet8", cache=url, cache_dir=str(tmp_path / "blocks"),
                                        epochs=1, batch_size=8, workers=0, device="cpu"))
        assert summary["epochs"] == 1 and json.load(open(tmp_path / "run" / "config.json"))["cache"]["url"] == url
        with pytest.raises(ValueError, match="read-only"):
            Cache(url).array("samples/label")[0:1] = 1  # zarr's own store refuses the write
        with pytest.raises(CacheError, match="served over plain HTTP is read-only; write it to a local path"):
            Cache(url, mode="r+")
        with pytest.raises(CacheError, match="served over plain HTTP is read-only"):  # one more view, written there
            cache_teacher(CacheTeacherConfig(
                data=tiny_data["train"].pattern, out=url, teachers=[TeacherSpec("cifar_resnet14", teacher_run, "r14")],
                views=5, size=16, k=5, temperatures=(1.0, 2.0), batch_size=16, workers=0, device="cpu",
                recipe_overrides={"pad": 2}))
        assert _files(cache) == served
    finally:
        proc.terminate()
        proc.wait(10)


def _cache_args(tiny_data, teacher_ckpt):
    return ["cache-teacher", "--data", tiny_data["train"].pattern, "--teacher",
            "cifar_resnet8", "--teacher-checkpoint", teacher_ckpt, "--teacher-name", "r8", "--views", "2", "--size",
            "16", "--top-k", "4", "--num-classes", "10", "--workers", "0", "--device", "cpu", "--json"]


@pytest.fixture(scope="module")
def whole(tiny_data, teacher_ckpt, tmp_path_factory):
    """The cache one uninterrupted worker makes: what cooperating workers must produce together."""
    out = str(tmp_path_factory.mktemp("whole") / "whole.zarr")
    run = CliRunner().invoke(app, _cache_args(tiny_data, teacher_ckpt) + ["--out", out], catch_exceptions=False)
    assert run.exit_code == 0, run.output[-2000:]  # the same command line, in this process: no interpreter to start
    return out


# Each cooperation mode on one backend (CI time): --part on local disk, claims on the S3 server; both run the
# same code on either (only the store differs), and the other pairings pass too (run with where=... to check).
@pytest.mark.slow
@pytest.mark.parametrize("where", ["local"])
def test_independent_parts_split_the_shards_and_equal_one_run(tiny_data, teacher_ckpt, s3_endpoint, whole, tmp_path,
                                                              where):
    """`--part I/N` workers started side by side (a SLURM array, an indexed job, several machines): part 0 creates
    the cache, the other waits for it; each caches only its shards, and together they equal one run."""
    from test_cache_teacher import assert_same_cache
    url = str(tmp_path / "parts.zarr") if where == "local" else f"s3://pld-bucket/parts-{os.getpid()}.zarr"
    args = _cache_args(tiny_data, teacher_ckpt) + ["--out", url]
    env = {**os.environ, **s3_endpoint}
    # part 1 in its own process, started first (it waits for the cache unless part 0 has created it by then); part 0,
    # which creates the cache, in this one (the same command line, no interpreter to start)
    waiting = forked.Forked(args + ["--part", "1/2"], env=env, stdout=forked.PIPE, stderr=forked.PIPE)
    here = CliRunner().invoke(app, args + ["--part", "0/2"], catch_exceptions=False)
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0 and here.exit_code == 0, (err[-2000:], here.output[-2000:])
    written = [json.loads(out)["shards_written"], json.loads(here.stdout)["shards_written"]]
    assert written == [1, 2]  # part 1: shard 1; part 0: shards 0 and 2
    assert verify_cache(url).ok
    assert_same_cache(whole, url)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3"])
def test_overlapping_workers_split_the_shards_by_claims_and_take_over_a_dead_ones(tiny_data, teacher_ckpt,
                                                                                   s3_endpoint, whole, tmp_path, where):
    """Workers without a split on one cache (several machines, a job started twice) skip shards a live worker
    has claimed; a killed worker's claim expires and another worker finishes its shard."""
    from test_cache_teacher import assert_same_cache
    url = str(tmp_path / "shared.zarr") if where == "local" else f"s3://pld-bucket/shared-{os.getpid()}.zarr"
    args = _cache_args(tiny_data, teacher_ckpt) + ["--claim-ttl", "4", "--out", url]
    env = {**os.environ, **s3_endpoint}
    # A worker killed inside its first shard leaves that shard claimed (for up to --claim-ttl) and unfinished.
    dead = forked.run(*args, env={**env, "PLD_KILL_AT": "unit.array:2"}, timeout=300)
    assert dead.returncode == -9, dead.stderr[-2000:]
    procs = [forked.Forked(args, env=env, stdout=forked.PIPE, stderr=forked.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    written = [json.loads(o[0])["shards_written"] for o in outs]
    # Without claims both workers would write all 3 shards (6); claims are advisory, so a rival slower than the
    # settle time may still duplicate one, which costs time, never correctness (checked next).
    assert 3 <= sum(written) < 6, written
    assert verify_cache(url).ok
    assert_same_cache(whole, url)
