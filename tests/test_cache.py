"""The cache format: round trips, extension, crash safety, concurrent writers, corruption, plain-zarr reads."""
import json
import multiprocessing as mp
import os
import re
import zlib

import numpy as np
import pytest
import torch
import zarr

from pld_pipeline.cache import (
    CacheError, CacheMeta, Cache, SampleStatus, ShardRecord, TeacherBlock, TeacherRecord,
    inspect_cache, verify_cache,
)
from pld_pipeline.cache import format as fmt
from pld_pipeline.cache import schema
from pld_pipeline.cache.encode import encode_teacher_logits, targets_from_arrays
from pld_pipeline.losses import TeacherTargets, pld_loss, pld_loss_from_ranking
from pld_pipeline.views import ViewRecipe
from conftest import stored_object

C = 10
SHARD_SIZES = [7, 5, 6]


def shard_records(sizes=SHARD_SIZES):
    return [ShardRecord(name=f"train-{i:06d}.tar", url=f"/data/train-{i:06d}.tar", nsamples=n, nbytes=1000 + n,
                        sha256=f"{i:064x}", quick_hash=f"q{i}") for i, n in enumerate(sizes)]


def teacher_record(tid="t1", k=4, temps=(1.0, 2.0), sha="abc"):
    return TeacherRecord(id=tid, source="fake", checkpoint=None, checkpoint_sha256=sha,
                         preprocessing={"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 8, 8]},
                         k=k, temperatures=tuple(temps), index_dtype="int16")


def request(views=2, teachers=(), sizes=SHARD_SIZES, seed=0):
    return CacheMeta(num_classes=C, rows_per_shard=max(sizes), key_bytes=12, shards=shard_records(sizes),
                     recipe=ViewRecipe(name="cifar", size=8, pad=1).to_dict(), num_views=views, seed=seed,
                     teachers={t.id: t for t in teachers}, class_names=[f"c{i}" for i in range(C)])


def fake_logits(shard, n, views, tid="t1"):
    g = torch.Generator().manual_seed(zlib.crc32(f"{shard}:{tid}".encode()))
    return torch.randn(n, views, C, generator=g) * 3


def shard_samples(shard, n):
    keys = [f"s{shard}_k{i:03d}" for i in range(n)]
    labels = np.array([(shard + i) % C for i in range(n)], dtype=np.int32)
    return keys, labels


def sample_digests(keys, labels):
    return np.stack([np.frombuffer(fmt.sample_digest({"__key__": k, "cls": str(y).encode(), "png": k.encode() * 3}),
                                   np.uint8) for k, y in zip(keys, labels)])


def write_shard(writer, shard, views=(0, 2), teachers=("t1",), crash_before_marker=False):
    n = writer.meta.shards[shard].nsamples
    keys, labels = shard_samples(shard, n)
    done = {u.name for u in writer.done}
    if fmt.samples_unit(shard) not in done:
        writer.write_samples(shard, keys, labels, np.full(n, SampleStatus.OK, np.uint8), sample_digests(keys, labels))
    if fmt.views_unit(shard, views) not in done:
        v = np.arange(views[0], views[1])[None, :]
        i = np.arange(n)[:, None] + 0 * v
        params = np.stack([i + 10 * v, v + 0 * i, 8 + 0 * i, 8 + 0 * i, (i + v) % 2], -1).astype(np.int32)
        writer.write_views(shard, views, params)
    for tid in teachers:
        rec = writer.meta.teachers[tid]
        v = views[1] - views[0]
        logits = fake_logits(shard, n, writer.meta.num_views, tid)[:, views[0]:views[1]].reshape(n * v, C)
        enc = encode_teacher_logits(logits, torch.as_tensor(labels).repeat_interleave(v), k=rec.k,
                                    temperatures=rec.temperatures)
        block = TeacherBlock(
            topk_idx=enc["topk_idx"].reshape(n, v, -1).numpy(), topk_logp=enc["topk_logp"].reshape(n, v, -1).numpy(),
            label_logp=enc["label_logp"].reshape(n, v).numpy(), logz=enc["logz"].reshape(n, v, -1).numpy(),
            correct=int(enc["correct"].sum()), count=n * v)
        if crash_before_marker:
            # The data lands but the process dies before the marker: what a killed writer leaves behind.
            import pld_pipeline.cache.cache as writer_module

            def die(*args, **kwargs):
                raise KeyboardInterrupt

            real, writer_module.write_marker = writer_module.write_marker, die
            try:
                writer.write_teacher(shard, tid, views, block)
            except KeyboardInterrupt:
                return
            finally:
                writer_module.write_marker = real
        writer.write_teacher(shard, tid, views, block)


@pytest.fixture
def cache_url(tmp_path):
    return str(tmp_path / "cache.zarr")


def filled(cache_url, teachers=(teacher_record(),), views=2):
    w = Cache.create_or_extend(cache_url, request(views, teachers))
    for s in range(len(SHARD_SIZES)):
        write_shard(w, s, (0, views), [t.id for t in teachers])
    return w


def test_every_field_round_trips(cache_url):
    filled(cache_url)
    r = Cache(cache_url)
    assert r.meta.num_classes == C and r.meta.class_names[3] == "c3"
    for shard, n in enumerate(SHARD_SIZES):
        block = r.read(shard, "t1", temperature=2.0)
        keys, labels = shard_samples(shard, n)
        assert block.keys == keys
        np.testing.assert_array_equal(block.labels, labels)
        assert (block.status == SampleStatus.OK).all()
        assert block.params.shape == (n, 2, 5) and block.params[0, 0, 0] == 0
        logits = fake_logits(shard, n, 2)
        for v in range(2):
            want = TeacherTargets.from_logits(logits[:, v], torch.as_tensor(labels).long(), k=4, temperature=2.0)
            np.testing.assert_array_equal(block.topk_idx[:, v], want.topk_idx.numpy())
            got = targets_from_arrays(block.topk_idx[:, v], block.topk_logp[:, v], block.label_logp[:, v],
                                      block.logz[:, v], temperature=2.0, num_classes=C)
            # The stored dtypes (float16 deltas from the top-1) keep every weight within 1e-3 of exact.
            err = (got.topk_log_probs().exp() - want.topk_log_probs().exp()).abs().max()
            assert err < 1e-3
            assert (got.label_log_prob().exp() - want.label_log_prob().exp()).abs().max() < 1e-3
    index = r.key_index()
    assert index["s1_k004"] == (1, 4) and len(index) == sum(SHARD_SIZES)


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 4.0])
def test_stored_weights_stay_within_1e_3_for_unconfident_teachers(temperature):
    """The hard case for float16: C=1000, a top class at log-prob ~ -2.5 (absolute float16 log-probs would
    be off by more than 1e-3 at T < 1). Stored as deltas from the top-1 they stay well inside."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 1000, generator=g) * 2.0
    labels = torch.randint(0, 1000, (512,), generator=g)
    logits[torch.arange(512), labels] += 6.0
    exact = TeacherTargets.from_logits(logits, labels, k=32, temperature=temperature)
    enc = encode_teacher_logits(logits, labels, k=32, temperatures=(temperature,))
    dlogp, top1 = schema.split_logp(enc["topk_logp"].numpy())
    assert dlogp.dtype == np.float16 and top1.dtype == np.float32
    stored = targets_from_arrays(enc["topk_idx"], schema.join_logp(dlogp, top1), enc["label_logp"].numpy().astype(np.float32),
                                 enc["logz"][:, 0], temperature=temperature, num_classes=1000)
    err = (stored.topk_log_probs().exp() - exact.topk_log_probs().exp()).abs().max()
    assert err < 5e-4, float(err)
    naive = (torch.from_numpy(enc["topk_logp"].numpy().astype(np.float16).astype(np.float32)) / temperature
             - enc["logz"][:, :1]).exp()
    if temperature < 1:
        assert (naive - exact.topk_log_probs().exp()).abs().max() > err  # why deltas are stored


def test_full_mode_reproduces_the_full_pld_loss(cache_url):
    filled(cache_url, teachers=(teacher_record(k=C, temps=(1.0,)),))
    r = Cache(cache_url)
    block = r.read(0, "t1")
    labels = torch.as_tensor(block.labels).long()
    logits = fake_logits(0, SHARD_SIZES[0], 2)[:, 1]
    student = torch.randn(len(labels), C)
    tg = targets_from_arrays(block.topk_idx[:, 1], block.topk_logp[:, 1], block.label_logp[:, 1], block.logz[:, 1],
                             temperature=1.0, num_classes=C)
    torch.testing.assert_close(pld_loss_from_ranking(student, labels, tg), pld_loss(student, logits, labels),
                               atol=2e-3, rtol=1e-3)


def test_several_teachers_and_adding_one_later(cache_url):
    filled(cache_url, teachers=(teacher_record("t1"), teacher_record("t2", k=3, sha="def")))
    w = Cache.create_or_extend(cache_url, request(2, [teacher_record("t3", k=C, temps=(1.0,), sha="x")]))
    assert set(w.meta.teachers) == {"t1", "t2", "t3"}
    r = Cache(cache_url)
    with pytest.raises(CacheError, match="Teacher 't3' is not complete"):
        r.read(0, "t3")
    before = np.asarray(r.array("teachers/t1/topk_dlogp")[:])
    for s in range(3):
        write_shard(w, s, (0, 2), ["t3"])
    r = Cache(cache_url)
    assert r.read(2, "t3").topk_idx.shape == (6, 2, C)
    np.testing.assert_array_equal(np.asarray(r.array("teachers/t1/topk_dlogp")[:]), before)
    assert verify_cache(cache_url).ok


def test_adding_views_later_keeps_what_exists(cache_url):
    filled(cache_url, views=2)
    r = Cache(cache_url)
    old = r.read(1, "t1")
    w = Cache.create_or_extend(cache_url, request(4, [teacher_record()]))
    assert Cache(cache_url).missing_units("t1")  # views 2, 3 not yet written
    for s in range(3):
        write_shard(w, s, (2, 4))
    new = Cache(cache_url).read(1, "t1")
    assert new.topk_idx.shape[1] == 4
    np.testing.assert_array_equal(new.topk_idx[:, :2], old.topk_idx)
    np.testing.assert_array_equal(new.params[:, :2], old.params)
    assert verify_cache(cache_url).ok


def test_a_unit_killed_before_its_marker_is_invisible_and_redone(cache_url):
    w = Cache.create_or_extend(cache_url, request(2, [teacher_record()]))
    write_shard(w, 0)
    write_shard(w, 1, crash_before_marker=True)
    r = Cache(cache_url)
    with pytest.raises(CacheError, match="not complete"):
        r.read(1, "t1")
    assert any("s000001.teacher.t1" in m for m in r.missing_units("t1"))
    report = verify_cache(cache_url)
    assert not report.ok and any("incomplete" in p for p in report.problems)
    # Resume: a fresh writer redoes exactly the units without a marker.
    w2 = Cache.create_or_extend(cache_url, request(2, [teacher_record()]))
    for s in range(3):
        write_shard(w2, s)
    assert verify_cache(cache_url).ok


def _write_in_subprocess(url, shards):
    w = Cache(url, mode="r+")
    for s in shards:
        write_shard(w, s)


@pytest.mark.slow
def test_two_processes_write_disjoint_units_concurrently(cache_url, tmp_path):
    Cache.create_or_extend(cache_url, request(2, [teacher_record()]))
    # forked, not spawned: a spawned child re-imports torch and this module (~6 s of CPU each) for the same test;
    # zarr resets its event loop in a forked child (zarr.core.sync registers an at-fork hook)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_in_subprocess, args=(cache_url, part)) for part in ([0, 2], [1])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)  # a hang guard, not a timing
        assert p.exitcode == 0
    serial = str(tmp_path / "serial.zarr")
    filled(serial)
    a, b = Cache(cache_url), Cache(serial)
    for s in range(3):
        x, y = a.read(s, "t1"), b.read(s, "t1")
        np.testing.assert_array_equal(x.topk_logp, y.topk_logp)
        np.testing.assert_array_equal(x.params, y.params)
    assert verify_cache(cache_url).ok


def test_plain_zarr_reads_the_cache_by_the_spec(cache_url):
    """What docs/cache-format.md tells another team, with no import of pld_pipeline."""
    filled(cache_url)
    root = zarr.open_group(cache_url, mode="r")
    meta = root.attrs["pld_cache"]
    assert meta["format"] == "pld-cache" and meta["version"] == 2
    s = meta["rows_per_shard"]
    shard = 1
    n = meta["shards"][shard]["nsamples"]
    rows = slice(shard * s, shard * s + n)
    keys = [bytes(k).rstrip(b"\0").decode() for k in root["samples/key"][rows]]
    assert keys == shard_samples(shard, n)[0]
    t = meta["teachers"]["t1"]
    idx = root["teachers/t1/topk_idx"][rows, 0]
    logp = root["teachers/t1/top1_logp"][rows, 0][:, None] + root["teachers/t1/topk_dlogp"][rows, 0].astype(np.float64)
    logz = root["teachers/t1/logz"][rows, 0, t["temperatures"].index(2.0)]
    p = np.exp(logp / 2.0 - logz[:, None])
    want = torch.softmax(fake_logits(shard, n, 2)[:, 0] / 2.0, 1).numpy()
    np.testing.assert_allclose(p, np.take_along_axis(want, idx.astype(np.int64), 1), atol=1e-3)
    done = sorted(root["units"].group_keys())
    assert "s000001.teacher.t1.0-2" in done
    assert root["units"]["s000001.samples"].attrs["rows"] == n

    # The spec's own "reading a unit safely" snippet, executed as written, accepts every intact unit ...
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cache-format.md")).read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "def check_unit" in b)
    ns = {"np": np}
    exec(snippet, ns)
    reader = Cache(cache_url)
    for name in done:
        got = ns["check_unit"](root, meta, name)
        want = reader.read_unit(name)
        assert sorted(got) == sorted(want)
        for path in got:
            np.testing.assert_array_equal(got[path], want[path])  # NaN fill values compare equal here
    # ... and refuses edited metadata and swapped data, like the library's readers
    edited = json.loads(json.dumps(meta))
    edited["teachers"]["t1"]["temperatures"] = [2.0, 1.0]
    with pytest.raises(AssertionError, match="binding"):
        ns["check_unit"](root, edited, "s000001.teacher.t1.0-2")
    from conftest import swap_objects
    swap_objects(cache_url, "teachers/t1/topk_dlogp", 0, 1)
    with pytest.raises(AssertionError, match="topk_dlogp"):
        ns["check_unit"](root, meta, "s000001.teacher.t1.0-2")


def test_a_flipped_byte_fails_loudly_in_verify_and_the_reader(cache_url):
    filled(cache_url)
    chunk = stored_object(cache_url, "teachers/t1/topk_dlogp", 1)
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    report = verify_cache(cache_url)
    assert not report.ok and any("s000001.teacher.t1" in p and "unreadable" in p for p in report.problems)
    assert report.damaged == ["s000001.teacher.t1.0-2"]
    with pytest.raises(CacheError, match="s000001.teacher.t1.0-2 is damaged.*rerun the `pld cache-teacher` command"):
        Cache(cache_url).read(1, "t1")
    Cache(cache_url).read(0, "t1")  # other shards still read


def test_a_missing_chunk_is_caught_by_verify(cache_url):
    filled(cache_url)
    os.remove(stored_object(cache_url, "teachers/t1/topk_idx", 2))
    report = verify_cache(cache_url)
    assert not report.ok
    assert any("s000002.teacher.t1" in p and "differs from what was written" in p for p in report.problems)
    with pytest.raises(CacheError, match="s000002.teacher.t1.0-2 is damaged"):
        Cache(cache_url).read(2, "t1")  # zarr would have returned the fill value (-1) for it


def _rewrite_teacher_unit(w, shard, edit):
    """Rewrite a teacher unit through the writer (valid checksums, valid binding) with ``edit`` applied."""
    r = Cache(w.url)
    b = r.read(shard, "t1")
    rows = slice(shard * r.meta.rows_per_shard, shard * r.meta.rows_per_shard + r.meta.shards[shard].nsamples)
    block = TeacherBlock(b.topk_idx.copy(), b.topk_logp.copy(), b.label_logp.copy(),
                         np.asarray(r.array("teachers/t1/logz")[rows]), correct=0, count=0)
    edit(block, b.labels)
    w.write_teacher(shard, "t1", (0, 2), block)


def _label_position_swapped(block, labels):
    row = next(i for i in range(len(labels)) if (block.topk_idx[i, 0, 1:] == labels[i]).any())
    block.label_logp[row, 0] -= 1.0


def _order_swapped(block, labels):
    block.topk_logp[0, 0, [0, 1]] = block.topk_logp[0, 0, [1, 0]]


@pytest.mark.parametrize("edit, match", [
    (lambda b, y: b.topk_idx.__setitem__((0, 0, 1), b.topk_idx[0, 0, 0]), "repeated class index"),
    (lambda b, y: b.topk_idx.__setitem__((1, 0, 0), 99), r"outside \[0, 10\)"),
    (lambda b, y: b.label_logp.__setitem__((0, 1), np.nan), "a non-finite label log-prob"),
    (_label_position_swapped, "a label log-prob unequal to its top-k entry"),
    (_order_swapped, "not in descending order"),
])
def test_verify_catches_semantic_damage_written_with_valid_checksums(cache_url, edit, match):
    w = filled(cache_url)
    _rewrite_teacher_unit(w, 0, edit)
    report = verify_cache(cache_url)
    assert report.damaged == ["s000000.teacher.t1.0-2"], report.problems
    assert any(re.search(match, p) for p in report.problems), report.problems


def test_inspect_summarises_the_cache(cache_url):
    filled(cache_url, teachers=(teacher_record("t1", k=3),))
    info = inspect_cache(cache_url)
    assert info["shards_done"] == 3 and info["views"] == 2 and info["samples"] == 18
    t = info["teachers"]["t1"]
    assert t["k"] == 3 and t["temperatures"] == [1.0, 2.0] and t["shards_done"] == 3
    assert 0 <= t["accuracy_on_cached_views"] <= 1
    tail = []
    for shard, n in enumerate(SHARD_SIZES):
        probs = torch.softmax(fake_logits(shard, n, 2).double(), -1)
        tail.append((1 - probs.topk(3, -1).values.sum(-1)).flatten())
    tail = torch.cat(tail).numpy()
    for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        assert abs(t["tail_mass"][name] - np.quantile(tail, q)) < 2e-4, name  # float16 storage: ~1e-4
    assert abs(t["tail_mass"]["max"] - tail.max()) < 2e-4
    assert info["bytes_on_disk"] > 0 and info["bytes_per_view"] > 0
    json.dumps(info)


@pytest.mark.parametrize("change, match", [
    (lambda r: setattr(r, "num_classes", 11), "different num_classes"),
    (lambda r: setattr(r, "shards", shard_records([7, 5, 6])[:2]), "different dataset"),
    (lambda r: r.recipe.update(pad=2), "different view recipe"),
    (lambda r: setattr(r, "seed", 1), "different view seed"),
    (lambda r: r.teachers.update(t1=teacher_record(sha="other")), "Teacher 't1' already in .* differs in checkpoint_sha256"),
])
def test_a_rerun_that_conflicts_with_the_cache_is_refused(cache_url, change, match):
    filled(cache_url)
    req = request(2, [teacher_record()])
    change(req)
    with pytest.raises(CacheError, match=match):
        Cache.create_or_extend(cache_url, req)


def test_reader_mismatch_errors_name_the_fix(cache_url):
    filled(cache_url, teachers=(teacher_record("t1"), teacher_record("t2", sha="d")))
    r = Cache(cache_url)
    with pytest.raises(CacheError, match="several teachers"):
        r.teacher()
    with pytest.raises(CacheError, match="'nope' is not in"):
        r.teacher("nope")
    with pytest.raises(CacheError, match=r"Temperature 4 is not in .*grid \(1, 2\)"):
        r.read(0, "t1", temperature=4.0)
    with pytest.raises(CacheError, match="not covered"):
        r.shard_for(name="other.tar")
    with pytest.raises(CacheError, match="No cache at"):
        Cache(cache_url + "-missing")


def test_readers_open_read_only(cache_url):
    filled(cache_url)
    r = Cache(cache_url)
    with pytest.raises(Exception):
        r.array(schema.LABEL.path())[0:1] = np.array([3], dtype=np.int32)


def test_memory_url_round_trip():
    url = "memory://pld-test-cache"
    w = Cache.create_or_extend(url, request(2, [teacher_record()]), overwrite=True)
    for s in range(3):
        write_shard(w, s)
    assert Cache(url).read(2, "t1").keys == shard_samples(2, 6)[0]
    assert verify_cache(url).ok


def test_teacher_fields_added_later_do_not_break_existing_bindings(cache_url):
    """A record written before `precision`/`pretrained` existed reads back with their defaults and keeps its
    binding; a non-default value is bound like any other field."""
    filled(cache_url)
    root = zarr.open_group(cache_url, mode="r+")
    meta = dict(root.attrs["pld_cache"])
    for field_name in ("precision", "pretrained"):
        meta["teachers"]["t1"].pop(field_name)
    root.attrs["pld_cache"] = meta
    assert verify_cache(cache_url).ok
    meta["teachers"]["t1"]["precision"] = "bf16"
    root.attrs["pld_cache"] = meta
    assert verify_cache(cache_url).damaged == [f"s00000{s}.teacher.t1.0-2" for s in range(3)]


def _indexed(cache_url, chunk_rows=None, monkeypatch=None):
    from pld_pipeline.cache import key_index
    w = filled(cache_url)
    reader = Cache(cache_url)
    if chunk_rows:
        monkeypatch.setattr(key_index, "CHUNK_ROWS", chunk_rows)  # several chunks even for a tiny cache
    key_index.build(w.root, reader.meta, {s: reader.samples(s) for s in range(len(SHARD_SIZES))})
    return Cache(cache_url)


def test_the_key_index_finds_every_key_in_two_chunk_reads(cache_url, monkeypatch):
    from pld_pipeline.cache import key_index
    reader = _indexed(cache_url, chunk_rows=4, monkeypatch=monkeypatch)
    expected = reader.key_index()  # the scan of every samples unit
    monkeypatch.setattr(Cache, "key_index", lambda self: pytest.fail("scanned instead of using the index"))
    reads = []
    real = key_index.block_sha256
    monkeypatch.setattr(key_index, "block_sha256", lambda a: reads.append(len(a)) or real(a))
    for key, where in expected.items():
        reads.clear()
        assert reader.find(key) == where
        assert len(reads) == 2 and max(reads) <= 4  # one chunk of keys and one of rows, each checked
    assert reader.find("no-such-key") is None and reader.find("") is None and reader.find("x" * 999) is None
    assert inspect_cache(cache_url)["key_index"] == "current" and verify_cache(cache_url).ok
    stored = zarr.open_group(cache_url, mode="r")["key_index/keys"][...]
    assert [bytes(k) for k in stored] == sorted(bytes(k) for k in stored)  # the spec: sorted bytewise


def test_a_damaged_key_index_is_refused_and_a_stale_one_is_not_used(cache_url, monkeypatch):
    from dataclasses import replace

    from pld_pipeline.cache import key_index
    reader = _indexed(cache_url, chunk_rows=4, monkeypatch=monkeypatch)
    key = next(iter(reader.key_index()))
    root = zarr.open_group(cache_url, mode="r+")
    rows = root["key_index/rows"][...]
    root["key_index/rows"][...] = rows[::-1].copy()  # every key now points at another sample's row
    with pytest.raises(CacheError, match="key index differs from what was written.*rebuild"):
        Cache(cache_url).find(key)
    report = verify_cache(cache_url)
    assert not report.ok and "key_index" in report.damaged and any("key index" in p for p in report.problems)
    root["key_index/rows"][...] = rows
    assert Cache(cache_url).find(key) is not None
    meta = Cache(cache_url).meta
    fewer = replace(meta, shards=meta.shards[:-1])  # the cache's shards changed since the index was made
    assert key_index.state(root, fewer) == "stale"
    with pytest.raises(LookupError):
        key_index.lookup(root, fewer, key, cache_url)


def test_the_spec_table_is_the_schema():
    """docs/cache-format.md's array table is rendered from the one declaration of every array (schema.py)."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cache-format.md")).read()
    assert schema.spec_table() in doc


def test_views_of_one_data_shard_share_an_object_and_extension_keeps_the_earlier_ones(cache_url, monkeypatch):
    """Views 0..15 of a data shard live in one object per per-view array. Adding views rewrites that object; a
    write cut short (the process dies before zarr renames its temporary file over the object) leaves the old
    object byte for byte, so the units already there still read intact, and the extension then completes."""
    filled(cache_url)
    obj = stored_object(cache_url, "teachers/t1/topk_dlogp", 1)
    assert not os.path.exists(stored_object(cache_url, "teachers/t1/topk_dlogp", 1, view=16))
    assert sorted(os.listdir(os.path.dirname(obj))) == ["0"]  # both views, one object
    before, first_two = open(obj, "rb").read(), Cache(cache_url).read(1, "t1")
    w = Cache.create_or_extend(cache_url, request(4, (teacher_record(),)))

    def torn(*args, **kwargs):
        raise OSError("the machine died mid-write")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", torn)  # the store renames its temporary file relative to a folder handle
        with pytest.raises(OSError, match="mid-write"):
            write_shard(w, 1, views=(2, 4))
    assert open(obj, "rb").read() == before and sorted(os.listdir(os.path.dirname(obj))) == ["0"]
    report = verify_cache(cache_url)
    assert report.damaged == [] and all(p.startswith("incomplete") for p in report.problems), report.problems
    for s in range(len(SHARD_SIZES)):
        write_shard(w, s, views=(2, 4))
    assert verify_cache(cache_url).ok
    block = Cache(cache_url).read(1, "t1")
    n = SHARD_SIZES[1]
    labels = torch.as_tensor(shard_samples(1, n)[1]).repeat_interleave(2)
    enc = encode_teacher_logits(fake_logits(1, n, 4)[:, 2:].reshape(n * 2, C), labels, k=4, temperatures=(1.0, 2.0))
    np.testing.assert_array_equal(block.topk_idx[:, 2:], enc["topk_idx"].reshape(n, 2, -1).numpy())
    np.testing.assert_array_equal(block.topk_idx[:, :2], first_two.topk_idx)
    np.testing.assert_array_equal(block.topk_logp[:, :2], first_two.topk_logp)
    assert open(obj, "rb").read() != before  # the object now holds views 0-3


def test_a_cache_from_before_the_sharded_layout_reads_and_extends(cache_url, monkeypatch):
    """Caches written with one object per chunk (before 16 views shared an object) are the same format: they
    read, verify and extend (new views into their old arrays, a new teacher in the new layout)."""
    real = schema.layout
    with monkeypatch.context() as m:
        m.setattr(schema, "layout", lambda *a, **kw: {**real(*a, **kw), "shards": None})
        filled(cache_url)
    assert os.path.exists(os.path.join(cache_url, schema.object_key("teachers/t1/logz", 1, view=1, views_per_object=1)))
    before = Cache(cache_url).read(1, "t1")
    teachers = (teacher_record(), teacher_record("t2"))
    w = Cache.create_or_extend(cache_url, request(4, teachers))
    for s in range(len(SHARD_SIZES)):
        write_shard(w, s, views=(2, 4), teachers=("t1",))
        write_shard(w, s, views=(0, 4), teachers=("t2",))
    assert Cache(cache_url).array("teachers/t1/logz").shards is None
    assert Cache(cache_url).array("teachers/t2/logz").shards is not None
    assert verify_cache(cache_url).ok
    after = Cache(cache_url).read(1, "t1")
    np.testing.assert_array_equal(after.topk_logp[:, :2], before.topk_logp)


def test_claims_that_expired_or_whose_local_worker_died_are_taken_over(tmp_path):
    """A claim is held only while its worker lives: one from another machine until its Unix-time expiry (which
    says nothing about this machine's clocks since boot), one from a process of this machine until that process
    is gone (a crashed run, rerun, redoes its shards at once, not after --claim-ttl)."""
    import socket
    import subprocess
    import sys
    import time

    from pld_pipeline.cache import claims
    root = zarr.open_group(str(tmp_path / "c.zarr"), mode="w")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid names no process now
    here = socket.gethostname()
    claims.claim(root, [0], "other-host:123:aaaa", ttl=-60)  # another machine's, expired a minute ago
    claims.claim(root, [1], f"{here}:{finished.pid}:bbbb", ttl=3600)  # a dead local worker's, for another hour
    claims.claim(root, [2], "other-host:123:cccc", ttl=3600)  # live: another machine's, not expired
    claims.claim(root, [3], f"{here}:{os.getpid()}:dddd", ttl=3600)  # live: a running process of this machine
    for shard, expires in ((4, "Infinity"), (5, "NaN"), (6, "3.3e10")):  # a stranger's: would hold a shard forever
        (tmp_path / "c.zarr" / "claims" / f"s{shard:06d}.json").write_text(
            f'{{"owner": "other-host:9:eeee", "expires": {expires}}}')
    me = claims.new_owner()
    assert [claims.held_by_other(root, s, me) for s in range(8)] == [False, False, True, True, False, False, False, False]
    assert claims.acquire(root, [0, 1], me, ttl=60, checked_at=time.monotonic()) == [0, 1]
    assert {claims.read_claim(root, s)["owner"] for s in (0, 1)} == {me}
