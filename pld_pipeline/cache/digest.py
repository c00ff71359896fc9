"""The cache digest: one ``sha256:HEX`` string that consumers pin (docs/cache-format.md, "Cache digest").

Integrity checks (markers, bindings, crc32c) catch accidents; anyone with the public source can edit a cache and
re-sign every marker. The digest is what makes a shared cache *authentic*: the hash of every metadata document
a reader uses (the root group, every array's metadata, the key index, every unit marker), and through the
markers' per-array sha256 of every stored value. A team publishes it beside the cache; a consumer passes it as
``--expect-digest`` and pld refuses any other cache before training on it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import zarr

from ..options import parse_digest as parse  # noqa: F401 - the form check, shared with the command line
from .format import CacheError, CacheMeta, check_teacher_id
from .schema import ARRAYS
from .store import read_documents

PREFIX = "sha256:"
#: What the hashed document says it is: a later change of the definition changes this name.
DEFINITION = "pld-cache-digest/1"
KEY_INDEX_OBJECTS = ("key_index/zarr.json", "key_index/keys/zarr.json", "key_index/rows/zarr.json")


def object_keys(meta: CacheMeta, unit_names: list[str]) -> list[str]:
    """The stored objects the digest covers, relative to the cache root: the root group, every array the root
    metadata declares (each teacher's five), the key index, and the marker of every unit the reader found."""
    arrays = [spec.path() for spec in ARRAYS if spec.unit != "teacher"]
    arrays += [spec.path(check_teacher_id(tid)) for tid in sorted(meta.teachers) for spec in ARRAYS
               if spec.unit == "teacher"]
    return (["zarr.json"] + [f"{path}/zarr.json" for path in arrays] + list(KEY_INDEX_OBJECTS)
            + [f"units/{name}/zarr.json" for name in unit_names])


def documents(root: zarr.Group, meta: CacheMeta, unit_names: list[str], at_once: int = 64) -> dict[str, Any]:
    """Each covered object's parsed JSON (None where it does not exist), ``at_once`` reads in flight."""
    return read_documents(root, object_keys(meta, unit_names), at_once)


def attributes(doc: Any) -> dict[str, Any]:
    """A group document's attributes; {} for anything else (a hostile marker may be any JSON value)."""
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs if isinstance(attrs, dict) else {}


def of(docs: dict[str, Any]) -> str:
    """``sha256:`` + sha256 hex of the canonical JSON of ``{"definition", "objects"}``."""
    text = json.dumps({"definition": DEFINITION, "objects": docs}, sort_keys=True, separators=(",", ":"))
    return PREFIX + hashlib.sha256(text.encode("ascii")).hexdigest()


def require(expected: str, got: str, url: str) -> None:
    """Refuse a cache whose digest is not the pinned one, in one line."""
    if got != expected:
        raise CacheError(f"{url} has digest {got}, not the expected {expected}: its contents differ from the cache "
                         "that digest was published for. Nothing was trained on or written; get the published cache (or the "
                         "digest published for this one) from its owner, and do not train on it until they match.")
