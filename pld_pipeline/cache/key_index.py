"""A stored key index: one sample's row in two small reads, without reading every shard's keys.

``key_index/keys`` (uint8 [N, key_bytes], the keys of every sample row, sorted bytewise) and
``key_index/rows`` (int64 [N], each key's global row, ``shard * rows_per_shard + row``), chunked by
``CHUNK_ROWS``. The ``key_index`` group's attributes, written last in one object, make it usable: the
number of keys, the chunk size, the first key of each chunk (``fence``: which chunk can hold a key), a sha256
of each chunk of both arrays, and a binding to the shards it covers. A lookup reads the attributes, picks the
chunk by the fence, reads one chunk of each array, checks both against their sha256 and bisects: O(log n)
comparisons, two chunk reads, whatever the cache's size.

The index is derived data. ``cache-teacher`` builds it once every shard's samples unit exists and rebuilds it
when the shards change (extension); a reader treats an index that does not cover the cache's shards as absent
(and scans the samples units instead), and refuses an index whose bytes do not match their checksums. A found
row is confirmed against the shard's own checked samples unit (``Cache.find``), so the index can make a
lookup fast, never wrong.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from typing import Any

import numpy as np
import zarr

from . import bounds
from .format import CacheError, CacheMeta, SampleStatus
from .integrity import block_sha256
from .schema import KEY, STATUS, compressors
from .store import read_document

GROUP = "key_index"
KEYS = f"{GROUP}/keys"
ROWS = f"{GROUP}/rows"
ATTR = "pld_key_index"
CHUNK_ROWS = 65536  # 1.28M ImageNet keys: 20 chunks of ~2 MiB of keys each


class DamagedIndex(CacheError):
    pass


def index_binding(meta: CacheMeta) -> str:
    """What the index's rows mean: the row layout and the identity (content hashes) of every shard, in order."""
    doc = {"rows_per_shard": meta.rows_per_shard, "key_bytes": meta.key_bytes,
           "shards": [{"sha256": s.sha256, "nsamples": s.nsamples} for s in meta.shards]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build(root: zarr.Group, meta: CacheMeta, samples: dict[int, dict[str, np.ndarray]], level: int = 3) -> int:
    """Write the index from every shard's (checked) samples arrays: shard -> {path: array over its rows}.
    Rows that hold no sample (``SampleStatus.EMPTY``) are left out. Returns the number of keys."""
    if sorted(samples) != list(range(len(meta.shards))):
        raise CacheError("The key index needs every shard's samples unit.")
    keys, rows = [], []
    for shard, arrays in sorted(samples.items()):
        n = meta.shards[shard].nsamples
        present = np.flatnonzero(arrays[STATUS.path()][:n] != SampleStatus.EMPTY)
        keys.append(arrays[KEY.path()][present])
        rows.append(shard * meta.rows_per_shard + present.astype(np.int64))
    key_arr = np.concatenate(keys) if keys else np.zeros((0, meta.key_bytes), np.uint8)
    row_arr = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    order = np.lexsort(key_arr.T[::-1]) if len(key_arr) else np.zeros(0, np.int64)  # bytewise, first byte first
    key_arr, row_arr = np.ascontiguousarray(key_arr[order]), row_arr[order]
    record = _record(root)
    if record is not None and record.get("malformed"):
        root.create_group(GROUP, overwrite=True)  # a document zarr cannot even open as a group: start afresh
    elif record is not None:
        del root[GROUP].attrs[ATTR]  # withdrawn first: a crash from here on leaves no index, never a half-new one
    try:
        group = root.require_group(GROUP)
    except zarr.errors.ContainsGroupError:  # a worker finishing at the same moment created it between check and write
        group = root[GROUP]
    n = len(key_arr)
    for path, arr in ((KEYS, key_arr), (ROWS, row_arr)):
        root.create_array(path, shape=arr.shape, chunks=(CHUNK_ROWS,) + arr.shape[1:], dtype=arr.dtype,
                          fill_value=0, compressors=compressors(level), overwrite=True)
        if n:
            root[path][...] = arr
    starts = range(0, n, CHUNK_ROWS)
    group.attrs[ATTR] = {
        "count": n, "chunk_rows": CHUNK_ROWS, "binding": index_binding(meta),
        "fence": [bytes(key_arr[s]).hex() for s in starts],
        "checksums": {"keys": [block_sha256(key_arr[s:s + CHUNK_ROWS]) for s in starts],
                      "rows": [block_sha256(row_arr[s:s + CHUNK_ROWS]) for s in starts]}}
    return n


def state(root: zarr.Group, meta: CacheMeta) -> str:
    """``current`` (covers the cache's shards), ``stale`` (made for other shards) or ``absent``."""
    record = _record(root)
    if record is None:
        return "absent"
    return "current" if record.get("binding") == index_binding(meta) else "stale"


def _record(root: zarr.Group) -> dict[str, Any] | None:
    """The index's record from the group's own document, read as JSON (zarr raises TypeError on a group document
    a stranger made malformed); None where there is no index, ``{"malformed": True, ...}`` where it is no record."""
    malformed = {"binding": None, "malformed": True}
    try:
        doc = read_document(root, f"{GROUP}/zarr.json")
    except CacheError:
        return malformed
    if doc is None:
        return None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) and doc.get("node_type") == "group" else None
    if not isinstance(attrs, dict):
        return malformed
    record = attrs.get(ATTR)
    return record if record is None or _well_formed(record) else malformed


def _well_formed(r: Any) -> bool:
    """A record as build() writes it: a stranger's can hold anything, and lookups index lists by its numbers."""
    def ints(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not isinstance(r, dict) or not ints(r.get("count")) or r.get("chunk_rows") != CHUNK_ROWS:
        return False
    fence, sums = r.get("fence"), r.get("checksums")
    chunks = -(-r["count"] // CHUNK_ROWS)
    return (isinstance(fence, list) and len(fence) == chunks and all(isinstance(f, str) for f in fence)
            and isinstance(sums, dict) and all(isinstance(sums.get(a), list) and len(sums[a]) == chunks
                                               for a in ("keys", "rows")))


def _check_arrays(root: zarr.Group, meta: CacheMeta, record: dict[str, Any], url: str) -> None:
    """The index arrays' stored metadata (format, codecs, shape, chunking) before any of their chunks is read."""
    if record["count"] > meta.num_rows:
        raise DamagedIndex(f"{url}: the key index claims {record['count']} keys, more than the cache's "
                           f"{meta.num_rows} rows; rerun `pld cache-teacher` to rebuild it.")
    for path, dtype, trailing in ((KEYS, np.dtype(np.uint8), (meta.key_bytes,)), (ROWS, np.dtype(np.int64), ())):
        doc = read_document(root, f"{path}/zarr.json")
        if not isinstance(doc, dict):
            raise DamagedIndex(f"{url}: the key index array {path} is missing; rerun `pld cache-teacher` to rebuild it.")
        bounds.check_array(doc, path, dtype, (record["count"],) + trailing, (CHUNK_ROWS,) + trailing, None, url)


def lookup(root: zarr.Group, meta: CacheMeta, key: str, url: str) -> int | None:
    """The global row of ``key`` by the index, None if the index says the cache has no such key. Raises
    ``LookupError`` when there is no current index (the caller scans), :class:`DamagedIndex` when its bytes
    do not match their checksums."""
    record = _record(root)
    if record is not None and record.get("malformed"):
        raise DamagedIndex(f"{url}: the key index record is malformed; rerun `pld cache-teacher` to rebuild it.")
    if record is None or record.get("binding") != index_binding(meta):
        raise LookupError("no current key index")
    _check_arrays(root, meta, record, url)
    raw = key.encode("utf-8")
    if len(raw) > meta.key_bytes:
        return None
    padded = raw + b"\0" * (meta.key_bytes - len(raw))
    try:
        fence = [bytes.fromhex(f) for f in record["fence"]]
    except ValueError:
        raise DamagedIndex(f"{url}: the key index fence is not hex; rerun `pld cache-teacher` to rebuild it.") from None
    c = bisect.bisect_right(fence, padded) - 1
    if c < 0:
        return None
    size = record["chunk_rows"]
    region = slice(c * size, min((c + 1) * size, record["count"]))
    try:
        keys, rows = np.asarray(root[KEYS][region]), np.asarray(root[ROWS][region])
    except Exception as e:  # noqa: BLE001 - a missing or undecodable chunk is damage
        raise DamagedIndex(f"{url}: the key index is unreadable ({type(e).__name__}); rerun `pld cache-teacher` "
                           "to rebuild it.") from None
    if block_sha256(keys) != record["checksums"]["keys"][c] or block_sha256(rows) != record["checksums"]["rows"][c]:
        raise DamagedIndex(f"{url}: the key index differs from what was written (chunk {c}); rerun "
                           "`pld cache-teacher` to rebuild it.")
    # As numpy fixed-width byte strings the zero-padded keys order exactly as their bytes do (the index's sort
    # order), so a binary search over the chunk: O(log n), no per-key Python objects.
    as_strings = np.ascontiguousarray(keys).view(f"S{meta.key_bytes}").ravel()
    i = int(np.searchsorted(as_strings, padded))
    return int(rows[i]) if i < len(as_strings) and bytes(keys[i]) == padded else None


def check(root: zarr.Group, meta: CacheMeta, samples: dict[int, dict[str, np.ndarray]]) -> list[str]:
    """What verify says about the index: problems found by rebuilding it in memory and comparing."""
    record = _record(root)
    if record is None:
        return []
    if record.get("malformed"):
        return ["key index: its record is malformed; rerun `pld cache-teacher` to rebuild it"]
    if record.get("binding") != index_binding(meta):
        return []  # stale: readers do not use it (verify warns)
    problems = []
    try:
        _check_arrays(root, meta, record, "the cache")
        keys, rows = np.asarray(root[KEYS][...]), np.asarray(root[ROWS][...])
    except Exception as e:  # noqa: BLE001
        return [f"key index: unreadable ({type(e).__name__}); rerun `pld cache-teacher` to rebuild it"]
    size = record["chunk_rows"]
    for c in range(len(record["fence"])):
        part = slice(c * size, (c + 1) * size)
        if (block_sha256(keys[part]) != record["checksums"]["keys"][c]
                or block_sha256(rows[part]) != record["checksums"]["rows"][c]
                or bytes(keys[part][0]).hex() != record["fence"][c]):
            problems.append(f"key index: chunk {c} differs from what was written")
    expected = {}
    for shard, arrays in samples.items():
        n = meta.shards[shard].nsamples
        for i in np.flatnonzero(arrays[STATUS.path()][:n] != SampleStatus.EMPTY):
            expected[bytes(arrays[KEY.path()][i])] = shard * meta.rows_per_shard + int(i)
    stored = {bytes(k): int(r) for k, r in zip(keys, rows)}
    if len(samples) == len(meta.shards) and (stored != expected or record["count"] != len(expected)):
        problems.append(f"key index: {sum(stored.get(k) != r for k, r in expected.items())} key(s) missing or "
                        "pointing at the wrong row")
    if problems:
        problems[-1] += "; rerun `pld cache-teacher` to rebuild it"
    return problems
