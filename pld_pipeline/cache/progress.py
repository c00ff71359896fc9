"""A shard's partial progress: the rows an interrupted cache-teacher had finished, so a rerun computes only the rest.

A unit is all rows of a data shard (a zarr chunk is one shard's rows x one view), so without this an interruption
loses every row of the shards in progress. The writer therefore writes each finished block of rows of the shard's
missing units into the arrays as it goes, then a progress record ``progress/s{shard:06d}.json``: how many rows
(from row 0) are written, the sha256 of each array's written rows and a binding to the units they belong to.
The unit's marker is still written only once the whole unit is done, so readers never see partial rows (data
without a marker counts for nothing), and the record is deleted then.

A record is the writer's own note, never data: readers, the digest and the unit index ignore it. On resume it is
untrusted input: read only up to MAX_RECORD_BYTES, parsed as JSON (never unpickled), every field checked, and its
rows are used only when the arrays hold exactly the bytes it names (read back and hashed) under the same units
and root metadata (binding), and those rows pass the value checks every reader runs. Anything else: the record
is deleted and the shard starts over (the safe direction: work is redone, never skipped).
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..faults import kill_point
from . import format as fmt
from . import schema
from .format import UnitName
from .integrity import block_sha256

GROUP = "progress"
DEFINITION = "pld-cache-progress/1"
#: A record lists a sha256 per array of the shard's missing units: far below this for any real cache.
MAX_RECORD_BYTES = 1 << 20

#: stored-form arrays of some units, by unit name then array short name (``topk_idx``, ``params``, ...)
Blocks = dict[str, dict[str, np.ndarray]]


def _key(root: zarr.Group, shard: int) -> str:
    return f"{root.store_path.path}/{GROUP}/s{shard:06d}.json".lstrip("/")


def binding(meta: fmt.CacheMeta, units: Sequence[UnitName]) -> str:
    """sha256 over the units' names and bindings (their shard's identity, recipe, seed, teacher records): a record
    applies only to the same set of units under the same root metadata."""
    doc = {"definition": DEFINITION, "units": {u.name: fmt.unit_binding(u.name, meta) for u in units}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _region(unit: UnitName, rows_per_shard: int, start: int, stop: int) -> tuple[slice, ...]:
    base = unit.shard * rows_per_shard
    rows = slice(base + start, base + stop)
    return (rows,) if unit.views is None else (rows, slice(*unit.views))


def save(root: zarr.Group, meta: fmt.CacheMeta, blocks: Blocks, start: int, stop: int,
         opened: dict[str, zarr.Array] | None = None) -> None:
    """Write rows [start, stop) of each unit's arrays (``blocks`` hold rows [0, stop) in stored form), then the
    record for rows [0, stop). Rows before ``start`` are not rewritten: their bytes stay what the last record
    names, so a crash at any point leaves a record that still matches the data (or none). ``opened``: arrays
    already opened, by path (opening one reads its metadata)."""
    opened = {} if opened is None else opened
    units = [fmt.parse_unit_name(name) for name in blocks]
    shard = units[0].shard
    sums: dict[str, dict[str, str]] = {}
    for unit in units:
        sums[unit.name] = {}
        for spec in schema.BY_KIND[unit.kind]:
            path = spec.path(unit.teacher)
            if path not in opened:
                opened[path] = root[path]
            arr = opened[path]
            block = np.asarray(blocks[unit.name][spec.name]).astype(arr.dtype, copy=False)
            arr[_region(unit, meta.rows_per_shard, start, stop)] = block[start:stop]
            sums[unit.name][path] = block_sha256(block[:stop])
    kill_point("progress.rows")  # rows written, record not yet: the old record still matches its rows
    doc = {"definition": DEFINITION, "shard": shard, "rows": stop, "binding": binding(meta, units),
           "checksums": sums, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())
    sync(root.store.set(_key(root, shard), buf))  # one object: atomic locally and on object stores


def discard(root: zarr.Group, shard: int) -> None:
    """Delete the shard's record (its units are complete, or the record is unusable)."""
    sync(root.store.delete(_key(root, shard)))


def read(root: zarr.Group, shard: int) -> tuple[dict[str, Any] | None, str]:
    """The shard's record as parsed JSON (not yet checked against anything), or None and why not."""
    try:
        raw = sync(root.store.get(_key(root, shard), default_buffer_prototype(),
                                  RangeByteRequest(0, MAX_RECORD_BYTES + 1)))
    except Exception as e:  # noqa: BLE001 - unreadable (a directory, a link, over the store's cap): no record
        return None, f"unreadable ({type(e).__name__})"
    if raw is None:
        return None, "none"
    data = raw.to_bytes()
    if len(data) > MAX_RECORD_BYTES:
        return None, f"larger than {MAX_RECORD_BYTES} bytes"
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None, "not JSON"
    return (doc, "") if isinstance(doc, dict) else (None, "not a JSON object")


def load(root: zarr.Group, meta: fmt.CacheMeta, units: Sequence[UnitName], nsamples: int) -> tuple[int, Blocks, str]:
    """Rows [0, r) of the units' arrays as the shard's record names them, in stored form: ``(r, blocks, "")``,
    or ``(0, {}, why)`` where there is no usable record. Checks here: the record's shape and sizes, its binding
    to these units under this root metadata, and the sha256 of every array's rows as read back now. The caller
    still checks the rows' values and the shard's samples before using them."""
    shard = units[0].shard
    doc, why = read(root, shard)
    if doc is None:
        return 0, {}, why
    rows, sums = doc.get("rows"), doc.get("checksums")
    names = {u.name: u for u in units}
    if doc.get("definition") != DEFINITION or doc.get("shard") != shard:
        return 0, {}, "not a progress record of this shard"
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 < rows < nsamples:
        return 0, {}, f"rows outside (0, {nsamples})"
    if doc.get("binding") != binding(meta, units):
        return 0, {}, "written for other units or other root metadata"
    if not isinstance(sums, dict) or set(sums) != set(names):
        return 0, {}, "checksums for other units"
    blocks: Blocks = {}
    for name, unit in names.items():
        paths = schema.unit_paths(unit)
        if not isinstance(sums[name], dict) or set(sums[name]) != set(paths):
            return 0, {}, f"checksums for other arrays of {name}"
        blocks[name] = {}
        for spec, path in zip(schema.BY_KIND[unit.kind], paths):
            try:
                block = np.ascontiguousarray(root[path][_region(unit, meta.rows_per_shard, 0, rows)])
            except Exception as e:  # noqa: BLE001 - a chunk that fails its crc32c: nothing there is usable
                return 0, {}, f"{path} unreadable ({type(e).__name__})"
            if block_sha256(block) != sums[name][path]:
                return 0, {}, f"{path} does not hold the rows it names"
            blocks[name][spec.name] = block
    return rows, blocks, ""


def found(root: zarr.Group) -> list[str]:
    """Names of the progress records present (``s000003.json``, ...), where the store can list; for verify."""
    async def _ls() -> list[str]:
        prefix = f"{root.store_path.path}/{GROUP}/".lstrip("/")
        return sorted([k[len(prefix):] async for k in root.store.list_prefix(prefix) if k.endswith(".json")])
    try:
        return sync(_ls())
    except Exception:  # noqa: BLE001 - a store that cannot list (HTTP): records are a writer's, not a reader's
        return []
