"""Webdataset shards: expanding specs, indexing (sample count + content hash in one pass), reading samples.

Keys follow webdataset's rule (basename up to the first dot). A shard is identified by its content, not its
path, so a cache made from ``/data/x.tar`` serves a team whose copy lives at ``s3://bucket/x.tar``.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator, Sequence, TypeVar

import fsspec
import webdataset as wds
from webdataset.tariterators import group_by_keys

from . import errors, network, options  # noqa: F401  (network: HTTP timeouts and redirects, installed on import)
from .cache.format import ShardRecord

LABEL_FIELD = "cls"


class DataError(errors.PldError):
    """Bad input data: the message names the shard and key and says what to do."""


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (``train-{000000..000099}.tar``), ``::``-joined lists, or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in wds.shardlists.expand_urls(str(s))]
    if not urls:
        raise DataError(f"No shards in {spec!r}; pass a path, URL or brace pattern like 'train-{{000000..000009}}.tar'.")
    return urls


def shard_name(url: str) -> str:
    return os.path.basename(url.rstrip("/").split("::")[-1]) or url


def open_shard(url: str) -> IO[bytes]:
    """``pipe:`` through webdataset's gopen; anything else (paths, file://, s3://, http://) through fsspec."""
    if url.startswith("pipe:"):
        return wds.gopen(url, "rb")
    try:
        with errors.reaching(url):
            return fsspec.open(url, "rb").open()
    except FileNotFoundError as e:
        raise DataError(f"Shard {url} does not exist; check the --data pattern.") from e


class _HashingReader:
    """A read-only stream that hashes what passes through: index a shard in the same pass that reads it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0
        self.head = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        if len(self.head) < options.QUICK_BYTES:
            self.head += data[: options.QUICK_BYTES - len(self.head)]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


#: The most bytes of one tar member (one field of one sample) pld reads; larger members are refused from their header
MAX_MEMBER_BYTES = 256 << 20
#: Shard names that ask for a compressed tar; any other shard must be an uncompressed tar
COMPRESSED = {".tar.gz": "gz", ".tgz": "gz", ".tar.bz2": "bz2", ".tar.xz": "xz"}


def _members(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """Each regular member as ``{fname, data, __url__}``, read only after its header's size is checked. A shard is
    decompressed only when its name asks for it (``.tar.gz``, ...): a 14 MB gzip file named ``.tar`` once held a
    3 GiB member."""
    name = url.split("::")[-1].lower()
    how = next((c for suffix, c in COMPRESSED.items() if name.endswith(suffix)), "")
    try:
        tar = tarfile.open(fileobj=stream, mode=f"r|{how}")
        for info in tar:
            if not info.isreg() or re.match(r"__[^/]*__($|/)", info.name):
                continue
            if info.size > MAX_MEMBER_BYTES:
                raise DataError(f"Shard {url}: member {info.name!r} holds {info.size:,} bytes, more than the "
                                f"{MAX_MEMBER_BYTES:,} pld reads of one sample field; rebuild the shard.")
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # a stream's member list would grow with every member
    except tarfile.ReadError as e:
        asked = f" (read as {how})" if how else ""
        raise DataError(f"Shard {url} is not an uncompressed tar{asked} ({e}): pld decompresses a shard only when "
                        "its name says so (.tar.gz, .tgz, .tar.bz2, .tar.xz); rename or decompress it.") from None


def _iter_tar(stream: IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    try:
        yield from group_by_keys(_members(stream, url))
    except ValueError as e:
        if "duplicate file name" not in str(e):
            raise
        member = str(e.args[0]).split(":")[0].strip("('\" ")
        raise DataError(f"Shard {url} holds member {member!r} twice within one sample; keys must be unique, rebuild "
                        "the shard.") from None


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` and one bytes entry per extension) in tar order."""
    stream = open_shard(url)
    try:
        yield from _iter_tar(stream, url)
    finally:
        stream.close()


def quick_hash(url: str) -> str | None:
    """sha256 over (size, first MiB, last MiB): a cheap identity check; None where the source can't seek."""
    if url.startswith("pipe:"):
        return None
    try:
        with errors.reaching(url), fsspec.open(url, "rb") as f:
            return options.quick_hash(f)
    except FileNotFoundError:
        raise DataError(f"Shard {url} does not exist; check the --data pattern.") from None


@dataclass
class ShardIndex:
    record: ShardRecord
    max_key_bytes: int
    keys: list[str]


def index_shard(url: str) -> ShardIndex:
    """Count samples, collect keys and hash the whole file in one read. Duplicate keys fail here."""
    raw = open_shard(url)
    stream = _HashingReader(raw)
    keys: list[str] = []
    seen: set[str] = set()
    try:
        for sample in _iter_tar(stream, url):
            key = sample["__key__"]
            if key in seen:
                raise DataError(f"Duplicate key {key!r} in shard {url}; keys must be unique (webdataset keys end at the first dot).")
            seen.add(key)
            keys.append(key)
        stream.drain()
    except DataError:
        raise
    except Exception as e:  # tarfile/stream errors: name the shard
        raise DataError(f"Cannot read shard {url}: {type(e).__name__}: {e}") from e
    finally:
        raw.close()
    tail_hash = quick_hash(url)
    record = ShardRecord(name=shard_name(url), url=url, nsamples=len(keys), nbytes=stream.nbytes,
                         sha256=stream.sha.hexdigest(), quick_hash=tail_hash or stream.sha.hexdigest())
    if record.nsamples == 0:
        raise DataError(f"Shard {url} holds no samples; remove it from the pattern.")
    return ShardIndex(record, max((len(k.encode("utf-8")) for k in keys), default=1), keys)


def check_unique_keys(indexes: Sequence[ShardIndex]) -> None:
    owner: dict[str, str] = {}
    for idx in indexes:
        for key in idx.keys:
            if key in owner:
                raise DataError(f"Duplicate key {key!r} in shards {owner[key]} and {idx.record.url}; keys must be unique.")
            owner[key] = idx.record.url


def pick_field(sample: dict[str, Any], fields: str) -> Any:
    for name in fields.split(";"):
        if name in sample:
            return sample[name]
    return None


def parse_label(sample: dict[str, Any], field: str, num_classes: int | None) -> int:
    raw = sample.get(field)
    where = f"sample {sample['__key__']!r} of shard {sample.get('__url__')}"
    if raw is None:
        raise DataError(f"No '{field}' label in {where}; set --label-field to the label's extension.")
    try:
        label = int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
    except ValueError as e:
        raise DataError(f"Label {raw!r} of {where} is not an integer class index.") from e
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataError(f"Label {label} of {where} is outside [0, {num_classes}); check --num-classes or the data.")
    return label


T = TypeVar("T")
_WRAPPED = re.compile(r"^Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def worker_errors(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a DataLoader, re-raising an error from a worker process as the main process would have raised it:
    same type, the original one-line message (torch wraps it in "Caught X in DataLoader worker process N" and
    the worker's whole traceback). On an error the workers are stopped at once: left to the garbage collector (the
    iterator sits in the error's traceback), torch waits 5 s for each one."""
    batches = iter(loader)
    try:
        yield from batches
    except GeneratorExit:  # the caller stopped early: the iterator is freed (and its workers stopped) with us
        raise
    except BaseException as e:  # noqa: BLE001 - only torch's wrapped worker errors are rewritten
        getattr(batches, "_shutdown_workers", lambda: None)()  # torch's own clean-up, now instead of at collection
        if not isinstance(e, Exception):
            raise
        text = str(e.args[0]) if e.args else ""
        match = _WRAPPED.match(text)
        if match is None:
            raise
        lines = [line for line in text.rstrip().splitlines() if line and not line.startswith(" ")]
        last = lines[-1]
        message = last.split(": ", 1)[1] if re.match(rf"^[\w.]*{match.group(1)}: ", last) else last
        # torch re-creates it as RuntimeError where its constructor takes more than a message (DamagedUnit), and an
        # OSError without its errno: keep the type and errno that say what went wrong
        rebuilt = errors.rebuild(match.group(1), message) or errors.rebuild_os_error(message)
        if rebuilt is not None:
            raise rebuilt from None
        raise type(e)(message) from None
