"""Files pld writes into run and sweep folders: atomic, never through a symbolic link, full disks named.

A run killed mid-write must never leave a truncated summary.json, tracking.json or halving.json behind: the
next reader would fail on it (or, worse, a rerun would treat the run as something it is not). Sweep and run
folders are also shared and untrusted: a symlink planted at ``results.md`` must not make pld overwrite the file
it points to, so every write goes to a fresh temporary file in the same folder (``O_EXCL | O_NOFOLLOW``) that is
then renamed over the target (a rename replaces a link, it never writes through one).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from typing import Any

from .errors import MetadataError, WriteError

_CHUNK = 1 << 20
#: The most pld reads of one JSON or metrics file in a run, sweep or cache folder (its own are a few KiB)
MAX_READ_BYTES = 64 << 20
#: A run folder's files that others read without torch (pld report, the sweep's skip-finished-runs check).
STATE_FILE = "last_state.pt"
SUMMARY_FILE = "summary.json"  # written when a run ends (trained to the last epoch, or stopped by its sweep)


def refuse_link(path: str) -> None:
    """Refuse ``path`` if it is a symbolic link: pld never writes through one inside a folder it writes."""
    if os.path.islink(path):
        raise WriteError(f"{path} is a symbolic link; pld does not write through links in a run or sweep folder "
                         "(the file it points to was left unchanged): remove the link and rerun.")


def check_owner(path: str) -> None:
    """Refuse ``path`` unless the current user owns it: a file that decides what pld adopts (a sweep's id, a run's
    config, tracking ids) is taken only from the user's own files, not from a stranger who can write the folder."""
    uid = getattr(os, "getuid", None)
    if uid is not None and os.lstat(path).st_uid != uid():
        raise MetadataError(f"{path} belongs to another user; pld adopts only files you wrote: remove it, or run "
                            "into a new folder.")


def write_bytes(path: str, data: bytes) -> None:
    """``data`` at ``path``, atomically: a new temporary file beside it, then renamed over it."""
    refuse_link(path)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            while written < len(view):
                written += f.write(view[written:written + _CHUNK])
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WriteError(f"{path}: no space left on device after writing {written:,} of {len(data):,} bytes "
                             "(the previous file, if any, is unchanged); free space there or choose another "
                             "location.") from e
        if e.errno == errno.EROFS:
            raise WriteError(f"{path}: read-only file system, nothing written; choose a writable location.") from e
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, doc: Any, default: Any = None) -> None:
    """``doc`` as indented JSON at ``path`` (see :func:`write_bytes`)."""
    write_text(path, json.dumps(doc, indent=1, default=default))


_FIX = "restore it or remove the folder that holds it"


def open_regular(path: str, limit: int | None = None, fix: str = _FIX) -> int:
    """A file descriptor of ``path``, refused (MetadataError, one line) unless it is a regular file of at most
    ``limit`` bytes: opened without blocking (a FIFO never hangs), checked on the open file (fstat) before a byte
    is read, so /dev/zero, a FIFO or a sparse terabyte under a small file's name costs nothing."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MetadataError(f"{path}: not a regular file (a device, FIFO or folder); {fix}.")
        if limit is not None and info.st_size > limit:
            raise MetadataError(f"{path}: {info.st_size:,} bytes, over the {limit:,} pld reads of such a file; {fix}.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str, limit: int = MAX_READ_BYTES, fix: str = _FIX) -> bytes:
    """A small file a user names or a folder holds (run, sweep, cache, class map, sweep file, image folder), read
    through :func:`open_regular`: a stranger's folder can hold a sparse terabyte under a small file's name, or a
    link to a FIFO or a device. This is pld's one bounded reader of whole files."""
    with os.fdopen(open_regular(path, limit, fix), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise MetadataError(f"{path}: grew past {limit:,} bytes while being read; restore it or remove the folder "
                            "that holds it.")
    return data


def read_json(path: str) -> Any:
    """A JSON file from a run, sweep or cache folder (size-checked, :func:`read_bytes`); malformed JSON is
    refused naming the file and line."""
    data = read_bytes(path)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # Recursion: nested past Python's limit
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{getattr(e, 'msg', e)}{where}"
        raise MetadataError(f"{path}: not valid JSON ({why}); restore the file or "
                            "remove the folder that holds it.") from None


def json_field(doc: Any, path: str, *names: str, kind: type | tuple[type, ...] = object) -> Any:
    """``doc[names[0]][names[1]]...`` from a JSON file at ``path``, checked to be ``kind``: a missing or mistyped
    field is refused as ``FILE: field X missing/invalid``, not a KeyError/TypeError from deep inside pld."""
    value = doc
    for i, name in enumerate(names):
        if not isinstance(value, dict) or name not in value:
            raise MetadataError(f"{path}: field {'.'.join(names[:i + 1])} missing; restore the file or remove the "
                                "folder that holds it.")
        value = value[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are Python bools, and bool is an int: never a number where one is expected
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds and object not in kinds):
        raise MetadataError(f"{path}: field {'.'.join(names)} invalid (a {type(value).__name__}); restore the file "
                            "or remove the folder that holds it.")
    return value
