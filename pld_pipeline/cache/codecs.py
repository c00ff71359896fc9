"""What a cache's arrays may be encoded with, checked before any chunk is read, and a zstd that cannot inflate.

A cache from a stranger names its own codecs in each array's ``zarr.json``; zarr would instantiate whatever is
registered under that name (numcodecs' ``pickle`` runs its payload on decode). pld writes only the v3 core codecs
below (schema.compressors), so anything else is refused before zarr ever sees the array. And a zstd frame says
how big it inflates: :class:`BoundedZstd` decodes into a buffer of the chunk's own size, so a 66 KB frame that
claims 2 GiB is an error, not an allocation.
"""
from __future__ import annotations

import math
from typing import Any

import numcodecs.zstd
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer.cpu import as_numpy_array_wrapper

from .format import CacheError

#: Codecs pld writes: every array ``bytes -> zstd -> crc32c``, per-view arrays inside ``sharding_indexed``
#: (whose index is ``bytes -> crc32c``).
ARRAY_CODECS = ("bytes", "zstd", "crc32c")
INDEX_CODECS = ("bytes", "crc32c")
SHARDING = "sharding_indexed"


def check_codecs(codecs: Any, where: str) -> tuple[int, ...] | None:
    """Refuse (CacheError) any codec chain pld does not write; returns the inner chunk shape of a sharded
    array (None when unsharded), which the caller checks against the expected chunk."""
    if not isinstance(codecs, list) or not codecs or not all(isinstance(c, dict) for c in codecs):
        raise CacheError(f"{where}: malformed codec list; pld reads only caches it wrote (re-create it).")
    if len(codecs) == 1 and codecs[0].get("name") == SHARDING:
        conf = codecs[0].get("configuration") or {}
        _names(conf.get("codecs"), ARRAY_CODECS, where)
        _names(conf.get("index_codecs"), INDEX_CODECS, where)
        inner = conf.get("chunk_shape")
        if not isinstance(inner, list) or not all(isinstance(d, int) and d >= 0 for d in inner):
            raise CacheError(f"{where}: malformed sharding chunk shape; re-create the cache.")
        return tuple(inner)
    _names(codecs, ARRAY_CODECS, where)
    return None


def _names(codecs: Any, allowed: tuple[str, ...], where: str) -> None:
    names = [c.get("name") for c in codecs] if isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs) else None
    if names is None or tuple(names) != allowed:
        raise CacheError(f"{where}: codecs {names!r} are not the ones pld writes ({' -> '.join(allowed)}); refusing "
                         "to decode them (a foreign codec can run code or inflate without bound). Re-create the "
                         "cache with `pld cache-teacher`.")


class BoundedZstd(ZstdCodec):
    """zarr's zstd codec, decoding into a buffer of exactly the chunk's size: a frame that declares more is
    refused before anything is allocated; one that holds less leaves zeros that the unit's sha256 then refuses."""

    def _decode_sync(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        dtype = chunk_spec.dtype.to_native_dtype() if hasattr(chunk_spec.dtype, "to_native_dtype") else np.dtype(chunk_spec.dtype)
        size = math.prod(chunk_spec.shape) * dtype.itemsize
        return as_numpy_array_wrapper(lambda b: numcodecs.zstd.decompress(b, bytearray(size)), chunk_bytes,
                                      chunk_spec.prototype)


def install() -> None:
    """Make BoundedZstd the implementation zarr uses for ``zstd`` (zarr's own registry and config: encoding is
    unchanged, only decoding is bounded)."""
    zarr.registry.register_codec("zstd", BoundedZstd)
    zarr.config.set({"codecs.zstd": f"{BoundedZstd.__module__}.{BoundedZstd.__qualname__}"})
