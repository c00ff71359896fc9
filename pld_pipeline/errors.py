"""What pld can explain: every failure a user can fix ends in one line naming the problem and the fix.

The library raises :class:`PldError` (or a subclass: ``CacheError``, ``DataError``, ...) where it knows what went
wrong. Failures that reach pld from outside it (a full or read-only disk, the network, a parse error in a file)
are standard exceptions: :func:`explain` turns the known ones into the same one line, so the CLI needs one catch.
Anything :func:`explain` does not know is a bug and is shown as one: ``internal error: TYPE: msg``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import re
from typing import Any, Iterator

DEBUG_HINT = "rerun with PLD_DEBUG=1 for the traceback"


class PldError(ValueError):
    """Bad input or a bad environment: ``str(e)`` is one line naming the problem and the fix. A ValueError, so
    callers that catch bad input as ValueError keep working."""

    _known: dict[str, type["PldError"]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PldError._known[cls.__name__] = cls


class RemoteError(PldError):
    """A remote store or host that cannot be reached or refuses access."""


class MetadataError(PldError):
    """A JSON/TOML file (cache, run or sweep folder metadata, a sweep file) that is malformed or lacks a field."""


class WriteError(PldError):
    """A write that the file system refused (full, read-only, a symlink where pld writes)."""


def rebuild(type_name: str, message: str) -> Exception | None:
    """The pld error named ``type_name`` carrying ``message``: a DataLoader worker's error, which torch could not
    re-create in the main process (its constructor takes more than one message), keeps its type and message."""
    cls = PldError if type_name == "PldError" else PldError._known.get(type_name)
    if cls is None and type_name in _NETWORK_TYPES:  # torch cannot re-create the client libraries' errors either
        return RemoteError(f"{message} ({type_name} in a data-loading worker); check the network, the host and "
                           "your credentials")
    if cls is None:
        return None
    exc = cls.__new__(cls, message)  # not __init__: subclasses may build their message from several fields
    exc.args = (message,)
    return exc


_NETWORK_TYPES = {"ClientConnectorError", "ClientConnectorDNSError", "ClientResponseError", "ServerTimeoutError",
                  "ServerDisconnectedError", "ClientOSError", "NoCredentialsError", "EndpointConnectionError",
                  "ConnectTimeoutError", "ReadTimeoutError", "FSTimeoutError", "ConnectionRefusedError",
                  "ConnectionResetError", "TimeoutError"}
_ERRNO = re.compile(r"^\[Errno (\d+)\] (.*?)(?:: '(.*)')?$", re.S)


def rebuild_os_error(message: str) -> OSError | None:
    """``[Errno 28] No space left on device: 'path'`` (an OSError's text, as a worker reports it) as the OSError."""
    m = _ERRNO.match(message)
    return None if m is None else OSError(int(m.group(1)), m.group(2), m.group(3))


def _names(e: BaseException) -> set[str]:
    return {f"{c.__module__.split('.')[0]}.{c.__name__}" for c in type(e).__mro__}


def _network(e: BaseException) -> str | None:
    """What went wrong reaching a host, for the network errors of aiohttp (fsspec's HTTP), botocore (s3fs),
    sockets and fsspec; None for anything else. Matched by name so no client library is imported here."""
    names = _names(e)
    status = getattr(e, "status", None)
    if "aiohttp.ClientConnectorDNSError" in names or "socket.gaierror" in names:
        return f"host not found (DNS): {e}; check the URL's host name and the network"
    if "aiohttp.ClientResponseError" in names and isinstance(status, int):
        what = {401: "authentication required", 403: "access denied", 404: "not found"}.get(status, "refused")
        return f"HTTP {status} ({what}); check the URL and your access to it"
    if "aiohttp.ClientConnectorError" in names or isinstance(e, (ConnectionError,)):
        return f"cannot connect: {e}; check that the host is up and the URL's host and port"
    if names & {"botocore.NoCredentialsError", "botocore.PartialCredentialsError"}:
        return ("no S3 credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or read a "
                "public bucket anonymously")
    if names & {"botocore.EndpointConnectionError", "botocore.ConnectTimeoutError", "botocore.ReadTimeoutError"}:
        return f"cannot reach the S3 endpoint: {e}; check the endpoint URL and the network"
    if isinstance(e, TimeoutError) or names & {"fsspec.FSTimeoutError", "aiohttp.ServerTimeoutError"}:
        return f"timed out ({type(e).__name__}{': ' + str(e) if str(e) else ''}); check the network or retry"
    return None


def _os_error(e: OSError) -> str | None:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device writing{where}; free space there or choose another location"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded writing{where}; free space there or choose another location"
    if e.errno == errno.EROFS:
        return f"read-only file system:{where} cannot be written; choose a writable location"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; check its permissions or choose another location"
    if e.errno == errno.ELOOP:
        return f"{where.strip()} is a symbolic link; pld does not follow links where it writes: remove it"
    return None


def explain(e: BaseException) -> str | None:
    """One line for a failure the user can act on; None for one pld does not know (a bug)."""
    if isinstance(e, PldError):
        return str(e)
    net = _network(e)
    if net is not None:
        url = getattr(getattr(e, "request_info", None), "real_url", None)  # aiohttp's HTTP errors know the URL
        return f"{url}: {net}" if url else net
    if isinstance(e, OSError) and e.errno is not None:
        return _os_error(e) or str(e)
    if isinstance(e, json.JSONDecodeError):  # the library names the file where it reads one (files.read_json)
        return f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, ValueError):
        text = str(e)
        m = re.match(r"invalid literal for int\(\) with base \d+: (.*)|could not convert string to float: (.*)", text)
        if m:
            return f"{m.group(1) or m.group(2)} is not a number where one is expected"
        return text
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return str(e)
    return None


def one_line(e: BaseException) -> str:
    """``explain(e)``, or ``internal error: TYPE: msg`` with the hint to see the traceback; always one line."""
    text = explain(e)
    if text is None:
        text = f"internal error: {type(e).__name__}: {e}; {DEBUG_HINT}"
    return " ".join(text.split()) or type(e).__name__


def network_cause(e: BaseException, depth: int = 8) -> str | None:
    """What went wrong reaching a host, found anywhere in ``e``'s chain of causes (fsspec reports an unreachable
    host as FileNotFoundError from the client's error); None where no network error is in it."""
    while e is not None and depth > 0:
        net = _network(e)
        if net is not None:
            return net
        e, depth = e.__cause__ or e.__context__, depth - 1
    return None


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """Network failures while opening ``url`` name it: "URL: cannot connect: ..." instead of a client's traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only network errors (see _network) are translated, the rest re-raised
        cause = e.__cause__ or e.__context__
        # fsspec's HTTP filesystem reports a host it cannot reach as FileNotFoundError: the cause says why
        net = _network(e) or (_network(cause) if isinstance(e, FileNotFoundError) and cause is not None else None)
        if net is None:
            raise
        raise RemoteError(f"{url}: {net}") from e
