"""Claims: cache-teacher workers that overlap on one cache (no --part split, or several machines on one s3://
cache) skip the shards another live worker is writing, so N workers finish in about 1/N of the time.

A claim is one small JSON object per shard, ``claims/s{shard:06d}.json`` = ``{"owner", "expires"}`` (owner
``host:pid:tag``, expiry in Unix time), written before a worker starts a shard, refreshed while it works and
deleted when the shard is done. A claim that is not refreshed (its worker died) expires and the shard is taken
over; a claim whose owner is a dead process of this same machine (a crashed run being rerun) is taken over at
once. Claims are advisory: two workers
that claim one shard at the same instant both write it, with identical bytes, so correctness never depends on
them (markers and the unit index do that); they only save the duplicate work.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Iterable

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

CLAIMS_GROUP = "claims"
MAX_TTL = 86_400.0  # seconds: no worker claims a shard for longer, so a claim expiring later is not one


def new_owner() -> str:
    """This worker's name in its claims: host, process and a random tag (pids repeat across machines)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _key(root: zarr.Group, shard: int) -> str:
    return f"{root.store_path.path}/{CLAIMS_GROUP}/s{shard:06d}.json".lstrip("/")


def read_claim(root: zarr.Group, shard: int) -> dict | None:
    """The shard's claim, or None where there is none or what is stored is not one (garbage, a half-written or
    edited file): a claim only defers work, so an unreadable one holds nothing and the next claim replaces it."""
    buf = sync(root.store.get(_key(root, shard), default_buffer_prototype()))
    if buf is None:
        return None
    try:
        doc = json.loads(buf.to_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # nested deeper than Python parses
        return None
    ok = (isinstance(doc, dict) and isinstance(doc.get("owner"), str) and isinstance(doc.get("expires"), (int, float))
          and not isinstance(doc.get("expires"), bool)
          and doc["expires"] <= time.time() + MAX_TTL)  # NaN, Infinity or year 3000 would hold a shard forever
    return doc if ok else None


def _dead_here(owner: str) -> bool:
    """A claim by a process of this machine that no longer runs (the usual case: a crashed run, rerun): stale at
    once instead of after its time to live."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def held_by_other(root: zarr.Group, shard: int, owner: str, now: float | None = None) -> bool:
    """Whether another live worker holds a claim on the shard: not ours, not expired, and not left by a process
    of this machine that has died."""
    claim = read_claim(root, shard)
    now = time.time() if now is None else now
    if claim is None or claim.get("owner") == owner or float(claim.get("expires", 0)) <= now:
        return False
    return not _dead_here(str(claim.get("owner", "")))


def claim(root: zarr.Group, shards: Iterable[int], owner: str, ttl: float) -> None:
    doc = json.dumps({"owner": owner, "expires": time.time() + ttl}).encode()
    for shard in shards:
        sync(root.store.set(_key(root, shard), default_buffer_prototype().buffer.from_bytes(doc)))


def acquire(root: zarr.Group, shards: list[int], owner: str, ttl: float, checked_at: float) -> list[int]:
    """Claim these shards (found free at ``checked_at``, a ``time.monotonic()``) and keep those still ours after
    a settle time of twice our own check-to-claim delay (at least 0.2 s): of two workers that claimed a shard
    at about the same time (last writer wins), only one goes on. A slower rival can still slip through the
    window; that costs duplicate work, never a wrong result."""
    claim(root, shards, owner, ttl)
    time.sleep(max(0.2, 2 * (time.monotonic() - checked_at)))
    return [s for s in shards if (read_claim(root, s) or {}).get("owner") == owner]


def release(root: zarr.Group, shards: Iterable[int], owner: str) -> None:
    for shard in shards:
        current = read_claim(root, shard)
        if current is not None and current.get("owner") == owner:
            sync(root.store.delete(_key(root, shard)))


class Heartbeat:
    """Refreshes this worker's (acquired) claims every ``ttl / 3`` seconds while a round of shards is processed,
    and releases them at the end."""

    def __init__(self, root: zarr.Group, shards: list[int], owner: str, ttl: float) -> None:
        self.root, self.shards, self.owner, self.ttl = root, shards, owner, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pld-claims", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            claim(self.root, self.shards, self.owner, self.ttl)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        release(self.root, self.shards, self.owner)
