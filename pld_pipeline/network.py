"""HTTP(S) reads: every request has connect and read timeouts, and a redirect may not leave the host or scheme.

A cache or shard served over HTTP comes from a host pld does not trust: one that trickles a byte every few
seconds must not stall `pld verify` forever, and one that redirects to another host (or from https to http)
must not move the read somewhere the user never named. fsspec's HTTP file system takes its aiohttp session from
``get_client``; :func:`install` makes pld's the default for ``http`` and ``https`` (fsspec's own config), so
shards, caches and --cache-dir downloads all get it, in DataLoader workers too.
"""
from __future__ import annotations

import os
from typing import Any

from .errors import PldError

TIMEOUT_ENV = "PLD_HTTP_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


def timeout_s() -> float:
    """Seconds allowed to connect, between two reads of a response, and for one whole cache object
    (``PLD_HTTP_TIMEOUT``, default 60)."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise PldError(f"{TIMEOUT_ENV}={text!r} must be a positive number of seconds.")
    return value


class CrossOriginRedirect(PldError):
    """A host answered with a redirect to another host, port or scheme."""


async def _same_origin(session: Any, context: Any, params: Any) -> None:
    """aiohttp's redirect hook: refuse a ``Location`` on another scheme, host or port than the request's."""
    from yarl import URL
    old = params.url
    new = old.join(URL(params.response.headers.get("Location", "")))
    if (new.scheme, new.host, new.port) != (old.scheme, old.host, old.port):
        raise CrossOriginRedirect(f"{old}: the host redirected to {new.scheme}://{new.host}:{new.port}, another host "
                                  "or scheme; pld follows redirects only within one host: use the final URL if you "
                                  "trust it.")


async def get_client(loop: Any = None, **kwargs: Any) -> Any:
    """fsspec's ``get_client``: an aiohttp session with pld's timeouts and redirect rule."""
    import aiohttp
    t = timeout_s()
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_same_origin)
    kwargs.setdefault("timeout", aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t))
    return aiohttp.ClientSession(loop=loop, trace_configs=[trace], **kwargs)


def install() -> None:
    """Make :func:`get_client` fsspec's default for http and https (explicit storage options still win)."""
    import fsspec.config
    for proto in ("http", "https"):
        fsspec.config.conf.setdefault(proto, {}).setdefault("get_client", get_client)


install()
