"""A cache served by a plain HTTP host that does not list folders (static hosts, CDNs, model/data file hosts)."""
import functools
import http.server
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pld_pipeline.cache import CacheError, Cache, inspect_cache, verify_cache
from pld_pipeline.cache.store import open_root, read_index, write_index
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline_cli.app import app


class NoListing(SimpleHTTPRequestHandler):
    """Serves files by path and byte range (RFC 9110 single ranges, as nginx, S3 and CDNs do); any folder request
    is a 404, as on object-only hosts."""
    ranges = True

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            self.send_error(404, "No listing here")
            return None
        spec = self.headers.get("Range")
        if not (self.ranges and spec and spec.startswith("bytes=") and os.path.isfile(path)):
            return super().send_head()
        size = os.path.getsize(path)
        first, _, last = spec[len("bytes="):].partition("-")
        start, end = (size - int(last), size - 1) if not first else (int(first), min(int(last or size - 1), size - 1))
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(f.read(end - start + 1))

    def log_message(self, *args):
        pass


class NoRanges(NoListing):
    """A host that ignores Range headers and always sends the whole file (some minimal static servers)."""
    ranges = False


class Host(ThreadingHTTPServer):
    """A listen backlog like a real web server's (nginx: 511; http.server's 5 drops the connections of a reader
    with many requests in flight, and the client's kernel retries each after a second)."""
    request_queue_size = 512


def serve(directory, handler=NoListing):
    server = Host(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def served(cache, tmp_path_factory):
    """A copy of the session cache under a local HTTP server that does not list."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(cache, root / "c.zarr")
    server = serve(root)
    yield {"url": f"http://127.0.0.1:{server.server_port}/c.zarr", "local": str(root / "c.zarr")}
    server.shutdown()


def test_the_host_really_does_not_list(served):
    for folder in ("", "/units/", "/units", "/teachers/r14/topk_idx/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(served["url"] + folder)
        assert e.value.code == 404
    assert json.load(urllib.request.urlopen(served["url"] + "/zarr.json"))["node_type"] == "group"


def test_inspect_verify_and_distill_over_http_equal_the_local_cache(served, tiny_data, tmp_path):
    local = Cache(served["local"])
    remote = Cache(served["url"])
    assert remote.done == local.done and len(remote.done) > 0  # found through the unit index
    assert verify_cache(served["url"]).ok
    assert not any("unit index" in w for w in verify_cache(served["local"]).warnings)
    assert inspect_cache(served["url"])["teachers"] == inspect_cache(served["local"])["teachers"]
    runner = CliRunner()
    for command in ("inspect", "verify"):
        result = runner.invoke(app, [command, served["url"]])
        assert result.exit_code == 0, result.output
    base = dict(data=tiny_data["train"].pattern, student="cifar_resnet8", loss="pld", epochs=1, batch_size=8,
                workers=0, device="cpu")
    distill(DistillConfig(out=str(tmp_path / "local"), cache=served["local"], **base))
    distill(DistillConfig(out=str(tmp_path / "http"), cache=served["url"], **base))
    distill(DistillConfig(out=str(tmp_path / "http-cached"), cache=served["url"], cache_dir=str(tmp_path / "blocks"),
                          **base))
    assert any(files for _, _, files in os.walk(tmp_path / "blocks"))  # the block cache was used
    want = load_file(str(tmp_path / "local" / "last.safetensors"))
    for run in ("http", "http-cached"):
        got = load_file(str(tmp_path / run / "last.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want), run


def test_the_digest_is_the_same_over_http_with_and_without_a_block_cache(served, tmp_path):
    """Over HTTP the markers are found through the unit index, not a listing: the same documents, the same digest."""
    digest = Cache(served["local"]).digest()
    assert Cache(served["url"]).digest() == digest
    assert Cache(served["url"], cache_dir=str(tmp_path / "blocks"), expect_digest=digest).read(0, "r14").keys


def test_a_reader_that_cannot_list_sees_exactly_the_index(served):
    """Writers keep each shard's index a subset of its markers; a shard whose index lost a unit reads as
    incomplete over HTTP (never as wrong data), and verify on the listing side names the stale index."""
    root = open_root(served["local"], mode="r+")
    names = read_index(root, 0)
    try:
        write_index(root, 0, [n for n in names if ".teacher." not in n])
        with pytest.raises(CacheError, match="not complete"):
            Cache(served["url"]).read(0, "r14")
        assert Cache(served["local"]).read(0, "r14").topk_idx is not None  # listing still finds it
        assert any("unit index of 1 shard(s)" in w for w in verify_cache(served["local"]).warnings)
    finally:
        write_index(root, 0, names)


def test_a_withdrawn_unit_leaves_the_index_before_its_marker(cache, tmp_path):
    """A repair withdraws a damaged unit before rewriting it: a reader that cannot list must see it missing (and
    the shard incomplete), never be pointed at a unit without a marker."""
    from pld_pipeline.cache import Cache
    from pld_pipeline.cache.store import read_marker
    copy = tmp_path / "c.zarr"
    shutil.copytree(cache, copy)
    writer = Cache(str(copy), mode="r+")
    name = next(n for n in read_index(writer.root, 1) if ".teacher." in n)
    writer.withdraw(name)
    assert name not in read_index(writer.root, 1)
    with pytest.raises(CacheError, match="missing"):
        read_marker(writer.root, name)
    assert verify_cache(str(copy)).problems == ["incomplete: s000001.teacher.r14"]


def test_a_host_that_ignores_byte_ranges_is_read_through_whole_objects(served, tmp_path):
    """Several views share one stored object, read by byte range. Over a host that answers a range with the
    whole file (``python -m http.server``), readers fetch each object whole and cut the ranges from it: the same
    blocks, with and without --cache-dir."""
    server = serve(os.path.dirname(served["local"]), NoRanges)
    url = f"http://127.0.0.1:{server.server_port}/c.zarr"
    try:
        want = Cache(served["local"]).read(1, "r14")
        for cache in (Cache(url), Cache(url, cache_dir=str(tmp_path / "blocks"))):
            got = cache.read(1, "r14")
            assert got.keys == want.keys and (got.topk_logp == want.topk_logp).all()
            assert (got.params == want.params).all()
        assert verify_cache(url).ok
    finally:
        server.shutdown()


def test_a_reader_written_from_the_spec_reads_the_served_cache(served):
    """tests/spec_reader.py opens objects by path only: over a host that does not list it reads what pld_pipeline
    reads, through the unit index, the markers and the key index."""
    from test_spec_reader import assert_reads_alike
    assert_reads_alike(served["url"], ["r14"])


# -- hostile hosts: trickling bodies and redirects elsewhere -------------------------------------------------------
class Trickle(http.server.BaseHTTPRequestHandler):
    """A host that promises a megabyte and sends one byte at a time until the client goes away (or the test ends)."""
    stop = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            while not self.stop.wait(0.2):
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:
            pass  # the client hung up: what the test wants

    def log_message(self, *args):
        pass


def test_a_host_that_trickles_bytes_is_cut_off_by_the_timeout(monkeypatch):
    """A host sending one byte every 5 s stalled `pld verify http://...` forever."""
    from pld_pipeline.errors import RemoteError
    monkeypatch.setenv("PLD_HTTP_TIMEOUT", "1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RemoteError, match="timed out") as e:
            Cache(f"http://127.0.0.1:{server.server_port}/c.zarr")
        assert "\n" not in str(e.value)
    finally:
        Trickle.stop.set()
        server.shutdown()


class Redirect(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_redirect_to_another_host_is_refused_in_one_line(served):
    from pld_pipeline.network import CrossOriginRedirect
    Redirect.target = served["url"].rsplit("/c.zarr", 1)[0]  # same address, another port: another origin
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(CrossOriginRedirect, match="redirected to http://127.0.0.1") as e:
            Cache(f"http://127.0.0.1:{server.server_port}/c.zarr")
        assert "\n" not in str(e.value)
    finally:
        server.shutdown()


def test_a_bad_timeout_setting_is_one_line(monkeypatch):
    from pld_pipeline.network import timeout_s
    monkeypatch.setenv("PLD_HTTP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PLD_HTTP_TIMEOUT='soon' must be a positive number of seconds"):
        timeout_s()


def test_a_cache_dir_copy_that_no_longer_matches_the_remote_is_one_line(served, tmp_path, monkeypatch):
    """fsspec's local copy of a remote object that changed size raised "mmap length is greater than file size"."""
    from fsspec.implementations.cached import CachingFileSystem

    def stale(self, path, *args, **kwargs):
        raise ValueError("mmap length is greater than file size")
    monkeypatch.setattr(CachingFileSystem, "_open", stale)
    with pytest.raises(CacheError, match="changed on the remote after it was copied into --cache-dir") as e:
        Cache(served["url"], cache_dir=str(tmp_path / "copy"))
    assert "mmap" not in str(e.value) and "\n" not in str(e.value)
