"""Reading a cache: whole shard blocks (one contiguous read per array and view), never per-row zarr reads.

A reader trusts only units whose marker exists; anything else is reported as incomplete, never read as data.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import zarr

from . import format as fmt
from .format import CacheError, CacheMeta, SampleStatus, ShardRecord, TeacherRecord
from .store import list_markers, open_root


@dataclass
class ShardBlock:
    """One data shard's cached rows (n = the shard's sample count), for one teacher and temperature."""
    shard: int
    keys: list[str]
    labels: np.ndarray  # [n] int32
    status: np.ndarray  # [n] uint8 (SampleStatus)
    params: np.ndarray  # [n, V, 5] int32
    topk_idx: np.ndarray | None  # [n, V, k]
    topk_logp: np.ndarray | None  # [n, V, k] float32 (stored as float16 deltas from the top-1)
    label_logp: np.ndarray | None  # [n, V] float32
    logz: np.ndarray | None  # [n, V] float32, the requested temperature's column

    def row_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}


def decode_keys(raw: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in raw]


class CacheReader:
    """Read-only view of a cache. Cheap to construct; arrays open lazily (do it inside each worker)."""

    def __init__(self, url: str, cache_dir: str | None = None) -> None:
        self.url = str(url)
        self.cache_dir = cache_dir
        self.root = open_root(self.url, mode="r", cache_dir=cache_dir)
        if fmt.ROOT_ATTR not in self.root.attrs:
            raise CacheError(f"{self.url} is a zarr group but not a pld cache (no '{fmt.ROOT_ATTR}' attribute).")
        self.meta = CacheMeta.from_dict(self.root.attrs[fmt.ROOT_ATTR])
        self.refresh()

    def refresh(self) -> None:
        """Re-list unit markers (what is complete)."""
        self.samples_done: set[int] = set()
        self.views_done: dict[int, set[int]] = defaultdict(set)
        self.teacher_done: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.markers = list_markers(self.root)
        for name in self.markers:
            unit = fmt.parse_unit_name(name)
            if unit is None:
                continue
            if unit.kind == "samples":
                self.samples_done.add(unit.shard)
            elif unit.kind == "views":
                self.views_done[unit.shard].update(range(*unit.views))
            else:
                self.teacher_done[(unit.shard, unit.teacher)].update(range(*unit.views))

    def __getstate__(self) -> dict:
        # DataLoader workers re-open the store themselves (zarr handles do not survive fork/pickle well).
        return {"url": self.url, "cache_dir": self.cache_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state.get("cache_dir"))

    # -- what the cache holds ----------------------------------------------------------------------
    @property
    def shards(self) -> list[ShardRecord]:
        return self.meta.shards

    def teacher(self, tid: str | None = None) -> TeacherRecord:
        if not self.meta.teachers:
            raise CacheError(f"{self.url} holds no teacher yet; run `pld cache-teacher` into it.")
        if tid is None:
            if len(self.meta.teachers) > 1:
                raise CacheError(f"{self.url} holds several teachers ({', '.join(self.meta.teachers)}); "
                                 "pick one with --teacher.")
            return next(iter(self.meta.teachers.values()))
        if tid not in self.meta.teachers:
            raise CacheError(f"Teacher '{tid}' is not in {self.url}; it holds: {', '.join(self.meta.teachers)}.")
        return self.meta.teachers[tid]

    def temperature_column(self, teacher: TeacherRecord, temperature: float) -> int:
        for i, t in enumerate(teacher.temperatures):
            if abs(t - temperature) < 1e-9:
                return i
        grid = ", ".join(f"{t:g}" for t in teacher.temperatures)
        raise CacheError(f"Temperature {temperature:g} is not in teacher '{teacher.id}''s cached grid ({grid}); "
                         f"use one of those, or re-cache with --temperatures including {temperature:g}.")

    def missing_units(self, teacher: str | None, shards: Iterable[int] | None = None,
                      num_views: int | None = None) -> list[str]:
        """Names of the units a reader needs but that are not complete."""
        v_all = set(range(self.meta.num_views if num_views is None else num_views))
        missing = []
        for s in (range(len(self.meta.shards)) if shards is None else shards):
            if s not in self.samples_done:
                missing.append(fmt.samples_unit(s))
            if v_all - self.views_done.get(s, set()):
                missing.append(f"s{s:06d}.views (views {sorted(v_all - self.views_done.get(s, set()))[:5]}...)")
            if teacher is not None and v_all - self.teacher_done.get((s, teacher), set()):
                missing.append(f"s{s:06d}.teacher.{teacher}")
        return missing

    def require_complete(self, teacher: str | None, shards: Iterable[int] | None = None) -> None:
        missing = self.missing_units(teacher, shards)
        if missing:
            raise CacheError(
                f"{self.url} is incomplete: {len(missing)} unit(s) not written, e.g. {', '.join(missing[:3])}. "
                "Rerun the same `pld cache-teacher` command to finish it.")

    def shard_for(self, name: str | None = None, quick_hash: str | None = None) -> int:
        for i, s in enumerate(self.meta.shards):
            if (quick_hash is not None and s.quick_hash == quick_hash) or (quick_hash is None and s.name == name):
                return i
        raise CacheError(f"Shard {name or quick_hash} is not covered by {self.url}; the cache was made from "
                         f"{len(self.meta.shards)} other shards (see `pld inspect`).")

    # -- reads -------------------------------------------------------------------------------------
    def _rows(self, shard: int) -> slice:
        start = shard * self.meta.rows_per_shard
        return slice(start, start + self.meta.shards[shard].nsamples)

    def _read(self, path: str, region: tuple) -> np.ndarray:
        try:
            return np.asarray(self.root[path][region])
        except Exception as e:  # zarr raises deep codec errors (crc32c mismatch, truncated chunk)
            raise CacheError(f"Cannot read {path} rows {region[0].start}:{region[0].stop} of {self.url}: "
                             f"{type(e).__name__}: {e}. Run `pld verify {self.url}`.") from e

    def read_block(self, shard: int, teacher: str | None = None, temperature: float | None = None,
                   views: int | None = None) -> ShardBlock:
        """All cached rows of one data shard: keys, labels, view params and (optionally) one teacher's
        targets at one temperature, for views [0, views)."""
        views = self.meta.num_views if views is None else views
        need = fmt.samples_unit(shard)
        if shard not in self.samples_done or not set(range(views)) <= self.views_done.get(shard, set()):
            raise CacheError(f"Shard {self.meta.shards[shard].name} is not complete in {self.url} (unit {need} or "
                             "its views missing); rerun `pld cache-teacher` to finish it.")
        rows = self._rows(shard)
        keys = decode_keys(self._read(fmt.KEY_ARRAY, (rows,)))
        labels = self._read(fmt.LABEL_ARRAY, (rows,))
        status = self._read(fmt.STATUS_ARRAY, (rows,))
        params = self._read(fmt.PARAMS_ARRAY, (rows, slice(0, views)))
        block = ShardBlock(shard, keys, labels, status, params, None, None, None, None)
        if teacher is not None:
            rec = self.teacher(teacher)
            if not set(range(views)) <= self.teacher_done.get((shard, rec.id), set()):
                raise CacheError(f"Teacher '{rec.id}' is not complete for shard {self.meta.shards[shard].name} "
                                 f"views 0..{views - 1} in {self.url}; rerun `pld cache-teacher` to finish it.")
            col = self.temperature_column(rec, 1.0 if temperature is None else temperature)
            region = (rows, slice(0, views))
            block.topk_idx = self._read(fmt.teacher_array(rec.id, "topk_idx"), region)
            block.topk_logp = fmt.join_logp(self._read(fmt.teacher_array(rec.id, "topk_dlogp"), region),
                                            self._read(fmt.teacher_array(rec.id, "top1_logp"), region))
            block.label_logp = self._read(fmt.teacher_array(rec.id, "label_logp"), region)
            block.logz = self._read(fmt.teacher_array(rec.id, "logz"), region)[..., col]
        return block

    def ok_samples(self, shard: int) -> int:
        """Rows of a shard that hold a usable sample (skipped undecodable samples excluded)."""
        return int((self._read(fmt.STATUS_ARRAY, (self._rows(shard),)) == SampleStatus.OK).sum())

    def key_index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row within shard), built in RAM from one read of the key array per shard."""
        index: dict[str, tuple[int, int]] = {}
        for shard in sorted(self.samples_done):
            keys = decode_keys(self._read(fmt.KEY_ARRAY, (self._rows(shard),)))
            status = self._read(fmt.STATUS_ARRAY, (self._rows(shard),))
            index.update((k, (shard, i)) for i, k in enumerate(keys) if status[i] != SampleStatus.EMPTY)
        return index

    def array(self, path: str) -> zarr.Array:
        return self.root[path]
