"""Reading a cache: whole shard blocks (one contiguous read per array and unit), never per-row zarr reads.

A reader trusts only units whose marker exists, and reads each of them through integrity.read_unit (checksums
and metadata binding); anything else is reported as incomplete or damaged, never read as data.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import zarr

from . import format as fmt
from . import key_index
from .format import CacheError, CacheMeta, SampleStatus, ShardRecord, TeacherRecord
from .integrity import read_unit
from .store import find_markers, open_root


@dataclass
class ShardBlock:
    """One data shard's cached rows (n = the shard's sample count), for one teacher and temperature."""
    shard: int
    keys: list[str]
    labels: np.ndarray  # [n] int32
    status: np.ndarray  # [n] uint8 (SampleStatus)
    digests: np.ndarray  # [n, 16] uint8, format.sample_digest of each sample
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
        if fmt.ROOT_ATTR not in self.root.attrs and fmt.CREATING_ATTR in self.root.attrs:
            raise CacheError(f"{self.url} was still being created when its writer stopped; rerun the same "
                             "`pld cache-teacher` command to finish it.")
        if fmt.ROOT_ATTR not in self.root.attrs:
            raise CacheError(f"{self.url} is a zarr group but not a pld cache (no '{fmt.ROOT_ATTR}' attribute).")
        self.meta = CacheMeta.from_dict(self.root.attrs[fmt.ROOT_ATTR])
        self.refresh()

    def refresh(self) -> None:
        """Re-read which units are complete: their markers, listed, or from the unit index over http(s)."""
        self.samples_done: set[int] = set()
        self.views_done: dict[int, set[int]] = defaultdict(set)
        self.teacher_done: dict[tuple[int, str], set[int]] = defaultdict(set)
        #: (shard, kind, teacher) -> [(views, unit name)]: which units hold what
        self.units: dict[tuple[int, str, str | None], list[tuple[tuple[int, int] | None, str]]] = defaultdict(list)
        self.markers = find_markers(self.root, self.url, len(self.meta.shards))
        for name in self.markers:
            unit = fmt.parse_unit_name(name)
            if unit is None or unit.shard >= len(self.meta.shards):
                continue
            self.units[(unit.shard, unit.kind, unit.teacher)].append((unit.views, name))
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
                      num_views: int | None = None, data: bool = True) -> list[str]:
        """What a reader needs but is not complete, as unit names (views: the missing views listed). ``data``:
        include the shards' samples and views units, not only ``teacher``'s."""
        v_all = set(range(self.meta.num_views if num_views is None else num_views))
        missing = []
        for s in (range(len(self.meta.shards)) if shards is None else shards):
            if data and s not in self.samples_done:
                missing.append(fmt.samples_unit(s))
            if data and v_all - self.views_done.get(s, set()):
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

    # -- reads ----------------------------------------------------------------------------------------
    def _rows(self, shard: int) -> slice:
        start = shard * self.meta.rows_per_shard
        return slice(start, start + self.meta.shards[shard].nsamples)

    def read_unit(self, name: str) -> dict[str, np.ndarray]:
        """One unit's arrays over its region, checked against its marker (raises integrity.DamagedUnit)."""
        return read_unit(self.root, self.meta, name, self.url)

    def _gather(self, shard: int, kind: str, teacher: str | None, views: int) -> dict[str, np.ndarray]:
        """Views [0, views) of a shard's view-indexed arrays, assembled from the (checked) units that hold them."""
        n = self.meta.shards[shard].nsamples
        out: dict[str, np.ndarray] = {}
        for (a, b), name in sorted(self.units[(shard, kind, teacher)]):
            if a >= views:
                continue
            stop = min(b, views)
            for path, arr in self.read_unit(name).items():
                if path not in out:
                    out[path] = np.empty((n, views) + arr.shape[2:], arr.dtype)
                out[path][:, a:stop] = arr[:n, : stop - a]
        return out

    def samples(self, shard: int) -> dict[str, np.ndarray]:
        """The shard's checked samples unit, cut to its sample count: path -> array."""
        if shard not in self.samples_done:
            raise CacheError(f"Shard {self.meta.shards[shard].name} has no samples unit in {self.url}; rerun "
                             "`pld cache-teacher` to finish it.")
        n = self.meta.shards[shard].nsamples
        return {path: arr[:n] for path, arr in self.read_unit(fmt.samples_unit(shard)).items()}

    def read_block(self, shard: int, teacher: str | None = None, temperature: float | None = None,
                   views: int | None = None) -> ShardBlock:
        """All cached rows of one data shard: keys, labels, sample digests, view params and (optionally) one
        teacher's targets at one temperature, for views [0, views). Every unit read is checked first."""
        views = self.meta.num_views if views is None else views
        if not set(range(views)) <= self.views_done.get(shard, set()):
            raise CacheError(f"Shard {self.meta.shards[shard].name} is not complete in {self.url} (its views "
                             "are missing); rerun `pld cache-teacher` to finish it.")
        samples = self.samples(shard)
        params = self._gather(shard, "views", None, views)[fmt.PARAMS_ARRAY]
        block = ShardBlock(shard, decode_keys(samples[fmt.KEY_ARRAY]), samples[fmt.LABEL_ARRAY],
                           samples[fmt.STATUS_ARRAY], samples[fmt.DIGEST_ARRAY], params, None, None, None, None)
        if teacher is not None:
            rec = self.teacher(teacher)
            if not set(range(views)) <= self.teacher_done.get((shard, rec.id), set()):
                raise CacheError(f"Teacher '{rec.id}' is not complete for shard {self.meta.shards[shard].name} "
                                 f"views 0..{views - 1} in {self.url}; rerun `pld cache-teacher` to finish it.")
            col = self.temperature_column(rec, 1.0 if temperature is None else temperature)
            arrays = self._gather(shard, "teacher", rec.id, views)
            get = lambda name: arrays[fmt.teacher_array(rec.id, name)]  # noqa: E731
            block.topk_idx = get("topk_idx")
            block.topk_logp = fmt.join_logp(get("topk_dlogp"), get("top1_logp"))
            block.label_logp = get("label_logp")
            block.logz = get("logz")[..., col]
        return block

    def ok_samples(self, shard: int) -> int:
        """Rows of a shard that hold a usable sample (skipped undecodable samples excluded)."""
        return int((self.samples(shard)[fmt.STATUS_ARRAY] == SampleStatus.OK).sum())

    def key_index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row within shard), built in RAM from one checked read of each samples unit."""
        index: dict[str, tuple[int, int]] = {}
        for shard in sorted(self.samples_done):
            samples = self.samples(shard)
            keys, status = decode_keys(samples[fmt.KEY_ARRAY]), samples[fmt.STATUS_ARRAY]
            index.update((k, (shard, i)) for i, k in enumerate(keys) if status[i] != SampleStatus.EMPTY)
        return index

    def find(self, key: str) -> tuple[int, int] | None:
        """(shard, row within shard) of ``key``, None if the cache has no such sample. Two chunk reads through
        the stored key index when it covers the cache (cache/key_index.py), else one read of each samples unit;
        either way the answer is confirmed against the shard's checked samples unit."""
        try:
            row = key_index.lookup(self.root, self.meta, key, self.url)
        except LookupError:
            return self.key_index().get(key)
        if row is None:
            return None
        shard, i = divmod(row, self.meta.rows_per_shard)
        samples = self.samples(shard) if shard < len(self.meta.shards) else None
        if samples is None or i >= len(samples[fmt.KEY_ARRAY]) or decode_keys(samples[fmt.KEY_ARRAY][i:i + 1])[0] != key:
            raise key_index.DamagedIndex(f"{self.url}: the key index points {key!r} at a row that holds another "
                                         "sample; rerun `pld cache-teacher` to rebuild it.")
        return shard, i

    def array(self, path: str) -> zarr.Array:
        """A raw zarr array, unchecked: for inspection and tests; training reads go through read_block."""
        return self.root[path]
