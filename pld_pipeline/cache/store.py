"""Opening a cache by path or fsspec URL, and the raw-object operations zarr's Group API lacks."""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import shutil
import stat
import uuid
from typing import Any, Iterable

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import PldError, RemoteError, network_cause, reaching
from ..network import timeout_s
from .format import UNIT_INDEX_GROUP, UNITS_GROUP, CacheError


def local_path(url: str) -> str | None:
    """The folder of a cache on this machine's file system (plain paths, ``file://``, ``local://``), None for
    remote stores."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return None if "://" in url else url


def _normalise(url: str) -> str:
    path = local_path(url)
    return url if path is None else path


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith(("file://", "memory://"))


#: The most bytes an object the layout does not bound (key index chunks, before the layout is known) may hold.
MAX_OBJECT_BYTES = 4 << 30


def object_cap(caps: dict[str, int], key: str) -> int:
    """The most bytes the object at ``key`` may hold: MAX_METADATA_BYTES for a JSON document, else its array's
    layout bound (``caps``: key prefix -> bytes, :func:`limit_objects`), else MAX_OBJECT_BYTES."""
    if key.endswith(".json"):
        return MAX_METADATA_BYTES
    return next((c for prefix, c in caps.items() if key.startswith(prefix)), MAX_OBJECT_BYTES)


def _lstat_at(name: str, fd: int) -> int | None:
    """The mode of ``name`` in the folder ``fd`` (a link's own), None where nothing is."""
    try:
        return os.lstat(name, dir_fd=fd).st_mode
    except FileNotFoundError:
        return None


class LocalObjects(zarr.storage.LocalStore):
    """zarr's LocalStore, reading only the cache's own files: each object read must be a regular file inside
    the cache folder (not a link, nor under a linked folder: nothing out of it, no device or FIFO) and no larger
    than its cap (``zarr.json``: MAX_METADATA_BYTES; array objects: their layout's, see :func:`limit_objects`),
    checked before a byte is read. A stranger's cache can hold a link to /dev/zero, or a sparse terabyte under a
    chunk's name (a tar carries both)."""

    def __init__(self, root: str, *, read_only: bool = False) -> None:
        super().__init__(root, read_only=read_only)
        self.caps: dict[str, int] = {}  # key prefix -> bytes
        self._real_root = os.path.realpath(root)

    def with_read_only(self, read_only: bool = False) -> "LocalObjects":
        store = type(self)(str(self.root), read_only=read_only)
        store.caps = self.caps
        return store

    def _check(self, key: str) -> None:
        path = os.path.join(str(self.root), key)
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return  # zarr reads it as absent
        where = f"{self.root}: {key}"
        if stat.S_ISLNK(info.st_mode) or not os.path.realpath(path).startswith(self._real_root + os.sep):
            raise CacheError(f"{where} is a symbolic link or lies under one; pld reads only the cache's own files. "
                             "Remove the link, or ask the cache's owner for an intact copy.")
        if not stat.S_ISREG(info.st_mode):
            raise CacheError(f"{where} is not a regular file; remove it, or ask the cache's owner for an intact copy.")
        cap = object_cap(self.caps, key)
        if info.st_size > cap:
            raise CacheError(f"{where} holds {info.st_size:,} bytes, more than its layout allows ({cap:,}); the cache "
                             "is damaged or was edited: ask its owner for an intact copy.")

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        self._check(key)
        return await super().get(key, prototype, byte_range)

    # -- writes: walked from the root by folder handle, never through a link (one planted after the open included)
    def _folder(self, key: str) -> tuple[int, str]:
        """An open handle on ``key``'s folder, reached from the cache root one component at a time without
        following a link (``O_NOFOLLOW``; missing folders are made), and the object's own name. Checked at write
        time, so a link planted at a unit folder while a writer runs is refused, not followed."""
        *folders, name = key.split("/")
        os.makedirs(self.root, exist_ok=True)  # zarr's mode "w" removes the root before writing into it again
        fd = os.open(str(self.root), os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in folders:
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError:
                    raise self._refuse_write(key) from None
                os.close(fd)
                fd = nfd
            if stat.S_ISLNK(_lstat_at(name, fd) or 0):
                raise self._refuse_write(key)
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def _refuse_write(self, key: str) -> CacheError:
        return CacheError(f"{self.root}: {key} is, or lies under, a symbolic link or a file where a folder belongs; "
                          "pld never writes through one (nothing was written). Remove it, or write to a fresh --out.")

    def _put(self, key: str, data: Any, exclusive: bool) -> None:
        """One object, atomically (a temporary file in its folder, renamed), relative to a folder handle. A full or
        read-only disk is reported with the object's path (an errno alone names nothing)."""
        try:
            self._put_at(key, data, exclusive)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or isinstance(e, PldError):
                raise
            raise OSError(e.errno, e.strerror, os.path.join(str(self.root), key)) from None

    def _put_at(self, key: str, data: Any, exclusive: bool) -> None:
        fd, name = self._folder(key)
        tmp = f"{os.path.splitext(name)[0]}.{uuid.uuid4().hex}.partial"  # zarr's own name for it (target.PLD_FILE)
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=fd)
            try:
                with os.fdopen(out, "wb") as f:
                    f.write(data)
                if exclusive:
                    os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                else:
                    os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            finally:
                if _lstat_at(tmp, fd) is not None:
                    os.unlink(tmp, dir_fd=fd)
        finally:
            os.close(fd)

    async def _set(self, key: str, value: Any, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(self._put, key, value.as_buffer_like(), exclusive)

    async def delete(self, key: str) -> None:
        self._check_writable()
        fd, name = self._folder(key)
        try:
            mode = _lstat_at(name, fd)
            if mode is not None and stat.S_ISDIR(mode):
                shutil.rmtree(name, dir_fd=fd)
            elif mode is not None:
                os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._check(key)
        return await super().get_partial_values(prototype, key_ranges)


class CappedReads(zarr.storage.WrapperStore):
    """Reads from an object store (S3, GCS, a --cache-dir copy) that never ask for more than the object's cap:
    a whole object is fetched as the range ``[0, cap + 1)`` and refused when that extra byte arrives, a longer
    range is refused before it is sent. Caps as :class:`LocalObjects`; what a host sends is bounded by what
    was asked (HTTP hosts, which may ignore ranges, are capped as the body streams, see :func:`_capped_http`)."""

    def __init__(self, store: zarr.abc.store.Store, caps: dict[str, int] | None = None, url: str = "") -> None:
        super().__init__(store)
        self.caps = {} if caps is None else caps  # key prefix -> bytes
        self.url = url  # for messages

    def _with_store(self, store: zarr.abc.store.Store) -> "CappedReads":
        return type(self)(store, self.caps, self.url)

    def _refuse(self, key: str, cap: int) -> CacheError:
        return CacheError(f"{self.url}: {key} holds more than the {cap:,} bytes its cache layout allows; the "
                          "cache is damaged or was edited: ask its owner for an intact copy.")

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
        cap = object_cap(self.caps, key)
        if byte_range is None or isinstance(byte_range, OffsetByteRequest):
            start = 0 if byte_range is None else byte_range.offset
            request: Any = RangeByteRequest(start, start + cap + 1)
        elif isinstance(byte_range, RangeByteRequest) and byte_range.end - byte_range.start > cap or (
                isinstance(byte_range, SuffixByteRequest) and byte_range.suffix > cap):
            raise self._refuse(key, cap)
        else:
            request = byte_range
        buf = await self._store.get(key, prototype or default_buffer_prototype(), request)
        if buf is not None and len(buf) > cap:
            raise self._refuse(key, cap)
        return buf

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> list[Any]:
        import asyncio
        return list(await asyncio.gather(*(self.get(key, prototype, r) for key, r in key_ranges)))


def _cached_store(url: str, cache_dir: str) -> "CappedReads":
    """A read-only store over fsspec's ``filecache``: each object is fetched once into ``cache_dir`` and
    revalidated against the remote's ETag/mtime (``check_files``), so a sweep of many students reads each remote
    byte once and never uses a stale copy after the cache is extended.

    zarr needs an async filesystem and cannot take ``filecache::s3://...`` URLs directly (its event loop and
    the target's clash), so the chain is built here from a synchronous target and wrapped.
    """
    import warnings

    import fsspec
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from fsspec.implementations.cached import CachingFileSystem

    target, root = fsspec.core.url_to_fs(url, asynchronous=False, skip_instance_cache=True)
    capped = CappedReads(None, url=url)  # type: ignore[arg-type]  # its store is set below; its caps are shared
    sized: set[str] = set()

    class WholeObjectCache(CachingFileSystem):
        def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
            """A byte range of the local copy (fetched whole once), only that range read. The remote object's
            size is checked against its cap before the first download; fsspec's own version seeks from the end
            through a ``size`` attribute that local files lack."""
            key = path[len(root):].lstrip("/")
            cap = object_cap(capped.caps, key)
            if path not in sized:
                try:
                    remote = self.fs.size(path)
                except FileNotFoundError as e:  # fsspec's word for an unreachable host too: not "No cache at"
                    net = network_cause(e)
                    if net is None:
                        raise
                    raise RemoteError(f"{url}: {net}") from None
                if remote is not None and remote > cap:
                    raise capped._refuse(key, cap)
                sized.add(path)
            try:
                with self.open(path, "rb", **kwargs) as f:
                    size = f.seek(0, os.SEEK_END)
                    if size > cap:  # changed on the remote after it was sized
                        raise capped._refuse(key, cap)
                    lo, hi, _ = slice(start, end).indices(size)
                    f.seek(lo)
                    return f.read(max(hi - lo, 0))
            except ValueError as e:  # fsspec maps its local copy: "mmap length is greater than file size"
                if "mmap" not in str(e):
                    raise
                raise CacheError(f"{url}: {key} changed on the remote after it was copied into --cache-dir "
                                 f"{cache_dir}; remove that folder (or use a fresh one) and rerun.") from None

    cached = WholeObjectCache(fs=target, cache_storage=cache_dir, check_files=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that the wrapper was not created asynchronous: intended
        capped._store = zarr.storage.FsspecStore(AsyncFileSystemWrapper(cached), path=root, read_only=True)
    return capped


def open_root(url: str, mode: str, cache_dir: str | None = None, attributes: dict[str, Any] | None = None) -> zarr.Group:
    """The cache's root group; ``mode='r'`` opens read-only (a shared cache is never modified by readers).
    ``cache_dir`` keeps a local copy of what a read-only remote cache serves (ignored for local paths);
    ``attributes`` are written with a new group's metadata, in the same object."""
    url = _normalise(str(url))
    _check_scheme(url)
    if os.path.isfile(url):
        raise CacheError(f"{url} is a file, not a cache (a cache is a directory, a zarr group); choose another path.")
    if mode != "r" and url.startswith(("http://", "https://")):  # zarr would fail deep inside, on the first write
        raise CacheError(f"{url}: a cache served over plain HTTP is read-only; write it to a local path or object "
                         "storage (s3://, gs://) and serve that folder.")
    with reaching(url):  # network failures name the cache URL
        try:
            if cache_dir and mode == "r" and _is_remote(url):
                os.makedirs(cache_dir, exist_ok=True)
                return zarr.open_group(_cached_store(url, cache_dir), mode="r", zarr_format=3)
            fmt3 = {} if mode == "w" else {"zarr_format": 3}  # never opens a format 2 store (its codecs unpickle)
            where: Any = url
            if mode == "r" and url.startswith(("http://", "https://")):
                where = _capped_http_store(url)
            elif "://" not in url:  # writes, too, never through a link (LocalObjects._folder)
                if mode == "w":
                    os.makedirs(url, exist_ok=True)
                where = _local_objects(url, read_only=mode == "r")
            elif mode != "w" and _is_remote(url):
                where = CappedReads(zarr.storage.FsspecStore.from_url(url, read_only=mode == "r"), url=url)
            root = zarr.open_group(where, mode=mode, attributes=attributes, **fmt3)
            if url.startswith(("http://", "https://")) and not _serves_ranges(root):
                return zarr.open_group(WholeObjects(root.store), mode="r")
            return root
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            net = network_cause(e)
            if net is not None:  # an unreachable host is not a missing cache
                raise RemoteError(f"{url}: {net}") from None
            if mode != "w" and _is_format_2(url):
                raise CacheError(f"{url} is a zarr format 2 store; pld reads only zarr format 3 caches it wrote "
                                 "(format 2 codecs can unpickle). Re-create it with `pld cache-teacher`.") from None
            raise CacheError(f"No cache at {url}: run `pld cache-teacher --out {url} ...` first.") from e
        except ImportError as e:  # e.g. s3:// without s3fs
            raise CacheError(f"Cannot open {url}: {e}. Install the filesystem package (e.g. pip install s3fs).") from e
        except PldError:  # already one line (a refused redirect, a bounded read)
            raise
        except (TypeError, ValueError, KeyError, RecursionError) as e:  # zarr parsing a stranger's group document
            why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            raise CacheError(f"{url}: its zarr.json is not a zarr group document ({why}); the cache is damaged "
                             "or not a pld cache.") from None


def _check_scheme(url: str) -> None:
    """Refuse a URL scheme no installed fsspec file system knows, in one line (zarr's error would read as a
    damaged cache)."""
    import fsspec
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme is None or scheme in fsspec.available_protocols():
        return
    raise CacheError(f"{url}: unknown URL scheme '{scheme}://'; use a local path or one of file://, s3://, gs://, "
                     "az://, http(s):// (any fsspec protocol, with its package installed).")


#: The most bytes a metadata object (zarr.json of the root, an array, a marker, an index) may hold when fetched from
#: a remote host; array objects are capped by their layout (bounds.object_caps via :func:`limit_objects`).
MAX_METADATA_BYTES = 64 << 20


def _local_objects(url: str, read_only: bool) -> LocalObjects:
    if not os.path.isdir(url):
        raise FileNotFoundError(url)
    return LocalObjects(url, read_only=read_only)


def _is_format_2(url: str) -> bool:
    try:
        zarr.open_group(_local_objects(url, True) if "://" not in url else url, mode="r", zarr_format=2)  # reads .zgroup/.zattrs only: no chunk is decoded
        return True
    except Exception:  # noqa: BLE001 - not a format 2 group either
        return False


@functools.cache
def _capped_http() -> type:
    """fsspec's HTTP file system, reading each response only up to its object's cap (``caps``: URL prefix ->
    bytes, MAX_METADATA_BYTES elsewhere). One class, so fsspec's instance cache (and its session) is shared."""
    from fsspec.implementations.http import HTTPFileSystem

    class CappedHTTP(HTTPFileSystem):
        async def _cat_file(self, url: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
            kw = {**self.kwargs, **kwargs}
            if start is not None or end is not None:
                if start == end:
                    return b""
                kw["headers"] = {**kw.pop("headers", {}), "Range": await self._process_limits(url, start, end)}
            cap = max((c for p, c in self.caps.items() if url.startswith(p)), default=MAX_METADATA_BYTES)
            session = await self.set_session()
            async with asyncio.timeout(timeout_s()):  # the whole object: a host trickling bytes is cut off too
                async with session.get(self.encode_url(url), **kw) as r:
                    self._raise_not_found_for_status(r, url)
                    out = bytearray()
                    async for part in r.content.iter_chunked(1 << 16):
                        out += part
                        if len(out) > cap:
                            raise CacheError(f"{url} sent more than the {cap} bytes its cache layout allows for "
                                             "that object; refusing the host's answer (a damaged or hostile host).")
            return bytes(out)

    return CappedHTTP


def _capped_http_store(url: str) -> zarr.storage.FsspecStore:
    """A read-only store over HTTP whose every response is cut off (and refused) past the object's cap: a host
    with an endless body costs at most one object's worth of memory."""
    fs = _capped_http()(asynchronous=True)
    if not hasattr(fs, "caps"):
        fs.caps = {}
    return zarr.storage.FsspecStore(fs, path=url.rstrip("/"), read_only=True)


def limit_objects(root: zarr.Group, caps: dict[str, int]) -> None:
    """Cap reads of each array's objects (path -> bytes, bounds.object_caps) from remote hosts and local folders."""
    store = root.store
    base = root.store_path.path.strip("/")
    while isinstance(store, zarr.storage.WrapperStore):
        if isinstance(store, CappedReads):
            store.caps.update({f"{base}/{path}/".lstrip("/"): cap for path, cap in caps.items()})
        store = store._store
    if hasattr(getattr(store, "fs", None), "caps"):
        base = f"{store.path.rstrip('/')}/{root.store_path.path}".rstrip("/")
        store.fs.caps.update({f"{base}/{path}/": cap for path, cap in caps.items()})
    elif isinstance(store, LocalObjects):
        store.caps.update({f"{base}/{path}/".lstrip("/"): cap for path, cap in caps.items()})


def _serves_ranges(root: zarr.Group) -> bool:
    """Whether the host answers a byte-range request with just that range (some minimal static servers, e.g.
    ``python -m http.server``, send the whole file)."""
    from zarr.abc.store import RangeByteRequest
    buf = sync(root.store.get(f"{root.store_path.path}/zarr.json".lstrip("/"), default_buffer_prototype(),
                              RangeByteRequest(0, 1)))
    return buf is None or len(buf) == 1


class WholeObjects(zarr.storage.WrapperStore):
    """Views share stored objects (zarr's sharding codec) and are read by byte range. Over a host that ignores
    ranges, fetch each object whole (kept while it is among the last few read) and cut the ranges from it, so
    every object crosses the network once per block read, not once per view."""

    def __init__(self, store: zarr.abc.store.Store, keep: int = 16) -> None:
        super().__init__(store)
        self._recent: dict[str, Any] = {}
        self._keep = keep

    def _with_store(self, store: zarr.abc.store.Store) -> "WholeObjects":
        return type(self)(store, self._keep)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
        if byte_range is None:
            return await self._store.get(key, prototype)
        if key not in self._recent:
            whole = await self._store.get(key, prototype)
            if whole is None:
                return None
            self._recent[key] = whole.to_bytes()
            while len(self._recent) > self._keep:
                self._recent.pop(next(iter(self._recent)))
        data = self._recent[key]
        if isinstance(byte_range, RangeByteRequest):
            data = data[byte_range.start:byte_range.end]
        elif isinstance(byte_range, OffsetByteRequest):
            data = data[byte_range.offset:]
        elif isinstance(byte_range, SuffixByteRequest):
            data = data[-byte_range.suffix:]
        return prototype.buffer.from_bytes(data)


def cache_exists(url: str) -> bool:
    try:
        zarr.open_group(_normalise(str(url)), mode="r", zarr_format=3)
        return True
    except Exception:  # noqa: BLE001 - any failure to open means "no cache here"
        return False


def write_marker(root: zarr.Group, name: str, record: dict[str, Any]) -> None:
    """Mark a unit complete: one leaf group's zarr.json, written as a single object.

    A single ``store.set`` is atomic on LocalStore (temp file + rename) and on object stores (one PUT), so a
    reader sees either no marker or a whole one. Written directly so no parent metadata is ever rewritten.
    """
    doc = {"zarr_format": 3, "node_type": "group", "attributes": record}
    key = _marker_key(root, name)
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())
    sync(root.store.set(key, buf))


def can_list(url: str) -> bool:
    """Whether a reader may list the cache's folders. Static HTTP hosts and CDNs serve objects by path and do not
    list (or list as HTML pages, which are not an API): over http(s) readers use the unit index instead."""
    return not _normalise(str(url)).startswith(("http://", "https://"))


def find_markers(root: zarr.Group, url: str, num_shards: int, at_once: int = 64) -> list[str]:
    """Names of complete units: listed where the store can list, else from the per-shard unit indexes (read
    ``at_once`` at a time: one round trip for a cache's shards, not one per shard)."""
    if can_list(url):
        return list_markers(root)
    return sorted(name for units in read_indexes(root, range(num_shards), at_once) for name in units or [])


def list_markers(root: zarr.Group) -> list[str]:
    """Names of complete units: those whose marker object exists (an empty folder left by a crash between
    mkdir and rename does not count)."""
    prefix = f"{root.store_path.path}/{UNITS_GROUP}/".lstrip("/")

    async def _ls() -> list[str]:
        return [key async for key in root.store.list_prefix(prefix)]

    names = (key[len(prefix):].rsplit("/", 1) for key in sync(_ls()))
    return sorted(parts[0] for parts in names if len(parts) == 2 and parts[1] == "zarr.json")


def delete_marker(root: zarr.Group, name: str) -> None:
    """Withdraw a unit's claim to be complete (before it is rewritten): one object deleted."""
    sync(root.store.delete(_marker_key(root, name)))


def delete_object(root: zarr.Group, key: str) -> None:
    """Delete one stored object, ``key`` relative to the root group (absent: nothing to do)."""
    sync(root.store.delete(f"{root.store_path.path}/{key}".lstrip("/")))


def _marker_key(root: zarr.Group, name: str) -> str:
    return f"{root.store_path.path}/{UNITS_GROUP}/{name}/zarr.json".lstrip("/")


def _index_key(root: zarr.Group, shard: int) -> str:
    return f"{root.store_path.path}/{UNIT_INDEX_GROUP}/s{shard:06d}/zarr.json".lstrip("/")


def read_index(root: zarr.Group, shard: int) -> list[str] | None:
    """The shard's unit index (names of its complete units), None where there is none (caches from before it)
    or what is stored is not one (a stranger's edit): readers then see the shard's units as missing, writers
    rewrite it, verify warns."""
    return _parse_index(sync(root.store.get(_index_key(root, shard), default_buffer_prototype())))


def read_indexes(root: zarr.Group, shards: Iterable[int], at_once: int = 64) -> list[list[str] | None]:
    """:func:`read_index` of many shards, in their order, ``at_once`` requests in flight."""
    keys = [_index_key(root, shard) for shard in shards]
    return [_parse_index(buf) for buf in sync(_get_all(root, keys, at_once))]


async def _get_all(root: zarr.Group, keys: list[str], at_once: int) -> list[Any]:
    """The stored objects at ``keys`` (store keys), None where absent, at most ``at_once`` requests in flight."""
    limit = asyncio.Semaphore(at_once)

    async def one(key: str) -> Any:
        async with limit:
            return await root.store.get(key, default_buffer_prototype())

    return list(await asyncio.gather(*(one(key) for key in keys)))


def _parse_index(buf: Any) -> list[str] | None:
    try:
        units = None if buf is None else json.loads(buf.to_bytes())["attributes"]["units"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return list(units) if isinstance(units, list) and all(isinstance(u, str) for u in units) else None


def write_index(root: zarr.Group, shard: int, names: list[str]) -> None:
    """Replace the shard's unit index (one object, like a marker). Writers keep it a subset of the markers:
    a unit enters after its marker is written and leaves before its marker is deleted, so a crash can leave a
    complete unit unlisted (rewritten on the next run) but never list an unwritten one."""
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"units": sorted(set(names))}}
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode())
    sync(root.store.set(_index_key(root, shard), buf))


def read_marker(root: zarr.Group, name: str) -> dict[str, Any]:
    """A unit marker's attributes; CacheError where it is missing or not a group document with attributes."""
    return sync(get_marker(root, name))


async def get_marker(root: zarr.Group, name: str) -> dict[str, Any]:
    """:func:`read_marker`, awaitable (to read many markers and arrays in one round trip)."""
    key = _marker_key(root, name)
    doc = parse_document(key, await root.store.get(key, default_buffer_prototype()))
    if doc is None:
        raise CacheError(f"Unit marker {name} is missing.")
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise CacheError(f"Unit marker {name} is not a zarr group document with attributes; the cache is damaged.")
    return attrs


def store_nbytes(url: str) -> int | None:
    """Bytes on disk of a local cache (None for remote stores)."""
    path = local_path(str(url))
    if path is None or not os.path.isdir(path):
        return None
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def read_document(root: zarr.Group, key: str) -> Any:
    """The parsed JSON of the object at ``key`` (relative to the root group), None where there is none."""
    buf = sync(root.store.get(f"{root.store_path.path}/{key}".lstrip("/"), default_buffer_prototype()))
    return parse_document(key, buf)


def read_documents(root: zarr.Group, keys: list[str], at_once: int = 64) -> dict[str, Any]:
    """:func:`read_document` of many keys, ``at_once`` requests in flight: a remote cache's thousands of
    markers in seconds rather than one round trip each."""
    return {key: parse_document(key, buf) for key, buf in zip(keys, read_objects(root, keys, at_once))}


def read_objects(root: zarr.Group, keys: list[str], at_once: int = 64) -> list[Any]:
    """The raw stored objects at ``keys`` (relative to the root group), None where absent, in order, ``at_once``
    requests in flight."""
    return sync(_get_all(root, [f"{root.store_path.path}/{key}".lstrip("/") for key in keys], at_once))


def parse_document(key: str, buf: Any) -> Any:
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than Python parses
        raise CacheError(f"{key} in the cache is not a JSON document ({e}); the cache is damaged.") from None
