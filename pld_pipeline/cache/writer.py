"""Creating, extending and filling a cache, one write unit at a time.

Units line up with data shards: a unit writes whole zarr chunks (rows of one shard x a view range), then its
marker. Two processes never write the same chunk, because they never own the same shard. Arrays and metadata
are created by one process (rank 0) before any unit is written.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..faults import kill_point
from . import format as fmt
from .format import CacheError, CacheMeta, SampleStatus, TeacherRecord
from .integrity import block_sha256, units_under_other_metadata
from .store import cache_exists, delete_marker, list_markers, open_root, read_index, write_index, write_marker


def default_compressors(level: int = 3) -> list:
    """zstd, then crc32c so every stored chunk carries a checksum: both are v3 core codecs."""
    return [ZstdCodec(level=level), Crc32cCodec()]


@dataclass
class TeacherBlock:
    """One teacher's outputs for a unit: n samples x v views."""
    topk_idx: np.ndarray  # [n, v, k] integer
    topk_logp: np.ndarray  # [n, v, k] float
    label_logp: np.ndarray  # [n, v] float
    logz: np.ndarray  # [n, v, T] float
    correct: int  # top-1 hits over the unit's OK rows and views (the teacher's accuracy is free here)
    count: int


def _pad_rows(block: np.ndarray, rows: int, fill: Any) -> np.ndarray:
    out = np.full((rows,) + block.shape[1:], fill, dtype=block.dtype)
    out[: block.shape[0]] = block
    return out


def _versions() -> dict[str, str]:
    import numcodecs
    import torch

    from .. import __version__
    return {"pld_pipeline": __version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "torch": torch.__version__, "numpy": np.__version__}


class CacheWriter:
    """Writes units into an existing cache. Safe to use from several processes on disjoint shards."""

    def __init__(self, url: str) -> None:
        self.url = str(url)
        self.root = open_root(self.url, mode="r+")
        self.meta = CacheMeta.from_dict(self.root.attrs[fmt.ROOT_ATTR])
        self._arrays: dict[str, zarr.Array] = {}

    # -- creation (one process, before any writer) -------------------------------------------------
    @classmethod
    def create_or_extend(cls, url: str, request: CacheMeta, *, overwrite: bool = False,
                         compression_level: int = 3) -> "CacheWriter":
        """Create the cache, or check that an existing one matches ``request`` and extend it with new
        teachers and views. Anything else that differs is refused: the cache would silently mix runs."""
        url = str(url)
        local = url[len("file://"):] if url.startswith("file://") else url
        if "://" not in local and os.path.isdir(local) and os.listdir(local) and not cache_exists(url):
            raise CacheError(f"{url} is a folder with other files in it, not a cache; choose another --out (it is "
                             "never emptied, not even with --overwrite).")
        root = open_root(url, mode="r+") if not overwrite and cache_exists(url) else None
        if root is not None and fmt.ROOT_ATTR not in root.attrs and fmt.CREATING_ATTR not in root.attrs:
            raise CacheError(f"{url} is a zarr group but not a pld cache; choose another --out or pass --overwrite.")
        if root is None or fmt.ROOT_ATTR not in root.attrs:
            # New, or a creation that was killed (CREATING_ATTR, no ROOT_ATTR): nothing in it was ever complete.
            root = open_root(url, mode="w", attributes={fmt.CREATING_ATTR: True})
            kill_point("create.root")
            meta = CacheMeta(**{**request.__dict__, "teachers": {}})
            meta.created_by = _versions()
            _create_sample_arrays(root, meta, compression_level)
            root.create_group(fmt.UNITS_GROUP)
        else:
            meta = CacheMeta.from_dict(root.attrs[fmt.ROOT_ATTR])
            edited = units_under_other_metadata(root, meta, list_markers(root), url)
            if edited:
                raise CacheError(
                    f"The root metadata of {url} no longer matches what {len(edited)} intact unit(s) were written with "
                    f"(e.g. {edited[0]}): its attributes were edited after writing. Restore the original metadata "
                    "(from the cache's owner), or start over with --overwrite.")
            _check_compatible(meta, request, url)
            if request.num_views > meta.num_views:
                _resize_views(root, meta, request.num_views)
                meta.num_views = request.num_views
        for tid, teacher in request.teachers.items():
            if tid in meta.teachers:
                if meta.teachers[tid].identity() != teacher.identity():
                    old, new = meta.teachers[tid].identity(), teacher.identity()
                    diff = sorted(k for k in new if old.get(k) != new.get(k))
                    raise CacheError(
                        f"Teacher '{tid}' already in {url} differs in {', '.join(diff)}; give the new teacher "
                        "another name (--teacher-name) or start over with --overwrite.")
                continue
            _create_teacher_arrays(root, meta, teacher, compression_level)
            meta.teachers[tid] = teacher
        kill_point("create.arrays")
        if root.attrs.get(fmt.ROOT_ATTR) != meta.to_dict():  # unchanged: no write (other workers may be reading)
            root.attrs.put({fmt.ROOT_ATTR: meta.to_dict()})  # one write; replaces CREATING_ATTR on a new cache
        return cls(url)

    # -- what is left to do ------------------------------------------------------------------------
    def done_units(self) -> set[str]:
        return set(list_markers(self.root))

    # -- the unit index (for readers that cannot list) -----------------------------------------------
    def sync_index(self, shards: list[int] | range) -> None:
        """Make these shards' unit indexes list exactly their markers: after a crash between a marker and its
        index update, and for caches written before the index existed."""
        for shard, names in fmt.units_by_shard(list_markers(self.root), shards).items():
            if read_index(self.root, shard) != sorted(names):
                write_index(self.root, shard, list(names))

    def withdraw(self, name: str) -> None:
        """Take a unit back (to rewrite it): out of the index first, then its marker, so no reader is ever
        pointed at a unit without one."""
        shard = fmt.parse_unit_name(name).shard
        write_index(self.root, shard, [n for n in read_index(self.root, shard) or [] if n != name])
        delete_marker(self.root, name)

    # -- unit writes -------------------------------------------------------------------------------
    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self.root[path]
        return self._arrays[path]

    def _rows(self, shard: int) -> slice:
        start = shard * self.meta.rows_per_shard
        return slice(start, start + self.meta.rows_per_shard)

    def _write(self, path: str, shard: int, block: np.ndarray, views: tuple[int, int] | None = None) -> str:
        arr = self._array(path)
        padded = _pad_rows(block.astype(arr.dtype, copy=False), self.meta.rows_per_shard, arr.fill_value)
        region = (self._rows(shard),) if views is None else (self._rows(shard), slice(*views))
        arr[region] = padded
        kill_point("unit.array")
        return block_sha256(padded)

    def _marker(self, name: str, shard: int, checksums: dict[str, str], **extra: Any) -> None:
        write_marker(self.root, name, {
            "binding": fmt.unit_binding(name, self.meta), "shard": shard, "shard_name": self.meta.shards[shard].name,
            "rows": self.meta.shards[shard].nsamples, "checksums": checksums,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            **extra})
        kill_point("unit.marker")  # a marker the index does not list yet: the next run's sync_index adds it
        # One process writes a shard (ranks and --part split by shard), so this read-modify-write does not race.
        write_index(self.root, shard, (read_index(self.root, shard) or []) + [name])

    def write_samples(self, shard: int, keys: list[str], labels: np.ndarray, status: np.ndarray,
                      digests: np.ndarray) -> None:
        """``digests``: uint8 [n, 16], :func:`format.sample_digest` of each sample's encoded bytes."""
        n = self.meta.shards[shard].nsamples
        if len(keys) != n or labels.shape != (n,) or status.shape != (n,) or digests.shape != (n, fmt.DIGEST_BYTES):
            raise CacheError(f"Shard {self.meta.shards[shard].name} has {n} samples in the index but the unit "
                             f"holds {len(keys)}; the shard changed since it was indexed.")
        encoded = np.zeros((n, self.meta.key_bytes), dtype=np.uint8)
        for i, key in enumerate(keys):
            raw = key.encode("utf-8")
            if len(raw) > self.meta.key_bytes:
                raise CacheError(f"Key {key!r} is longer than the cache's key_bytes={self.meta.key_bytes}.")
            encoded[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        sums = {fmt.KEY_ARRAY: self._write(fmt.KEY_ARRAY, shard, encoded),
                fmt.LABEL_ARRAY: self._write(fmt.LABEL_ARRAY, shard, labels),
                fmt.STATUS_ARRAY: self._write(fmt.STATUS_ARRAY, shard, status),
                fmt.DIGEST_ARRAY: self._write(fmt.DIGEST_ARRAY, shard, digests)}
        skipped = int((status == SampleStatus.SKIPPED).sum())
        self._marker(fmt.samples_unit(shard), shard, sums, skipped=skipped)

    def write_views(self, shard: int, views: tuple[int, int], params: np.ndarray) -> None:
        sums = {fmt.PARAMS_ARRAY: self._write(fmt.PARAMS_ARRAY, shard, params, views)}
        self._marker(fmt.views_unit(shard, views), shard, sums, views=list(views))

    def write_teacher(self, shard: int, tid: str, views: tuple[int, int], block: TeacherBlock) -> None:
        dlogp, top1 = fmt.split_logp(block.topk_logp)
        stored = {"topk_idx": block.topk_idx, "topk_dlogp": dlogp, "top1_logp": top1,
                  "label_logp": np.maximum(block.label_logp, fmt.MIN_LOGP), "logz": block.logz}
        sums = {fmt.teacher_array(tid, name): self._write(fmt.teacher_array(tid, name), shard, arr, views)
                for name, arr in stored.items()}
        self._marker(fmt.teacher_unit(shard, tid, views), shard, sums, teacher=tid, views=list(views),
                     correct=int(block.correct), count=int(block.count))


def _create(root: zarr.Group, path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any,
            fill: Any, level: int) -> None:
    root.create_array(path, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                      compressors=default_compressors(level), overwrite=True)


def _create_sample_arrays(root: zarr.Group, meta: CacheMeta, level: int) -> None:
    rows, s = meta.num_rows, meta.rows_per_shard
    _create(root, fmt.KEY_ARRAY, (rows, meta.key_bytes), (s, meta.key_bytes), "uint8", 0, level)
    _create(root, fmt.LABEL_ARRAY, (rows,), (s,), "int32", -1, level)
    _create(root, fmt.STATUS_ARRAY, (rows,), (s,), "uint8", SampleStatus.EMPTY, level)
    _create(root, fmt.DIGEST_ARRAY, (rows, fmt.DIGEST_BYTES), (s, fmt.DIGEST_BYTES), "uint8", 0, level)
    width = meta.params_width
    _create(root, fmt.PARAMS_ARRAY, (rows, meta.num_views, width), (s, 1, width), "int32", 0, level)


def _create_teacher_arrays(root: zarr.Group, meta: CacheMeta, t: TeacherRecord, level: int) -> None:
    rows, s, v = meta.num_rows, meta.rows_per_shard, meta.num_views
    _create(root, fmt.teacher_array(t.id, "topk_idx"), (rows, v, t.k), (s, 1, t.k), t.index_dtype, -1, level)
    _create(root, fmt.teacher_array(t.id, "topk_dlogp"), (rows, v, t.k), (s, 1, t.k), "float16", np.nan, level)
    _create(root, fmt.teacher_array(t.id, "top1_logp"), (rows, v), (s, 1), "float32", np.nan, level)
    _create(root, fmt.teacher_array(t.id, "label_logp"), (rows, v), (s, 1), "float32", np.nan, level)
    n_t = len(t.temperatures)
    _create(root, fmt.teacher_array(t.id, "logz"), (rows, v, n_t), (s, 1, n_t), "float32", np.nan, level)


def _resize_views(root: zarr.Group, meta: CacheMeta, num_views: int) -> None:
    """Grow the view axis; growing only rewrites array metadata, never existing chunks."""
    paths = [fmt.PARAMS_ARRAY] + [fmt.teacher_array(tid, n) for tid in meta.teachers for n in fmt.TEACHER_ARRAYS]
    for path in paths:
        arr = root[path]
        arr.resize((arr.shape[0], num_views) + arr.shape[2:])


def _check_compatible(meta: CacheMeta, request: CacheMeta, url: str) -> None:
    def refuse(what: str, have: Any, want: Any) -> None:
        raise CacheError(
            f"{url} was made with a different {what} ({have!r}, now {want!r}); a cache holds one dataset and "
            "one view recipe. Use another --out, or --overwrite to start over.")

    if meta.num_classes != request.num_classes:
        refuse("num_classes", meta.num_classes, request.num_classes)
    have = [(s.name, s.sha256) for s in meta.shards]
    want = [(s.name, s.sha256) for s in request.shards]
    if have != want:
        changed = [w[0] for h, w in zip(have, want) if h != w] or ["shard list length"]
        refuse("dataset (shards: " + ", ".join(changed[:3]) + ")", len(have), len(want))
    if meta.recipe != request.recipe:
        refuse("view recipe", meta.recipe, request.recipe)
    if meta.seed != request.seed:
        refuse("view seed", meta.seed, request.seed)
