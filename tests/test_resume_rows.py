"""Resuming inside a shard: an interrupted cache-teacher keeps the rows it saved (cache/progress.py), a rerun
computes only the rest and ends with the uninterrupted cache, and no progress record, however made, lets a row be
skipped that the arrays do not hold."""
import json
import os
import shutil
import time

import numpy as np
import pytest

import pld_pipeline.cache_teacher as ct
from pld_pipeline.cache import Cache, verify_cache
from pld_pipeline.cache import format as fmt
from pld_pipeline.cache import progress
from pld_pipeline.cache.integrity import block_sha256
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.data import iter_shard
from pld_pipeline.shards import encode_png, write_split
from pld_pipeline.views import MixRecipe

from conftest import NUM_CLASSES, big_shard, make_images

VIEWS = 2
MIX = {"pad": 2, "mix": MixRecipe(mode="both", prob=0.75, window=4).to_dict()}


def config(data, out, teacher_ckpt, **kw):
    """One sample per teacher batch (batch = its views), so a resumed run's batches are the uninterrupted run's
    and its floats equal bit for bit; a row block is saved every 4 rows, never by time."""
    return CacheTeacherConfig(data=data, out=str(out), teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                              **{"views": VIEWS, "size": 16, "k": 4, "batch_size": VIEWS, "workers": 0,
                                 "num_classes": NUM_CLASSES, "device": "cpu", "save_rows": 4, "save_seconds": 1e9,
                                 **kw})


@pytest.fixture
def frozen_clock(monkeypatch):
    """Markers record when they were written; equal caches need equal times to have equal digests."""
    monkeypatch.setattr(time, "strftime", lambda *a: "2026-12-07T00:00:00Z")


@pytest.fixture
def forwards(monkeypatch):
    """Rows (sample views) that went through a teacher, counted where its logits are encoded."""
    count = [0]
    real = ct.encode_teacher_logits

    def counting(logits, *a, **kw):
        count[0] += logits.shape[0]
        return real(logits, *a, **kw)
    monkeypatch.setattr(ct, "encode_teacher_logits", counting)
    return count


class Crash(Exception):
    pass


def crash_after(batches, kind=Crash):
    """A progress callback that raises ``kind`` at the n-th teacher batch: a crash (or Ctrl-C) mid-shard."""
    seen = [0]

    def emit(event):
        if event["event"] == "batch":
            seen[0] += 1
            if seen[0] == batches:
                raise kind()
    return emit


def records(url):
    folder = os.path.join(url, progress.GROUP)
    return {name: json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))} \
        if os.path.isdir(folder) else {}


def rows_left(url):
    """Sample views a rerun must compute: every row of the incomplete shards past its saved ones."""
    cache, saved = Cache(url), {r["shard"]: r["rows"] for r in records(url).values()}
    return sum((s.nsamples - saved.get(i, 0)) * VIEWS for i, s in enumerate(cache.meta.shards) if not cache.complete(i))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """One shard of 8 samples: the cheapest data a shard can be interrupted in."""
    images, labels = make_images(8, seed=7)
    return write_split(((f"s{i}", encode_png(images[i]), "png", int(labels[i])) for i in range(8)),
                       str(tmp_path_factory.mktemp("one_shard")), "one", 8).pattern


@pytest.mark.slow
def test_a_crash_mid_shard_resumes_from_its_saved_rows_to_the_uninterrupted_cache(tiny_data, teacher_ckpt, tmp_path,
                                                                                  frozen_clock, forwards):
    data = tiny_data["train"].pattern
    whole = cache_teacher(config(data, tmp_path / "whole.zarr", teacher_ckpt, save_rows=10**6))
    out = tmp_path / "c.zarr"
    with pytest.raises(Crash):  # 7 rows into the first of 3 shards: rows 0-3 saved
        cache_teacher(config(data, out, teacher_ckpt), crash_after(7))
    [record] = records(str(out)).values()
    report = verify_cache(str(out))  # readers see an incomplete cache, nothing more
    assert record["rows"] == 4 and not report.ok and report.damaged == []
    assert any("saved rows of an interrupted `pld cache-teacher` (progress/s0000" in w for w in report.warnings)
    left = rows_left(str(out))
    forwards[0] = 0
    again = cache_teacher(config(data, out, teacher_ckpt))
    assert forwards[0] == again["items"] == left == (40 - 4) * VIEWS  # the 4 saved rows were not computed again
    assert again["digest"] == whole["digest"] and verify_cache(str(out)).ok
    assert records(str(out)) == {}  # gone with the shard's markers


def test_mixed_views_resume_with_the_saved_rows_as_partners(one_shard, teacher_ckpt, tmp_path, frozen_clock, forwards):
    """A computed row's partner may be a saved row: the rerun decodes the saved rows within the mixing window."""
    whole = cache_teacher(config(one_shard, tmp_path / "whole.zarr", teacher_ckpt, recipe_overrides=MIX))
    out = tmp_path / "c.zarr"
    with pytest.raises(Crash):
        cache_teacher(config(one_shard, out, teacher_ckpt, recipe_overrides=MIX), crash_after(5))
    forwards[0] = 0
    again = cache_teacher(config(one_shard, out, teacher_ckpt, recipe_overrides=MIX))
    assert forwards[0] == (8 - 4) * VIEWS and again["digest"] == whole["digest"]
    params = Cache(str(out)).read(0).params
    mixed = params[4:, :, 5] != 0
    assert (params[4:, :, 6][mixed] < 4).any()  # computed rows mixed with saved rows as partners


def test_ctrl_c_keeps_every_finished_row_and_the_rerun_computes_only_the_rest(one_shard, teacher_ckpt, tmp_path,
                                                                               frozen_clock, forwards):
    data, out = one_shard, tmp_path / "c.zarr"
    whole = cache_teacher(config(data, tmp_path / "whole.zarr", teacher_ckpt))
    events = []
    ctrl_c = crash_after(7, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(config(data, out, teacher_ckpt), lambda e: (events.append(e), ctrl_c(e)))
    [record] = records(str(out)).values()
    assert record["rows"] == 7  # not only the 4 of the last regular save
    assert events[-1] == {"event": "rows_saved", "shard": Cache(str(out)).meta.shards[0].name, "rows": 7, "of": 8}
    forwards[0] = 0
    again = cache_teacher(config(data, out, teacher_ckpt))
    assert forwards[0] == (8 - 7) * VIEWS and again["digest"] == whole["digest"]


# -- progress records are untrusted: none of these may let a row be skipped ----------------------------------
def _resign(url, doc):
    """What a careful forger does: checksums recomputed over whatever the arrays hold for the rows it claims."""
    root, meta = Cache(url).root, Cache(url).meta
    for name, sums in doc["checksums"].items():
        unit = fmt.parse_unit_name(name)
        for path in sums:
            sums[path] = block_sha256(np.ascontiguousarray(
                root[path][progress._region(unit, meta.rows_per_shard, 0, doc["rows"])]))
    return doc


def _edit_saved_rows(url, doc, edit):
    """Change row 0 of the shard's teacher logz in the arrays (as a bad disk or an editor would). Raised by 0.5,
    every value still passes the readers' checks: only the record's checksums can tell."""
    cache = Cache(url, mode="r+")
    arr = cache.array("teachers/r8/logz")
    row = doc["shard"] * cache.meta.rows_per_shard
    arr[row:row + 1, 0:VIEWS] = edit(arr[row:row + 1, 0:VIEWS])
    return doc


def _copy_arrays(whole, url, doc):
    """Every array of the uninterrupted cache into this one (no marker): valid data for every row of the shard."""
    for group in ("samples", "views", "teachers"):
        shutil.copytree(os.path.join(whole, group), os.path.join(url, group), dirs_exist_ok=True)
    return doc


HOSTILE = {
    "more rows than were written": lambda url, doc, whole: {**doc, "rows": 6},
    "more rows, re-signed over rows never written": lambda url, doc, whole: _resign(url, {**doc, "rows": 6}),
    "saved rows edited after the record": lambda url, doc, whole: _edit_saved_rows(url, doc, lambda x: x + 0.5),
    "saved rows edited to NaN and re-signed": lambda url, doc, whole: _resign(url, _edit_saved_rows(url, doc,
                                                                                             lambda x: x * np.nan)),
    "written for other units": lambda url, doc, whole: {**doc, "binding": "0" * 64},
    "checksums of another shard's units": lambda url, doc, whole: {**doc, "checksums": {
        k.replace("s000000", "s000001"): v for k, v in doc["checksums"].items()}},
    "rows negative": lambda url, doc, whole: {**doc, "rows": -4},
    "rows the whole shard": lambda url, doc, whole: {**doc, "rows": 8},
    "the whole shard, re-signed over a complete copy": lambda url, doc, whole: _resign(url, {
        **_copy_arrays(whole, url, doc), "rows": 8}),
    "not JSON": lambda url, doc, whole: b"\x80not json",
    "oversized": lambda url, doc, whole: json.dumps(doc).encode() + b" " * progress.MAX_RECORD_BYTES,
}


@pytest.fixture(scope="module")
def crashed(one_shard, teacher_ckpt, tmp_path_factory):
    """A cache whose run crashed 5 rows into its one shard (rows 0-3 saved), and the uninterrupted one."""
    folder = tmp_path_factory.mktemp("crashed")
    cache_teacher(config(one_shard, folder / "whole.zarr", teacher_ckpt))
    with pytest.raises(Crash):
        cache_teacher(config(one_shard, folder / "c.zarr", teacher_ckpt), crash_after(5))
    return str(folder / "c.zarr"), str(folder / "whole.zarr")


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_forged_stale_or_oversized_progress_record_never_lets_a_row_be_skipped(one_shard, teacher_ckpt, crashed,
                                                                                 tmp_path, forwards, case):
    from test_cache_teacher import assert_same_cache
    url = str(tmp_path / "c.zarr")
    shutil.copytree(crashed[0], url)
    [(name, doc)] = records(url).items()
    assert doc["rows"] == 4
    forged = HOSTILE[case](url, doc, crashed[1])
    with open(os.path.join(url, progress.GROUP, name), "wb") as f:
        f.write(forged if isinstance(forged, bytes) else json.dumps(forged).encode())
    events = []
    forwards[0] = 0
    cache_teacher(config(one_shard, url, teacher_ckpt), events.append)
    assert forwards[0] == 8 * VIEWS  # every row of the shard, the saved ones too
    assert [e["event"] for e in events if "progress" in e["event"] or e["event"] == "resuming_shard"] == [
        "progress_refused"]
    assert verify_cache(url).ok and records(url) == {}
    assert_same_cache(crashed[1], url)


def test_a_shard_changed_between_runs_starts_over(tmp_path, teacher_ckpt, forwards):
    """Shards over 2 MiB: a same-size edit in the middle keeps the quick hash, so the cache takes the shard as the
    same one; the saved rows' sample digests no longer match it and the shard is computed again, whole."""
    path = big_shard(tmp_path / "big-000000.tar")
    out = tmp_path / "c.zarr"
    with pytest.raises(Crash):
        cache_teacher(config(str(path), out, teacher_ckpt, save_rows=2), crash_after(5))
    assert [r["rows"] for r in records(str(out)).values()] == [4]
    raw = bytearray(path.read_bytes())
    middle = raw.index(b"k2.bin") + 512 + 300_000  # sample k2 (a saved row), > 1 MiB from both ends
    assert 2**20 < middle < len(raw) - 2**20
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))
    events = []
    forwards[0] = 0
    cache_teacher(config(str(path), out, teacher_ckpt, save_rows=2), events.append)
    assert forwards[0] == 6 * VIEWS
    assert any(e["event"] == "progress_refused" and "shard changed" in e["why"] for e in events), events
    sample = next(s for s in iter_shard(str(path)) if s["__key__"] == "k2")
    assert Cache(str(out)).samples(0)["samples/digest"][2].tobytes() == fmt.sample_digest(sample)
    assert verify_cache(str(out)).ok


def test_overwrite_replaces_a_cache_that_holds_progress_records(one_shard, teacher_ckpt, crashed, tmp_path):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(crashed[0], url)
    assert records(url)
    summary = cache_teacher(config(one_shard, url, teacher_ckpt, overwrite=True))
    assert summary["items"] == 8 * VIEWS and summary["complete"] and records(url) == {}


def test_the_default_saves_by_time_alone(one_shard, teacher_ckpt, tmp_path):
    """No --save-rows: rows are saved once --save-seconds have passed (here: at once, after every batch)."""
    out = tmp_path / "c.zarr"
    with pytest.raises(Crash):
        cache_teacher(config(one_shard, out, teacher_ckpt, save_rows=None, save_seconds=1e-9), crash_after(5))
    assert [r["rows"] for r in records(str(out)).values()] == [5]
