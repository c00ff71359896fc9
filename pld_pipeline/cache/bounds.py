"""Sizes a cache claims, checked before anything is allocated from them.

The root metadata says how many views, rows, classes, key bytes, k and temperatures a cache holds, and every read
allocates from those numbers. A stranger's cache can claim anything (``num_views = 10**10`` is one edited field),
so on open each size is held to pld's limits and to what the writer always writes (``rows_per_shard`` is the
largest shard's sample count), and each array's own ``zarr.json`` (read raw, before zarr builds the array) must
be zarr format 3, pld's codecs (codecs.py), the expected dtype, shape and chunking. A chunk can then never
decode to more than ``MAX_CHUNK_BYTES`` and an object fetched from a remote host never exceeds what its chunks
can compress to (:func:`object_caps`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from . import schema
from .codecs import check_codecs
from .format import _TEACHER_ID, CacheError, CacheMeta, TeacherRecord, index_dtype
from .store import parse_document, read_objects
from ..views import ViewRecipe

MAX_CLASSES = 1 << 20  # a student's classifier is allocated from this
MAX_VIEWS = 4096
MAX_ROWS_PER_SHARD = 1 << 20
MAX_SHARDS = 1 << 20
MAX_KEY_BYTES = 4096
MAX_TEMPERATURES = 64
#: A view's side in pixels (a student batch is allocated from it; the largest timm teachers take 1024)
MAX_VIEW_SIZE = 4096
MAX_CHUNK_BYTES = 2 << 30  # one decoded chunk (a shard's rows of one view of one array)
#: Metadata objects (zarr.json of the root, arrays, markers, indexes, claims) read from remote hosts.
MAX_JSON_BYTES = 64 << 20

FIX = "re-create it with `pld cache-teacher`, or ask its owner for an intact copy"


def _refuse(url: str, what: str) -> CacheError:
    return CacheError(f"{url}: {what}; {FIX}.")


def _int_in(url: str, name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _refuse(url, f"metadata field {name}={value!r} lies outside [{lo}, {hi}]")


def check_recipe(recipe: Any, url: str) -> ViewRecipe:
    """The view recipe a stranger's metadata records, parsed and held to pld's limits before any view is replayed
    from it (its size sets every replayed view's allocation, its mixing window how many images are kept)."""
    try:
        parsed = ViewRecipe.from_dict(recipe)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _refuse(url, f"malformed view recipe ({what})") from None
    _int_in(url, "recipe size", parsed.size, 1, MAX_VIEW_SIZE)
    _int_in(url, "recipe pad", parsed.pad, 0, MAX_VIEW_SIZE)
    if parsed.mixing is not None:
        _int_in(url, "mixing window", parsed.mixing.window, 1, MAX_ROWS_PER_SHARD)
    return parsed


def _numbers(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def _check_teacher_record(t: TeacherRecord, url: str) -> None:
    """The fields a reader acts on (``verify --audit`` re-runs the teacher with the recorded preprocessing), as
    pld writes them: one line here, not a numpy error deep in an audit."""
    where = f"teacher '{t.id}'"
    prep = t.preprocessing
    if not isinstance(prep, dict):
        raise _refuse(url, f"{where} has no preprocessing record")
    mean, std = prep.get("mean"), prep.get("std")  # None: not recorded (audit refuses to guess it)
    if not (mean is None or _numbers(mean, 3)) or not (std is None or _numbers(std, 3) and all(x > 0 for x in std)):
        raise _refuse(url, f"{where}'s preprocessing mean/std are not 3 finite numbers each (std > 0)")
    size = prep.get("input_size")
    if not (_numbers(size, 3) and all(isinstance(x, int) for x in size) and size[0] == 3
            and all(1 <= x <= MAX_VIEW_SIZE for x in size[1:])):
        raise _refuse(url, f"{where}'s preprocessing input_size is not [3, H, W] with sides in [1, {MAX_VIEW_SIZE}]")
    if t.precision not in ("fp32", "bf16"):
        raise _refuse(url, f"{where}'s precision {str(t.precision)[:20]!r} is not fp32 or bf16")
    if not isinstance(t.source, str) or not (t.pretrained is None or isinstance(t.pretrained, dict)):
        raise _refuse(url, f"{where}'s source or pretrained record is malformed")


def check_meta(meta: CacheMeta, url: str) -> None:
    """Every size in the root metadata within pld's limits and consistent with the others."""
    check_recipe(meta.recipe, url)
    _int_in(url, "num_classes", meta.num_classes, 1, MAX_CLASSES)
    _int_in(url, "shard count", len(meta.shards), 1, MAX_SHARDS)
    _int_in(url, "rows_per_shard", meta.rows_per_shard, 1, MAX_ROWS_PER_SHARD)
    _int_in(url, "key_bytes", meta.key_bytes, 1, MAX_KEY_BYTES)
    _int_in(url, "num_views", meta.num_views, 1, MAX_VIEWS)
    for s in meta.shards:
        _int_in(url, f"nsamples of {s.name}", s.nsamples, 0, meta.rows_per_shard)
    if meta.rows_per_shard != max(s.nsamples for s in meta.shards):
        raise _refuse(url, f"rows_per_shard={meta.rows_per_shard} is not the largest shard's sample count "
                           f"({max(s.nsamples for s in meta.shards)}), as pld always writes it")
    if meta.class_names is not None and (not isinstance(meta.class_names, list)
                                         or not all(isinstance(n, str) for n in meta.class_names)):
        raise _refuse(url, "class_names is not a list of names")  # its length: the markers' binding checks it
    for tid, t in meta.teachers.items():
        if not isinstance(tid, str) or not _TEACHER_ID.match(tid):  # it names folders inside the cache
            raise _refuse(url, f"teacher id {str(tid)[:80]!r} is not 1-64 letters, digits, '_' or '-'")
        if t.id != tid:
            raise _refuse(url, f"teacher '{tid}' records the id {str(t.id)[:80]!r}")
        _check_teacher_record(t, url)
        _int_in(url, f"k of teacher '{tid}'", t.k, 1, meta.num_classes)
        _int_in(url, f"temperature count of teacher '{tid}'", len(t.temperatures), 1, MAX_TEMPERATURES)
        if not all(math.isfinite(x) and x > 0 for x in t.temperatures):
            raise _refuse(url, f"teacher '{tid}' has temperatures that are not positive finite numbers")
        if t.index_dtype != str(index_dtype(meta.num_classes)):
            raise _refuse(url, f"teacher '{tid}' index_dtype {t.index_dtype!r} is not the one for "
                               f"{meta.num_classes} classes ({index_dtype(meta.num_classes)})")


def expected_arrays(meta: CacheMeta) -> dict[str, tuple[np.dtype, tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]]:
    """path -> (dtype, shape, chunk, object) of every array the metadata implies (object None: one per chunk)."""
    out = {}
    for spec in schema.ARRAYS:
        for teacher in (meta.teachers.values() if spec.unit == "teacher" else [None]):
            lay = schema.layout(spec, meta, teacher)
            out[spec.path(teacher and teacher.id)] = (schema.dtype_of(spec, teacher), lay["shape"], lay["chunks"],
                                                      lay["shards"])
    return out


def check_array(doc: dict[str, Any], path: str, dtype: np.dtype, shape: tuple[int, ...], chunk: tuple[int, ...],
                obj: tuple[int, ...] | None, url: str, views_axis: bool = False) -> None:
    """One array's zarr.json against its expected layout. Per-view arrays may carry more views than the metadata
    (an extension killed before its metadata write) but never more than MAX_VIEWS; they are stored either one
    object per chunk (caches from before the sharded layout) or ``obj`` chunks per object."""
    where = f"{url}: array {path}"
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "array":
        raise CacheError(f"{where} is not a zarr format 3 array; pld reads only format 3 caches it wrote ({FIX}).")
    if doc.get("storage_transformers") not in (None, []):
        raise _refuse(url, f"array {path} names storage transformers")
    if doc.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        raise _refuse(url, f"array {path} has a chunk key encoding pld does not write")
    inner = check_codecs(doc.get("codecs"), where)
    if doc.get("data_type") != str(dtype):
        raise _refuse(url, f"array {path} stores {doc.get('data_type')!r}, expected {dtype}")
    stored = doc.get("shape")
    grid = doc.get("chunk_grid") or {}
    outer = (grid.get("configuration") or {}).get("chunk_shape") if grid.get("name") == "regular" else None
    want = list(shape)
    if views_axis and isinstance(stored, list) and len(stored) == len(shape) and isinstance(stored[1], int):
        want[1] = stored[1] if shape[1] <= stored[1] <= MAX_VIEWS else shape[1]
    if stored != want:
        raise _refuse(url, f"array {path} has shape {stored}, the metadata implies {list(shape)}")
    layouts = [(list(chunk), None)] + ([(list(obj), list(chunk))] if obj is not None else [])
    if [outer, None if inner is None else list(inner)] not in [list(x) for x in layouts]:
        raise _refuse(url, f"array {path} is chunked {outer} (inner {inner}), the metadata implies {list(chunk)}")
    if math.prod(chunk) * dtype.itemsize > MAX_CHUNK_BYTES:
        raise _refuse(url, f"a chunk of {path} would decode to {math.prod(chunk) * dtype.itemsize} bytes, over "
                           f"pld's limit of {MAX_CHUNK_BYTES}")


def check_arrays(root: zarr.Group, meta: CacheMeta, url: str, at_once: int = 1) -> None:
    """Every array the metadata implies (where it exists) against its expected layout, before any chunk read.
    The documents are fetched ``at_once`` at a time, then checked in order as if read one after another."""
    expected = expected_arrays(meta)
    keys = [f"{path}/zarr.json" for path in expected]
    for key, buf, (path, (dtype, shape, chunk, obj)) in zip(keys, read_objects(root, keys, at_once), expected.items()):
        doc = parse_document(key, buf)
        if doc is not None and not isinstance(doc, dict):
            raise _refuse(url, f"array {path}'s zarr.json is not a JSON object")
        if doc is not None:
            check_array(doc, path, dtype, shape, chunk, obj, url, views_axis=len(shape) > 1 and obj is not None)


def check(root: zarr.Group, meta: CacheMeta, url: str, at_once: int = 1) -> None:
    """The metadata's sizes, then every array's stored metadata (see module doc)."""
    check_meta(meta, url)
    check_arrays(root, meta, url, at_once)


def _zstd_bound(n: int) -> int:
    """Most bytes a zstd frame of ``n`` input bytes takes (ZSTD_COMPRESSBOUND, rounded up), plus the crc32c."""
    return n + (n >> 7) + 1024 + 4


def object_caps(meta: CacheMeta) -> dict[str, int]:
    """Array path -> the most bytes one of its stored objects can hold: what a remote read may fetch."""
    caps = {}
    for path, (dtype, _, chunk, obj) in expected_arrays(meta).items():
        one = _zstd_bound(math.prod(chunk) * dtype.itemsize)
        per_object = 1 if obj is None else math.prod(obj) // max(math.prod(chunk), 1)
        caps[path] = per_object * (one + 16) + 4
    return caps
