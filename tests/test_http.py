"""A cache served by a plain HTTP host that does not list folders (static hosts, CDNs, model/data file hosts)."""
import functools
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

from pld_pipeline.cache import CacheError, CacheReader, inspect_cache, verify_cache
from pld_pipeline.cache.store import open_root, read_index, write_index
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline_cli.app import app


class NoListing(SimpleHTTPRequestHandler):
    """Serves files by path; any folder request is a 404, as on object-only hosts."""

    def send_head(self):
        if os.path.isdir(self.translate_path(self.path)):
            self.send_error(404, "No listing here")
            return None
        return super().send_head()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(cache, tmp_path_factory):
    """A copy of the session cache under a local HTTP server that does not list."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(cache, root / "c.zarr")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(NoListing, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_port}/c.zarr", "local": str(root / "c.zarr")}
    server.shutdown()


def test_the_host_really_does_not_list(served):
    for folder in ("", "/units/", "/units", "/teachers/r14/topk_idx/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(served["url"] + folder)
        assert e.value.code == 404
    assert json.load(urllib.request.urlopen(served["url"] + "/zarr.json"))["node_type"] == "group"


def test_inspect_verify_and_distill_over_http_equal_the_local_cache(served, tiny_data, tmp_path):
    local = CacheReader(served["local"])
    remote = CacheReader(served["url"])
    assert remote.markers == local.markers and len(remote.markers) > 0  # found through the unit index
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


def test_a_reader_that_cannot_list_sees_exactly_the_index(served):
    """Writers keep each shard's index a subset of its markers; a shard whose index lost a unit reads as
    incomplete over HTTP (never as wrong data), and verify on the listing side names the stale index."""
    root = open_root(served["local"], mode="r+")
    names = read_index(root, 0)
    try:
        write_index(root, 0, [n for n in names if ".teacher." not in n])
        with pytest.raises(CacheError, match="not complete"):
            CacheReader(served["url"]).read_block(0, "r14")
        assert CacheReader(served["local"]).read_block(0, "r14").topk_idx is not None  # listing still finds it
        assert any("unit index of 1 shard(s)" in w for w in verify_cache(served["local"]).warnings)
    finally:
        write_index(root, 0, names)


def test_a_withdrawn_unit_leaves_the_index_before_its_marker(cache, tmp_path):
    """A repair withdraws a damaged unit before rewriting it: a reader that cannot list must see it missing (and
    the shard incomplete), never be pointed at a unit without a marker."""
    from pld_pipeline.cache import CacheWriter
    from pld_pipeline.cache.store import read_marker
    copy = tmp_path / "c.zarr"
    shutil.copytree(cache, copy)
    writer = CacheWriter(str(copy))
    name = next(n for n in read_index(writer.root, 1) if ".teacher." in n)
    writer.withdraw(name)
    assert name not in read_index(writer.root, 1)
    with pytest.raises(CacheError, match="missing"):
        read_marker(writer.root, name)
    assert verify_cache(str(copy)).problems == ["incomplete: s000001.teacher.r14"]
