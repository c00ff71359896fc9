"""One open cache: its metadata, its progress (the set of complete units), unit writes and checked reads.

Every user of a cache goes through a :class:`Cache` opened once per process: cache-teacher creates or extends
it and writes units, the student data path reads shard blocks, verify and inspect check units and read the
indexes. The arrays' layout comes from schema.py, the raw objects (markers, unit index) from store.py.

Writes: a unit writes whole chunks (one shard's rows x its views), then its marker, then its shard's unit
index entry. Two processes never write one shard's units at once (ranks, ``--part`` and claims split shards).
Reads: a reader trusts only units whose marker exists and reads each through integrity.read_unit (checksums
and metadata binding); anything else is reported as incomplete or damaged, never read as data.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import zarr
from zarr.core.sync import sync

from ..faults import kill_point
from . import bounds, values
from . import digest
from . import format as fmt
from . import key_index
from . import schema
from .format import CacheError, CacheMeta, SampleStatus, ShardRecord, TeacherRecord, UnitName
from .integrity import DamagedUnit, UnitReads, block_sha256, units_under_other_metadata
from .target import check_empty, check_replaceable, refuse_symlinks
from ..views import first_labels
from .store import (
    cache_exists, delete_marker, delete_object, find_markers, get_marker, limit_objects, list_markers, open_root,
    read_index, read_indexes, read_marker, write_index, write_marker,
)


@dataclass
class TeacherBlock:
    """One teacher's outputs for a unit: n samples x v views."""
    topk_idx: np.ndarray  # [n, v, k] integer
    topk_logp: np.ndarray  # [n, v, k] float
    label_logp: np.ndarray  # [n, v] float
    logz: np.ndarray  # [n, v, T] float
    correct: int  # top-1 hits over the unit's OK rows and views (the teacher's accuracy is free here)
    count: int


@dataclass
class ShardBlock:
    """One data shard's cached rows (n = the shard's sample count), for one teacher and temperature."""
    shard: int
    keys: list[str]
    labels: np.ndarray  # [n] int32
    status: np.ndarray  # [n] uint8 (SampleStatus)
    digests: np.ndarray  # [n, 16] uint8, format.sample_digest of each sample
    params: np.ndarray  # [n, V, W] int32
    topk_idx: np.ndarray | None  # [n, V, k]
    topk_logp: np.ndarray | None  # [n, V, k] float32 (stored as float16 deltas from the top-1)
    label_logp: np.ndarray | None  # [n, V] float32
    logz: np.ndarray | None  # [n, V] float32, the requested temperature's column


def _versions() -> dict[str, str]:
    import numcodecs
    import torch

    from .. import __version__
    return {"pld_pipeline": __version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "torch": torch.__version__, "numpy": np.__version__}


class Cache:
    """An open cache. ``mode='r'`` never modifies it (shared caches are read-only to readers); ``'r+'`` writes
    units. ``cache_dir`` keeps a local copy of what a remote read-only cache serves. Cheap to pickle: DataLoader
    workers re-open the store themselves."""

    def __init__(self, url: str, mode: str = "r", cache_dir: str | None = None, *, root: zarr.Group | None = None,
                 expect_digest: str | None = None, pinned: dict[str, Any] | None = None) -> None:
        """``expect_digest``: refuse the cache unless its digest is this (cache/digest.py). ``pinned``: another
        process's :meth:`pins` for the same digest (a DataLoader worker's), so its markers are not read again."""
        self.url, self.mode, self.cache_dir = str(url), mode, cache_dir
        #: the pinned digest (``expect_digest``), and the unit markers it was checked over: every later read of a
        #: unit is checked against these, not against markers read again (a host cannot swap them after the check)
        self.expected_digest = None if expect_digest is None else digest.parse(expect_digest)
        self._pinned: dict[str, dict[str, Any]] | None = None
        self.root = open_root(self.url, mode=mode, cache_dir=cache_dir) if root is None else root
        if fmt.ROOT_ATTR not in self.root.attrs and fmt.CREATING_ATTR in self.root.attrs:
            raise CacheError(f"{self.url} was still being created when its writer stopped; rerun the same "
                             "`pld cache-teacher` command to finish it.")
        if fmt.ROOT_ATTR not in self.root.attrs:
            raise CacheError(f"{self.url} is a zarr group but not a pld cache (no '{fmt.ROOT_ATTR}' attribute).")
        self.meta = parse_meta(self.root.attrs[fmt.ROOT_ATTR], self.url)
        bounds.check(self.root, self.meta, self.url, self._reads_at_once())  # sizes, array metadata: before any chunk
        if mode != "r":
            refuse_symlinks(self.url)
        limit_objects(self.root, bounds.object_caps(self.meta))
        self._arrays: dict[str, zarr.Array] = {}
        self.refresh()
        if self.expected_digest is not None:
            self._pin(self.expected_digest, pinned)

    def __getstate__(self) -> dict:
        return {"url": self.url, "mode": self.mode, "cache_dir": self.cache_dir, "expect_digest": self.expected_digest,
                "pinned": self.pins()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state.get("mode", "r"), state.get("cache_dir"),
                      expect_digest=state.get("expect_digest"), pinned=state.get("pinned"))

    # -- authenticity: the digest consumers pin (cache/digest.py) -------------------------------------
    def marker_names(self) -> list[str]:
        """Every marker this reader found (complete units and strays), sorted: what the digest covers."""
        return sorted({u.name for u in self.done} | set(self.strays))

    def digest(self) -> str:
        """``sha256:HEX`` over the root metadata, every array's metadata, the key index and every unit marker
        (docs/cache-format.md, "Cache digest"): equal digests mean equal caches for every reader."""
        return digest.of(digest.documents(self.root, self.meta, self.marker_names(), self._reads_at_once()))

    def _reads_at_once(self) -> int:
        """Concurrent metadata reads: many on stores, one through --cache-dir (fsspec's file cache keeps its
        bookkeeping unsynchronised)."""
        return 1 if self.cache_dir else 64

    def pins(self) -> dict[str, Any] | None:
        """What a pinned cache was checked against (digest, root metadata, markers), for worker processes."""
        if self._pinned is None:
            return None
        return {"digest": self.expected_digest, "meta": self.meta.to_dict(), "markers": self._pinned}

    def _pin(self, expected: str, pinned: dict[str, Any] | None = None) -> None:
        """Refuse the cache unless its digest is ``expected``; then read units only against the markers hashed.
        With ``pinned`` (checked by another process), only the root metadata is compared again."""
        if pinned is not None and pinned.get("digest") == expected:
            if pinned.get("meta") != self.meta.to_dict():
                raise CacheError(f"{self.url} changed after its digest was checked (its root metadata differs); "
                                 "nothing more is read from it. Check it again with `pld verify --expect-digest`.")
            self._pinned = pinned["markers"]
            return
        names = self.marker_names()
        docs = digest.documents(self.root, self.meta, names, self._reads_at_once())
        digest.require(expected, digest.of(docs), self.url)
        hashed = digest.attributes(docs["zarr.json"]).get(fmt.ROOT_ATTR)
        if not isinstance(hashed, dict) or parse_meta(hashed, self.url).to_dict() != self.meta.to_dict():
            raise CacheError(f"{self.url} changed while it was being opened (its root metadata differs between two "
                             "reads); open it again once nothing writes to it.")
        self._pinned = {name: digest.attributes(docs[f"units/{name}/zarr.json"]) for name in names}

    @staticmethod
    def meta_at(url: str) -> CacheMeta | None:
        """The metadata of a complete cache at ``url``, None where there is none (or it is being created)."""
        if not cache_exists(url):
            return None
        try:
            return Cache(url).meta
        except CacheError:
            return None

    # -- creation (one process, before any unit is written) -------------------------------------------
    @classmethod
    def create_or_extend(cls, url: str, request: CacheMeta, *, overwrite: bool = False,
                         compression_level: int = 3) -> "Cache":
        """Create the cache, or check that an existing one matches ``request`` and extend it with new
        teachers and views. Anything else that differs is refused: the cache would silently mix runs."""
        url = str(url)
        refuse_symlinks(url)
        exists = cache_exists(url)
        if overwrite:
            check_replaceable(url)  # a pld cache and nothing else, whatever the URL scheme
        elif not exists:
            check_empty(url)
        root = open_root(url, mode="r+") if not overwrite and exists else None
        if root is not None and fmt.ROOT_ATTR not in root.attrs and fmt.CREATING_ATTR not in root.attrs:
            raise CacheError(f"{url} is a zarr group but not a pld cache; choose another --out (pld never deletes "
                             "it, not even with --overwrite).")
        if root is None or fmt.ROOT_ATTR not in root.attrs:
            if root is not None:
                check_replaceable(url)  # a killed creation: restarted only if it holds nothing but pld's
            # New, or a creation that was killed (CREATING_ATTR, no ROOT_ATTR): nothing in it was ever complete.
            root = open_root(url, mode="w", attributes={fmt.CREATING_ATTR: True})
            kill_point("create.root")
            meta = CacheMeta(**{**request.__dict__, "teachers": {}})
            meta.created_by = _versions()
            schema.create(root, "samples", meta, level=compression_level)
            schema.create(root, "views", meta, level=compression_level)
            root.create_group(fmt.UNITS_GROUP)
        else:
            meta = parse_meta(root.attrs[fmt.ROOT_ATTR], url)
            bounds.check(root, meta, url)
            edited = units_under_other_metadata(root, meta, list_markers(root), url)
            if edited:
                raise CacheError(
                    f"The root metadata of {url} no longer matches what {len(edited)} intact unit(s) were written with "
                    f"(e.g. {edited[0]}): its attributes were edited after writing. Restore the original metadata "
                    "(from the cache's owner), or start over with --overwrite.")
            _check_compatible(meta, request, url)
            if request.num_views > meta.num_views:
                for path in schema.per_view_paths(meta):  # metadata only: no stored object is rewritten
                    arr = root[path]
                    arr.resize((arr.shape[0], request.num_views) + arr.shape[2:])
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
            schema.create(root, "teacher", meta, teacher, level=compression_level)
            meta.teachers[tid] = teacher
        kill_point("create.arrays")
        if root.attrs.get(fmt.ROOT_ATTR) != meta.to_dict():  # unchanged: no write (other workers may be reading)
            root.attrs.put({fmt.ROOT_ATTR: meta.to_dict()})  # one write; replaces CREATING_ATTR on a new cache
        return cls(url, mode="r+", root=root)

    # -- progress: which units are complete ----------------------------------------------------------
    def refresh(self) -> None:
        """Re-read which units are complete: their markers, listed, or from the unit index over http(s)."""
        #: complete units by shard (the progress every lookup below reads, one shard at a time); ``strays``:
        #: marker names that are no unit of this cache (verify reports them)
        self._by_shard: dict[int, set[UnitName]] = {}
        self.strays: list[str] = []
        for name in find_markers(self.root, self.url, len(self.meta.shards), self._reads_at_once()):
            unit = fmt.parse_unit_name(name)
            if unit is None or unit.shard >= len(self.meta.shards) or not _views_within(unit, self.meta.num_views):
                self.strays.append(name)
            else:
                self._by_shard.setdefault(unit.shard, set()).add(unit)

    @property
    def done(self) -> set[UnitName]:
        """Every complete unit."""
        return set().union(*self._by_shard.values())

    def units(self, shard: int | None = None, kind: str | None = None, teacher: str | None = None) -> list[UnitName]:
        """Complete units, filtered, in a fixed order (shard, kind, teacher, views)."""
        pool = self.done if shard is None else self._by_shard.get(shard, ())
        return sorted((u for u in pool if (kind is None or u.kind == kind) and (teacher is None or u.teacher == teacher)),
                      key=lambda u: (u.shard, u.kind, u.teacher or "", u.views or (0, 0)))

    def has_samples(self, shard: int) -> bool:
        """Whether the shard's samples unit is complete."""
        return UnitName(shard, "samples") in self._by_shard.get(shard, ())

    @property
    def samples_done(self) -> set[int]:
        return {s for s in self._by_shard if self.has_samples(s)}

    def views_done(self, shard: int, teacher: str | None = None) -> set[int]:
        """Views of a shard whose params (``teacher=None``) or whose teacher's targets are complete."""
        kind = "views" if teacher is None else "teacher"
        return {v for u in self._by_shard.get(shard, ()) if u.kind == kind and u.teacher == teacher
                for v in range(*u.views)}

    def complete(self, shard: int, teacher: str | None = None, num_views: int | None = None) -> bool:
        """Whether the shard's samples and views [0, num_views) (and ``teacher``'s targets) are all complete."""
        views = set(range(self.meta.num_views if num_views is None else num_views))
        return (self.has_samples(shard) and views <= self.views_done(shard)
                and (teacher is None or views <= self.views_done(shard, teacher)))

    def missing_units(self, teacher: str | None, shards: Iterable[int] | None = None,
                      num_views: int | None = None, data: bool = True) -> list[str]:
        """What a reader needs but is not complete, for messages (views: the first missing ones listed).
        ``data``: include the shards' samples and views units, not only ``teacher``'s."""
        v_all = set(range(self.meta.num_views if num_views is None else num_views))
        missing = []
        for s in (range(len(self.meta.shards)) if shards is None else shards):
            if data and not self.has_samples(s):
                missing.append(fmt.samples_unit(s))
            if data and v_all - self.views_done(s):
                missing.append(f"s{s:06d}.views (views {sorted(v_all - self.views_done(s))[:5]}...)")
            if teacher is not None and v_all - self.views_done(s, teacher):
                missing.append(f"s{s:06d}.teacher.{teacher}")
        return missing

    def require_complete(self, teacher: str | None, shards: Iterable[int] | None = None) -> None:
        missing = self.missing_units(teacher, shards)
        if missing:
            raise CacheError(
                f"{self.url} is incomplete: {len(missing)} unit(s) not written, e.g. {', '.join(missing[:3])}. "
                "Rerun the same `pld cache-teacher` command to finish it.")

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

    def shard_for(self, name: str | None = None, quick_hash: str | None = None) -> int:
        for i, s in enumerate(self.meta.shards):
            if (quick_hash is not None and s.quick_hash == quick_hash) or (quick_hash is None and s.name == name):
                return i
        raise CacheError(f"Shard {name or quick_hash} is not covered by {self.url}; the cache was made from "
                         f"{len(self.meta.shards)} other shards (see `pld inspect`).")

    def marker(self, unit: UnitName | str) -> dict[str, Any]:
        """A unit's marker attributes (raises CacheError when it is missing); the pinned one under a digest."""
        name = unit if isinstance(unit, str) else unit.name
        if self._pinned is not None:
            if name not in self._pinned:
                raise CacheError(f"Unit marker {name} is not in the cache whose digest was checked.")
            return self._pinned[name]
        return read_marker(self.root, name)

    def markers(self, units: Iterable[UnitName | str]) -> list[Any]:
        """:meth:`marker` of many units, in their order, read concurrently: each one's attributes, or the
        CacheError :meth:`marker` would raise for it (pass the list to :func:`first_error` to raise the first)."""
        names = [u if isinstance(u, str) else u.name for u in units]

        async def one(name: str) -> dict[str, Any]:
            return self.marker(name) if self._pinned is not None else await get_marker(self.root, name)

        return sync(_gather_all([one(name) for name in names], self._reads_at_once()))

    def unit_index(self, shard: int) -> list[str] | None:
        """The shard's stored unit index (what hosts that cannot list see), None where there is none."""
        return read_index(self.root, shard)

    def unit_indexes(self, shards: Iterable[int]) -> list[list[str] | None]:
        """:meth:`unit_index` of many shards, in their order, read concurrently."""
        return read_indexes(self.root, shards, self._reads_at_once())

    # -- checked reads --------------------------------------------------------------------------------
    def read_unit(self, unit: UnitName | str) -> dict[str, np.ndarray]:
        """One unit's arrays over its region, checked against its marker (raises integrity.DamagedUnit)."""
        return first_error(self.read_units([unit]))[0]

    def read_units(self, units: Iterable[UnitName | str],
                   keep: Callable[[str, dict[str, np.ndarray]], Any] | None = None) -> list[Any]:
        """:meth:`read_unit` of many units at once (their markers and arrays in a few round trips, not ~9 per
        unit), in their order: each unit's checked arrays, passed through ``keep(name, arrays)`` as it arrives (to
        hold less), or the exception its read or ``keep`` raised (a :class:`DamagedUnit` for damage)."""
        reads = UnitReads(self.root, self._reads_at_once())
        names = [u if isinstance(u, str) else u.name for u in units]

        async def one(name: str) -> Any:
            if self._pinned is not None and name not in self._pinned:  # a unit the host added after the check
                raise CacheError(f"Unit marker {name} is not in the cache whose digest was checked.")
            record = None if self._pinned is None else self._pinned[name]
            arrays = await reads.unit(self.meta, name, self.url, record)
            return arrays if keep is None else keep(name, arrays)

        return sync(_gather_all([one(name) for name in names]))

    def _gather(self, shard: int, kind: str, teacher: str | None, views: int) -> dict[str, np.ndarray]:
        """Views [0, views) of a shard's view-indexed arrays, assembled from the (checked) units that hold them."""
        n = self.meta.shards[shard].nsamples
        out: dict[str, np.ndarray] = {}
        units = [unit for unit in self.units(shard, kind, teacher) if unit.views[0] < views]
        for unit, arrays in zip(units, first_error(self.read_units(units))):
            a, b = unit.views
            stop = min(b, views)
            for path, arr in arrays.items():
                if path not in out:
                    out[path] = np.empty((n, views) + arr.shape[2:], arr.dtype)
                out[path][:, a:stop] = arr[:n, : stop - a]
        return out

    def samples(self, shard: int) -> dict[str, np.ndarray]:
        """The shard's checked samples unit, cut to its sample count: path -> array."""
        return self.samples_of([shard])[shard]

    def samples_of(self, shards: Iterable[int], keep: Callable[[dict[str, np.ndarray]], Any] | None = None
                   ) -> dict[int, Any]:
        """:meth:`samples` of many shards, read at once; ``keep(arrays)`` is applied to each shard's as it arrives
        (so a start-up over thousands of shards holds only what it keeps). Raises what :meth:`samples` of the
        first failing shard (in the given order) raises."""
        shards = list(dict.fromkeys(shards))

        def cut(name: str, arrays: dict[str, np.ndarray]) -> Any:
            n = self.meta.shards[fmt.parse_unit_name(name).shard].nsamples
            problems = values.sample_problems(arrays[schema.STATUS.path()], arrays[schema.LABEL.path()],
                                              arrays[schema.KEY.path()], n, self.meta.num_classes)
            if problems:  # what no honest writer stores, whatever its checksums say
                raise DamagedUnit(self.url, name, f"it holds {problems[0]}")
            arrays = {path: arr[:n] for path, arr in arrays.items()}
            return arrays if keep is None else keep(arrays)

        present = [shard for shard in shards if self.has_samples(shard)]
        got = dict(zip(present, self.read_units([UnitName(shard, "samples") for shard in present], cut)))
        for shard in shards:
            if shard not in got:
                got[shard] = CacheError(f"Shard {self.meta.shards[shard].name} has no samples unit in {self.url}; "
                                        "rerun `pld cache-teacher` to finish it.")
        return dict(zip(shards, first_error([got[shard] for shard in shards])))

    def read(self, shard: int, teacher: str | None = None, temperature: float | None = None,
             views: int | None = None) -> ShardBlock:
        """All cached rows of one data shard: keys, labels, sample digests, view params and (optionally) one
        teacher's targets at one temperature, for views [0, views). Every unit read is checked first."""
        views = self.meta.num_views if views is None else views
        if not set(range(views)) <= self.views_done(shard):
            raise CacheError(f"Shard {self.meta.shards[shard].name} is not complete in {self.url} (its views "
                             "are missing); rerun `pld cache-teacher` to finish it.")
        samples = self.samples(shard)
        params = self._gather(shard, "views", None, views)[schema.PARAMS.path()]
        block = ShardBlock(shard, schema.decode_keys(samples[schema.KEY.path()]), samples[schema.LABEL.path()],
                           samples[schema.STATUS.path()], samples[schema.DIGEST.path()], params,
                           None, None, None, None)
        if teacher is not None:
            rec = self.teacher(teacher)
            if not set(range(views)) <= self.views_done(shard, rec.id):
                raise CacheError(f"Teacher '{rec.id}' is not complete for shard {self.meta.shards[shard].name} "
                                 f"views 0..{views - 1} in {self.url}; rerun `pld cache-teacher` to finish it.")
            col = self.temperature_column(rec, 1.0 if temperature is None else temperature)
            decoded = schema.decode_teacher(self._gather(shard, "teacher", rec.id, views), rec.id)
            labels = first_labels(params, block.labels)  # what each view ranks first (label_logp's class)
            found = values.first_problem(decoded["topk_idx"], decoded["topk_logp"], decoded["label_logp"],
                                         decoded["logz"], block.status == SampleStatus.OK, self.meta.num_classes,
                                         rec.temperatures, labels)
            if found is not None:  # what no honest writer stores, whatever its checksums say
                unit = next(u.name for u in self.units(shard, "teacher", rec.id) if u.views[0] <= found[1] < u.views[1])
                raise DamagedUnit(self.url, unit, f"it holds {found[0]} (view {found[1]})")
            block.topk_idx, block.topk_logp = decoded["topk_idx"], decoded["topk_logp"]
            block.label_logp, block.logz = decoded["label_logp"], decoded["logz"][..., col]
        return block

    def ok_samples(self, shard: int) -> int:
        """Rows of a shard that hold a usable sample (skipped undecodable samples excluded)."""
        return int((self.samples(shard)[schema.STATUS.path()] == SampleStatus.OK).sum())

    # -- one key ------------------------------------------------------------------------------------
    def key_index(self) -> dict[str, tuple[int, int]]:
        """key -> (shard, row within shard), built in RAM from one checked read of each samples unit."""
        index: dict[str, tuple[int, int]] = {}
        for shard, samples in self.samples_of(sorted(self.samples_done)).items():
            keys, status = schema.decode_keys(samples[schema.KEY.path()]), samples[schema.STATUS.path()]
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
        keys = samples[schema.KEY.path()] if samples is not None else []
        if i >= len(keys) or schema.decode_keys(keys[i:i + 1])[0] != key:
            raise key_index.DamagedIndex(f"{self.url}: the key index points {key!r} at a row that holds another "
                                         "sample; rerun `pld cache-teacher` to rebuild it.")
        return shard, i

    def key_index_state(self) -> str:
        """``current``, ``stale`` (made for other shards; not used) or ``absent``."""
        return key_index.state(self.root, self.meta)

    def check_key_index(self, samples: dict[int, dict[str, np.ndarray]]) -> list[str]:
        """verify's findings about the stored key index, given the intact shards' samples arrays."""
        return key_index.check(self.root, self.meta, samples)

    def ensure_key_index(self, level: int = 3) -> None:
        """Build the stored key index once every shard's samples unit exists (the last worker to finish does
        it), and again after the shards changed. Idempotent: workers finishing together write the same bytes."""
        self.refresh()
        if len(self.samples_done) == len(self.meta.shards) and self.key_index_state() != "current":
            key_index.build(self.root, self.meta, self.samples_of(range(len(self.meta.shards))),
                            level)

    def array(self, path: str) -> zarr.Array:
        """A raw zarr array, unchecked: for inspection and tests; training reads go through read()."""
        return self.root[path]

    # -- the unit index (for readers that cannot list) -----------------------------------------------
    def _require_writable(self) -> None:
        if self.mode == "r":
            raise CacheError(f"{self.url} is open read-only; open it with mode='r+' to write.")

    def sync_index(self, shards: Iterable[int]) -> None:
        """Make these shards' unit indexes list exactly their markers: after a crash between a marker and its
        index update, and for caches written before the index existed."""
        self._require_writable()
        for shard, names in fmt.units_by_shard(list_markers(self.root), shards).items():
            if read_index(self.root, shard) != sorted(names):
                write_index(self.root, shard, list(names))

    def withdraw(self, unit: UnitName | str) -> None:
        """Take a unit back (to rewrite it): out of the index first, then its marker, so no reader is ever
        pointed at a unit without one."""
        self._require_writable()
        name = unit if isinstance(unit, str) else unit.name
        shard = fmt.parse_unit_name(name).shard
        write_index(self.root, shard, [n for n in read_index(self.root, shard) or [] if n != name])
        delete_marker(self.root, name)
        self._by_shard.get(shard, set()).discard(fmt.parse_unit_name(name))

    # -- unit writes -------------------------------------------------------------------------------
    def _array(self, path: str) -> zarr.Array:
        if path not in self._arrays:
            self._arrays[path] = self.root[path]
        return self._arrays[path]

    def write(self, unit: UnitName, arrays: dict[str, np.ndarray], **record: Any) -> None:
        """Write a unit: its arrays (by short name, one row per sample of the shard, padded here to
        ``rows_per_shard``), then its marker (checksums, binding, ``record``), then its shard's unit index entry."""
        self._require_writable()
        s = self.meta.rows_per_shard
        region = schema.unit_region(unit, s)
        sums = {}
        for spec in schema.BY_KIND[unit.kind]:
            path = spec.path(unit.teacher)
            arr = self._array(path)
            block = np.asarray(arrays[spec.name]).astype(arr.dtype, copy=False)
            padded = np.full((s,) + block.shape[1:], arr.fill_value, dtype=arr.dtype)
            padded[: block.shape[0]] = block
            self._store(arr, path, unit, region, padded)
            kill_point("unit.array")
            sums[path] = block_sha256(padded)
        shard = self.meta.shards[unit.shard]
        write_marker(self.root, unit.name, {
            "binding": fmt.unit_binding(unit.name, self.meta), "shard": unit.shard, "shard_name": shard.name,
            "rows": shard.nsamples, "checksums": sums,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            **record})
        kill_point("unit.marker")  # a marker the index does not list yet: the next run's sync_index adds it
        # One process writes a shard (ranks and --part split by shard), so this read-modify-write does not race.
        write_index(self.root, unit.shard, (read_index(self.root, unit.shard) or []) + [unit.name])
        self._by_shard.setdefault(unit.shard, set()).add(unit)

    def _store(self, arr: zarr.Array, path: str, unit: UnitName, region: tuple[slice, ...], block: np.ndarray) -> None:
        """Write a unit's region. A per-view object also holds other views' chunks, which zarr keeps as stored.
        An object too damaged to merge into (truncated, unreadable index) holds no unit a marker vouches for (the
        re-check withdrew them all), so it is deleted and written afresh; any other failure is raised as is."""
        try:
            arr[region] = block
        except Exception:
            if unit.views is None or arr.shards is None:  # one object per chunk: nothing of others to merge
                raise
            rows, per_object = region[0], arr.shards[1]
            broken = []
            for j in range(unit.views[0] // per_object, (unit.views[1] - 1) // per_object + 1):
                views = slice(j * per_object, min((j + 1) * per_object, arr.shape[1]))
                try:
                    arr[rows, views]
                except Exception:  # noqa: BLE001 - crc32c or index mismatch: nothing in it can be read
                    broken.append(schema.object_key(path, unit.shard, views.start, per_object))
            if not broken:
                raise
            for key in broken:
                delete_object(self.root, key)
            arr[region] = block

    def write_samples(self, shard: int, keys: list[str], labels: np.ndarray, status: np.ndarray,
                      digests: np.ndarray) -> None:
        """``digests``: uint8 [n, 16], :func:`format.sample_digest` of each sample's encoded bytes."""
        n = self.meta.shards[shard].nsamples
        if len(keys) != n or labels.shape != (n,) or status.shape != (n,) or digests.shape != (n, fmt.DIGEST_BYTES):
            raise CacheError(f"Shard {self.meta.shards[shard].name} has {n} samples in the index but the unit "
                             f"holds {len(keys)}; the shard changed since it was indexed.")
        self.write(UnitName(shard, "samples"),
                   {"key": schema.encode_keys(keys, self.meta.key_bytes), "label": labels, "status": status,
                    "digest": digests},
                   skipped=int((status == SampleStatus.SKIPPED).sum()))

    def write_views(self, shard: int, views: tuple[int, int], params: np.ndarray) -> None:
        self.write(UnitName(shard, "views", views=tuple(views)), {"params": params}, views=list(views))

    def write_teacher(self, shard: int, tid: str, views: tuple[int, int], block: TeacherBlock) -> None:
        self.write(UnitName(shard, "teacher", tid, tuple(views)),
                   schema.encode_teacher(block.topk_idx, block.topk_logp, block.label_logp, block.logz),
                   teacher=tid, views=list(views), correct=int(block.correct), count=int(block.count))


def parse_meta(attrs: Any, url: str) -> CacheMeta:
    """The root metadata, or one line naming the malformed field (never a KeyError or TypeError from inside)."""
    try:
        meta = CacheMeta.from_dict(attrs)
    except CacheError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CacheError(f"{url}: malformed root metadata ({what}); re-create it with `pld cache-teacher`, or ask "
                         "its owner for an intact copy.") from None
    problem = class_names_problem(meta.class_names)
    if problem:  # a map by name would pick one of two classes silently (issue 29)
        raise CacheError(f"{url}: its class_names {problem}; a class map by name needs one distinct name per class: "
                         "re-create the cache with distinct --class-names (or ask its owner for a fixed copy).")
    return meta


def class_names_problem(names: Any) -> str | None:
    """What is wrong with a cache's ``class_names`` (None when absent or fine): not a list of non-empty, distinct
    strings. (Their count may differ from the teacher's: make-shards' classes.json of a dataset labelled in its own
    classes, recorded by default; such names are the dataset's, not the teacher's, and never resolve a map.)"""
    if names is None:
        return None
    if not isinstance(names, list):
        return "are not a list of names"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            return f"name class {i} {json.dumps(name)[:40]} (empty or not a string)"
        if name in seen:
            return f"repeat {name[:80]!r} (classes {seen[name]} and {i})"
        seen[name] = i
    return None


def _views_within(unit: UnitName, num_views: int) -> bool:
    """A unit's views lie inside the cache's: ``num_views`` is not in the bindings (extension grows it), so a
    unit beyond it (``num_views`` edited down) is no unit of this cache, and a run like ``0-10000000000`` is never
    expanded."""
    return unit.views is None or 0 <= unit.views[0] < unit.views[1] <= num_views


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


async def _gather_all(coros: list[Any], at_once: int | None = None) -> list[Any]:
    """Each awaitable's result or the exception it raised, in order (``at_once``: how many run at a time); an
    interrupt or cancellation is raised, not returned."""
    limit = asyncio.Semaphore(at_once) if at_once else None

    async def one(coro: Any) -> Any:
        if limit is None:
            return await coro
        async with limit:
            return await coro

    got = await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
    for item in got:
        if isinstance(item, BaseException) and not isinstance(item, Exception):
            raise item
    return got


def first_error(results: list[Any]) -> list[Any]:
    """``results`` when none is an exception; else raise the first (in order), as a loop of reads would have."""
    for item in results:
        if isinstance(item, BaseException):
            raise item
    return results
