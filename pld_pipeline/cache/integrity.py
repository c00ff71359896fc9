"""Reading a unit only through its marker: a cache that strangers share is checked on every read.

A unit's marker records a sha256 per array region and a binding to the root metadata (format.unit_binding).
Every reader (the student data path, verify, inspect, a resuming cache-teacher) reads a unit's arrays here, so
a missing chunk (zarr would return the fill value), a chunk swapped between shards or views, an edited byte or
an edited root attribute is refused with the unit's name and the fix, never trained on.
"""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from . import format as fmt
from . import schema
from .format import CacheError, CacheMeta
from .store import get_marker, read_marker

REPAIR = "rerun the `pld cache-teacher` command that made the cache (it re-checks every unit and rewrites damaged ones)"


class DamagedUnit(CacheError):
    """A unit whose bytes or metadata are not what its writer recorded."""

    def __init__(self, url: str, unit: str, why: str, binding_only: bool = False) -> None:
        #: the unit's arrays match its marker, only its binding to the root metadata does not: the metadata
        #: was edited (rewriting the unit would launder the edit), not the data
        self.unit, self.why, self.binding_only = unit, why, binding_only
        super().__init__(f"{url}: unit {unit} is damaged: {why}. Nothing was trained on it; to repair, {REPAIR}, "
                         "or ask the cache's owner for an intact copy.")


def block_sha256(block: np.ndarray) -> str:
    """The checksum a marker records: sha256 of the region's bytes, stored dtype, C order, little-endian."""
    arr = np.ascontiguousarray(block)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def read_unit(root: zarr.Group, meta: CacheMeta, name: str, url: str,
              record: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The unit's arrays over its whole region (padding rows included), after checking every array's sha256
    against its marker and the marker's binding to ``meta``. Raises :class:`DamagedUnit` otherwise."""
    return sync(UnitReads(root).unit(meta, name, url, record))


class UnitReads:
    """Checked unit reads that share round trips: a unit's marker and arrays are fetched at once, many units'
    concurrently (``asyncio.gather`` over :meth:`unit`), at most ``at_once`` store requests in flight, and each
    array's metadata is read once per :class:`UnitReads`. Every check of :func:`checked` runs on what arrives,
    in the same order as one read after another would, so the same damage gives the same one-line error."""

    def __init__(self, root: zarr.Group, at_once: int = 1) -> None:
        self.root, self._at_once = root, at_once
        self._limit: asyncio.Semaphore | None = None  # made on the event loop that runs the reads
        self._opened: dict[str, asyncio.Future] = {}

    async def _request(self, coro: Any) -> Any:
        if self._limit is None:
            self._limit = asyncio.Semaphore(self._at_once)
        async with self._limit:
            return await coro

    async def _array(self, path: str) -> Any:
        if path not in self._opened:
            self._opened[path] = asyncio.ensure_future(self._request(self.root._async_group.getitem(path)))
        return await asyncio.shield(self._opened[path])

    async def _region(self, path: str, region: tuple[slice, ...]) -> np.ndarray:
        arr = await self._array(path)
        return np.asarray(await self._request(arr.getitem(region)))

    async def unit(self, meta: CacheMeta, name: str, url: str,
                   record: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
        """One unit, checked (raises :class:`DamagedUnit`); ``record``: its marker when already known (pinned)."""
        unit = fmt.parse_unit_name(name)
        if unit is None:
            raise DamagedUnit(url, name, "unrecognised unit name")
        paths = schema.unit_paths(unit)
        region = schema.unit_region(unit, meta.rows_per_shard)
        marker = self._request(get_marker(self.root, name)) if record is None else _known(record)
        got = await asyncio.gather(marker, *(self._region(path, region) for path in paths), return_exceptions=True)
        for item in got:  # an interrupt or a cancellation is no finding about the unit
            if isinstance(item, BaseException) and not isinstance(item, Exception):
                raise item
        return checked(meta, name, url, got[0], dict(zip(paths, got[1:])))


async def _known(record: dict[str, Any]) -> dict[str, Any]:
    return record


def checked(meta: CacheMeta, name: str, url: str, record: Any,
            arrays: dict[str, np.ndarray | Exception]) -> dict[str, np.ndarray]:
    """The unit's arrays when its marker (``record``, or the exception reading it raised) vouches for them: every
    array's sha256 as recorded, then the marker's binding to ``meta``. ``arrays``: path -> what was read (or the
    exception reading it raised), for exactly the unit's paths. Raises :class:`DamagedUnit` at the first problem."""
    try:
        if isinstance(record, Exception):
            raise record
        binding = fmt.unit_binding(name, meta)
    except Exception as e:  # noqa: BLE001 - an unreadable marker or one naming no shard/teacher is damage
        raise DamagedUnit(url, name, f"unreadable marker ({type(e).__name__}: {e})") from None
    sums = record.get("checksums") if isinstance(record, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise DamagedUnit(url, name, "its marker records no checksums (malformed marker)")
    if sorted(sums) != sorted(arrays):
        raise DamagedUnit(url, name, f"its marker lists arrays {sorted(sums)}, expected {sorted(arrays)}")
    for path, arr in arrays.items():
        if isinstance(arr, Exception):  # crc32c mismatch, truncated or undecodable chunk, missing array
            raise DamagedUnit(url, name, f"{path} is unreadable ({type(arr).__name__}: {arr})") from None
        if block_sha256(arr) != sums[path]:
            raise DamagedUnit(url, name, f"{path} differs from what was written (missing, swapped or edited chunk)")
    if record.get("binding") != binding:
        raise DamagedUnit(url, name, "its marker was written under other root metadata (the cache's attributes "
                                     "were edited after writing)", binding_only=True)
    return arrays  # type: ignore[return-value]  # every value was checked to be an array above


def units_under_other_metadata(root: zarr.Group, meta: CacheMeta, names: list[str], url: str) -> list[str]:
    """Units whose data is intact but whose binding does not match ``meta``: evidence that the root metadata
    was edited. Only units whose binding differs are read, so this is cheap on an intact cache."""
    edited = []
    for name in names:
        try:
            if read_marker(root, name).get("binding") == fmt.unit_binding(name, meta):
                continue
            read_unit(root, meta, name, url)
        except DamagedUnit as e:
            if e.binding_only:
                edited.append(name)
        except Exception:  # noqa: BLE001 - unreadable marker, unknown shard: damage, which the re-check repairs
            continue
    return edited
