"""Where a cache writer may write: only inside the cache the user named, never through a planted symlink, and
``--overwrite`` replaces only a pld cache.

A shared cache is a stranger's folder: a symlink planted at ``unit_index/`` or ``claims/`` would steer a repair
run's writes anywhere the user can write, so a writer opens a local cache only when nothing in it is a symlink.
``--overwrite`` (zarr's ``mode='w'`` deletes everything at the location) is allowed only on a pld cache holding
nothing but what pld writes; a folder or zarr group with anything else (the user's notes) is refused, for every
URL scheme (plain paths, ``file://``, ``local://``, ``s3://``, ...).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from .format import CREATING_ATTR, ROOT_ATTR, UNIT_INDEX_GROUP, UNITS_GROUP, CacheError
from .store import local_path

#: Top-level entries of a pld cache (claims.CLAIMS_GROUP, key_index.GROUP and progress.GROUP included).
PLD_ENTRIES = {"zarr.json", "samples", "views", "teachers", UNITS_GROUP, UNIT_INDEX_GROUP, "key_index", "claims",
               "progress"}
#: Every file a pld cache holds, relative to its root: zarr documents, chunk objects (``.../c/0/3``), claims and
#: progress records (``s000003.json``), and
#: the temporary files of zarr's local writes that a killed writer leaves (``NAME.<32 hex>.partial``).
PLD_FILE = re.compile(r"(?:[\w.-]+/)*(?:zarr\.json|c(?:/\d+)+|s\d{6}\.json"
                      r"|(?:zarr|c(?:/\d+)+|s\d{6})\.[0-9a-f]{32}\.partial)")


def refuse_symlinks(url: str) -> None:
    """Refuse (CacheError) a local cache holding any symlink: a writer would follow it out of the cache."""
    path = local_path(url)
    if path is None or not os.path.isdir(path):
        return
    for folder, dirs, files in os.walk(path):  # os.walk does not descend into symlinked folders
        for name in dirs + files:
            if os.path.islink(os.path.join(folder, name)):
                rel = os.path.relpath(os.path.join(folder, name), path)
                raise CacheError(f"{url} holds a symlink ({rel}); pld never writes through one (it could point "
                                 "anywhere). Remove it, or write to a fresh --out.")


def _fs(url: str) -> tuple[Any, str]:
    import fsspec
    path = local_path(url)
    if path is not None:
        return fsspec.filesystem("file"), os.path.abspath(path)
    return fsspec.core.url_to_fs(url)


def _entries(fs: Any, path: str) -> list[str] | None:
    """Names directly under ``path``, None where nothing is there."""
    try:
        if not fs.isdir(path):
            return None if not fs.exists(path) else [os.path.basename(path)]
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if p.rstrip("/") != path.rstrip("/"))
    except FileNotFoundError:
        return None


def check_replaceable(url: str) -> None:
    """Before ``--overwrite`` deletes what is at ``url``: it must be nothing, or a pld cache and nothing else."""
    local = local_path(url)
    if local is not None and os.path.islink(local.rstrip("/")):
        raise CacheError(f"{url} is a symbolic link; --overwrite does not delete through one: pass the folder it "
                         f"points to ({os.path.realpath(local)}) if that is the cache to replace.")
    fs, path = _fs(url)
    names = _entries(fs, path)
    if not names:
        return
    others = sorted(set(names) - PLD_ENTRIES)
    root = None
    local = local_path(url)
    if "zarr.json" in names and (local is None or os.path.isfile(os.path.join(local, "zarr.json"))):  # not a FIFO
        try:
            with fs.open(f"{path.rstrip('/')}/zarr.json", "rb") as f:
                root = json.loads(f.read(1 << 26))
        except (OSError, ValueError, RecursionError):
            root = None
    attrs = root.get("attributes") if isinstance(root, dict) else None
    if not isinstance(attrs, dict) or not ({ROOT_ATTR, CREATING_ATTR} & set(attrs)):
        raise _not_a_cache(url, names)
    if not others:  # every file below, too: a user's notes.txt inside teachers/ is not pld's to delete
        base = path.rstrip("/") + "/"
        others = [f[len(base):] for f in fs.find(path) if not PLD_FILE.fullmatch(f[len(base):])]
    if others:
        raise CacheError(f"{url} is a pld cache that also holds {', '.join(sorted(others)[:3])}: --overwrite deletes "
                         "only a pld cache and nothing else; move those out, or choose another --out.")


def _not_a_cache(url: str, names: list[str]) -> CacheError:
    return CacheError(f"{url} is a folder with other files in it, not a cache ({', '.join(names[:3])}); choose "
                      "another --out (it is never emptied, not even with --overwrite).")


def check_empty(url: str) -> None:
    """Before a new cache is created at ``url`` (no --overwrite): nothing may be there that pld would delete."""
    fs, path = _fs(url)
    names = _entries(fs, path)
    if names:
        raise _not_a_cache(url, names)
