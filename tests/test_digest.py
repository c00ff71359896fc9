"""The cache digest (docs/cache-format.md, "Cache digest"): stable for one cache, different for any edit a
reader would see, even one re-signed the way anyone with the public source can; and --expect-digest refuses a
cache that differs before anything trains or is written."""
import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from pld_pipeline.cache import Cache, CacheError, inspect_cache, verify_cache
from pld_pipeline.cache import schema
from pld_pipeline.cache.format import parse_unit_name, unit_binding
from pld_pipeline.cache.integrity import DamagedUnit, block_sha256
from pld_pipeline.cache.store import open_root, read_marker, write_marker

runner = CliRunner()
WRONG = "sha256:" + "0" * 64
UNIT = "s000001.teacher.r14.0-4"


def resign(url: str, name: str) -> None:
    """Recompute a marker's checksums and binding from what is stored now: what an attacker with the public
    source does after editing a cache, so that every integrity check passes again."""
    root, meta = open_root(url, mode="r+"), Cache(url).meta
    record = read_marker(root, name)
    region = schema.unit_region(parse_unit_name(name), meta.rows_per_shard)
    record["checksums"] = {path: block_sha256(np.asarray(root[path][region])) for path in record["checksums"]}
    record["binding"] = unit_binding(name, meta)
    write_marker(root, name, record)


def edit_json(url: str, key: str, edit) -> None:
    path = os.path.join(url, *key.split("/"))
    doc = json.load(open(path))
    edit(doc)
    json.dump(doc, open(path, "w"))


def edit_logz(url: str) -> None:
    """A stored value changed (temperature-2 log-normaliser of shard 1, view 0), then the marker re-signed."""
    arr = open_root(url, mode="r+")["teachers/r14/logz"]
    s = Cache(url).meta.rows_per_shard
    arr[s:2 * s, 0, 1] = arr[s:2 * s, 0, 1] + np.float32(0.25)
    resign(url, UNIT)


EDITS = {
    # an unbound root field: no marker notices, the digest does
    "root attribute": lambda u: edit_json(u, "zarr.json", lambda d: d["attributes"]["pld_cache"]["shards"][0].update(
        url="pipe:echo pwned")),
    # a marker field outside checksums and binding (inspect's teacher accuracy reads it)
    "marker": lambda u: edit_json(u, f"units/{UNIT}/zarr.json", lambda d: d["attributes"].update(correct=0)),
    "stored value, re-signed": edit_logz,
    "array metadata": lambda u: edit_json(u, "teachers/r14/topk_idx/zarr.json",
                                          lambda d: d["attributes"].update(note="edited")),
    "key index": lambda u: edit_json(u, "key_index/zarr.json", lambda d: d["attributes"]["pld_key_index"].update(
        chunk_rows=65535)),
}


def test_the_digest_is_one_string_stable_across_reopening_and_copying(cache, tmp_path):
    digest = Cache(cache).digest()
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert Cache(cache).digest() == digest
    shutil.copytree(cache, tmp_path / "copy.zarr")  # a published copy (another bucket, a download)
    assert Cache(str(tmp_path / "copy.zarr")).digest() == digest
    assert verify_cache(cache).digest == digest and inspect_cache(cache)["digest"] == digest
    assert inspect_cache(cache)["complete"] is True


@pytest.mark.parametrize("what", list(EDITS))
def test_any_edit_a_reader_sees_changes_the_digest_even_re_signed(cache, tmp_path, what):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    before = Cache(url).digest()
    EDITS[what](url)
    assert Cache(url).digest() != before
    if what in ("root attribute", "stored value, re-signed"):
        assert verify_cache(url).ok  # integrity alone cannot tell: the edit is re-signed or not bound
    if what == "marker":  # not checksummed, but verify recounts it from the data
        assert any("its marker records (0, " in p for p in verify_cache(url).problems)
    with pytest.raises(CacheError, match="not the expected " + before):
        Cache(url, expect_digest=before)


def test_cache_teacher_prints_and_returns_the_digest_and_a_rerun_with_nothing_to_do_keeps_it(
        cache, tiny_data, teacher_run, tmp_path):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    digest = Cache(url).digest()
    result = runner.invoke(app, ["cache-teacher", "--data", tiny_data["train"].pattern, "--out", url, "--teacher",
                                 "cifar_resnet14", "--teacher-checkpoint", teacher_run, "--teacher-name", "r14",
                                 "--views", "4", "--size", "16", "--top-k", "5", "--temperatures", "1,2", "--pad", "2",
                                 "--batch-size", "16", "--workers", "0",  # the CLI's default --ratio is the library's
                                 "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"digest: {digest}" in result.output and "not complete" not in result.output
    assert Cache(url).digest() == digest


def test_a_unit_added_or_removed_changes_the_digest(cache, tmp_path):
    """An incomplete cache has a digest too, and it is not the complete one's."""
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    before = Cache(url).digest()
    writer = Cache(url, mode="r+")
    writer.withdraw(UNIT)
    assert Cache(url).digest() != before and inspect_cache(url)["complete"] is False


def test_a_pinned_cache_reads_only_against_the_markers_it_hashed(cache, tmp_path):
    """A host that serves the pinned cache at the check and an edited, re-signed one afterwards is refused:
    units are checked against the markers read when the digest matched."""
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    pinned = Cache(url, expect_digest=Cache(url).digest())
    edit_logz(url)
    assert Cache(url).read(1, "r14").logz is not None  # unpinned: the re-signed edit reads as intact
    with pytest.raises(DamagedUnit, match=UNIT):
        pinned.read(1, "r14")


def test_a_pinned_cache_never_reads_a_unit_that_appeared_after_its_digest_was_checked(cache, tmp_path):
    """A host that adds a unit (a valid, honestly signed marker) once the digest has matched: a pinned reader
    refuses it by name instead of trusting the live marker."""
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    Cache(url, mode="r+").withdraw(UNIT)
    pinned = Cache(url, expect_digest=Cache(url).digest())
    shutil.copy(os.path.join(cache, "units", UNIT, "zarr.json"), os.path.join(url, "units", UNIT, "zarr.json"))
    assert Cache(url).read_unit(UNIT)  # unpinned: the restored unit is intact
    with pytest.raises(CacheError, match=f"Unit marker {UNIT} is not in the cache whose digest was checked"):
        pinned.read_unit(UNIT)


def test_student_data_refuses_another_cache_before_reading_it(cache, tiny_data):
    from pld_pipeline.student_data import StudentData
    with pytest.raises(CacheError, match="not the expected " + WRONG):
        StudentData(tiny_data["train"].pattern, cache=cache, expect_digest=WRONG, workers=0, batch_size=4)
    data = StudentData(tiny_data["train"].pattern, cache=cache, expect_digest=Cache(cache).digest(), workers=0,
                       batch_size=4)
    assert next(iter(data.epoch(0))).targets is not None


def test_data_loader_workers_read_against_the_markers_their_parent_hashed(cache, tiny_data, tmp_path):
    """Workers take the parent's pinned markers instead of hashing the cache again: an edit re-signed after the
    check is refused as damage of that unit, not trained on."""
    from pld_pipeline.student_data import StudentData
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    data = StudentData(tiny_data["train"].pattern, cache=url, expect_digest=Cache(url).digest(), workers=1,
                       batch_size=4)
    assert data.dataset._pins["markers"][UNIT]["checksums"]
    edit_logz(url)
    with pytest.raises(CacheError, match=UNIT):
        for _ in data.epoch(0):
            pass


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_expect_digest_refuses_in_one_line_before_anything_is_trained_or_written(cache, tiny_data, tmp_path):
    digest = Cache(cache).digest()
    run = tmp_path / "run"
    line = _one_line(runner.invoke(app, ["distill", "--data", tiny_data["train"].pattern, "--cache", cache,
                                         "--student", "cifar_resnet8", "--out", str(run), "--epochs", "1",
                                         "--batch-size", "8", "--workers", "0", "--device", "cpu",
                                         "--expect-digest", WRONG]))
    assert digest in line and WRONG in line and not run.exists()
    sweep = tmp_path / "sweep"
    for extra in ([], ["--print-commands"]):
        line = _one_line(runner.invoke(app, ["sweep", "--data", tiny_data["train"].pattern, "--cache", cache,
                                             "--student", "cifar_resnet8", "--grid", "lr=1e-3,2e-3", "--out",
                                             str(sweep), "--expect-digest", WRONG, *extra]))
        assert WRONG in line and not sweep.exists()
    for command in ("verify", "inspect"):
        assert WRONG in _one_line(runner.invoke(app, [command, cache, "--expect-digest", WRONG]))
        ok = runner.invoke(app, [command, cache, "--expect-digest", digest, "--json"])
        assert ok.exit_code == 0 and json.loads(ok.output)["digest"] == digest


def test_sweep_commands_carry_the_pinned_digest(cache, tiny_data, tmp_path):
    digest = Cache(cache).digest()
    result = runner.invoke(app, ["sweep", "--data", tiny_data["train"].pattern, "--cache", cache, "--student",
                                 "cifar_resnet8", "--grid", "lr=1e-3,2e-3", "--out", str(tmp_path / "s"),
                                 "--expect-digest", digest, "--print-commands"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 0 and len(lines) == 2 and all(f"--expect-digest {digest}" in x for x in lines)


def test_expect_digest_accepts_the_digest_in_upper_case(cache):
    """Hex case is not identity: a digest copied from a page that upper-cases it names the same cache."""
    digest = Cache(cache).digest()
    shouted = digest.upper()  # SHA256:ABC...
    assert Cache(cache, expect_digest=shouted).expected_digest == digest
    ok = runner.invoke(app, ["verify", cache, "--expect-digest", shouted, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["digest"] == digest


class _Crash(Exception):
    pass


def test_a_run_started_without_expect_digest_resumes_with_it(cache, tiny_data, tmp_path):
    """Pinning the cache on resume adds a check, it changes nothing the run computes: not "different settings"."""
    from pld_pipeline.distill import DistillConfig, distill
    base = dict(data=tiny_data["train"].pattern, cache=cache, out=str(tmp_path / "run"), student="cifar_resnet8",
                epochs=2, batch_size=8, workers=0, device="cpu")

    def crash(event):
        if event["event"] == "epoch_end":
            raise _Crash
    with pytest.raises(_Crash):
        distill(DistillConfig(**base), crash)
    summary = distill(DistillConfig(**base, resume=True, expect_digest=Cache(cache).digest()))
    assert summary["resumed_from_epoch"] == 1
    assert len(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()) == 2
    with pytest.raises(CacheError, match="not the expected"):  # and a pin given on resume is enforced
        distill(DistillConfig(**base, resume=True, expect_digest=WRONG))
