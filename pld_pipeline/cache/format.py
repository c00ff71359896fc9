"""The cache's vocabulary: metadata records, unit names and their bindings (the arrays: schema.py).

Everything here is documented field by field in docs/cache-format.md; keep the two in lockstep.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import PldError
from ..views import MIXED_FIELDS, PLAIN_WIDTH

FORMAT_NAME = "pld-cache"
FORMAT_VERSION = 2
#: Caches whose recipe mixes views (CutMix/Mixup): 17 integers per view instead of 5, ``label_logp`` of a mixed
#: view holds its dominant label's. Written as v3 so that a reader from before mixed views refuses them.
MIXED_FORMAT_VERSION = 3
ROOT_ATTR = "pld_cache"  # the root group's attribute holding CacheMeta
#: Set on the root group while ``create_or_extend`` builds a new cache, replaced by ROOT_ATTR when it is done: a
#: rerun recognises (and restarts) a creation that was killed, and readers refuse it.
CREATING_ATTR = "pld_cache_creating"

DIGEST_BYTES = 16  # samples/digest: blake2b-128 (sample_digest)
UNITS_GROUP = "units"
#: Per-shard lists of complete units (``unit_index/s{shard:06d}``), for readers that cannot list folders.
UNIT_INDEX_GROUP = "unit_index"

#: Clamp for stored log-probabilities: float16's finite range; such classes have probability exp(-6e4) = 0.
MIN_LOGP = -60000.0


class SampleStatus:
    """``samples/status`` values: why a row holds or lacks a sample."""
    EMPTY = 0  # padding row beyond the shard's sample count
    OK = 1
    SKIPPED = 2  # undecodable sample skipped under --on-bad-sample skip; distill skips it too


class CacheError(PldError):
    """A cache that does not match what the caller expects, or is incomplete or corrupt."""


_TEACHER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def teacher_id_from_name(name: str) -> str:
    """A path-safe id for a teacher name (``vit_base.augreg`` -> ``vit_base_augreg``)."""
    tid = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64]
    if not tid:
        raise CacheError(f"Cannot derive a teacher id from {name!r}; pass an explicit name of letters, digits, _ or -.")
    return tid


def check_teacher_id(tid: str) -> str:
    if not _TEACHER_ID.match(tid):
        raise CacheError(f"Teacher id {tid!r} must be 1-64 letters, digits, '_' or '-'.")
    return tid


def sample_digest(sample: dict[str, Any]) -> bytes:
    """Identity of one webdataset sample's content: blake2b-128 over its fields in sorted name order, each as
    ``name (UTF-8) | 0x00 | len (uint64 LE) | bytes``. Fields whose name starts with ``__`` (key, url) are not
    content. An edited, re-encoded or swapped sample changes it; the key does not."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name in sorted(k for k in sample if not k.startswith("__")):
        data = sample[name]
        data = data if isinstance(data, (bytes, bytearray)) else str(data).encode("utf-8")
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


@dataclass(frozen=True)
class ShardRecord:
    """One input data shard: identity (content hashes) and size, in cache order."""
    name: str  # basename, e.g. train-000012.tar
    url: str  # where it was read from when the cache was made
    nsamples: int
    nbytes: int
    sha256: str  # of the whole file
    quick_hash: str  # sha256 of (size, first MiB, last MiB): cheap identity check at read time

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TeacherRecord:
    """One cached teacher: where it came from and what was stored of it."""
    id: str
    source: str  # timm name or module.path:factory
    checkpoint: str | None  # file name as given (informational)
    checkpoint_sha256: str | None  # identity of the weights; None = random init / source-defined weights
    preprocessing: dict[str, Any]  # input_size, mean, std, interpolation
    k: int  # classes stored per view (k == num_classes: full mode)
    temperatures: tuple[float, ...]  # grid of logz columns, in order
    index_dtype: str
    num_params: int | None = None
    precision: str = "fp32"  # the teacher's forward: fp32, or bf16 (autocast; logits rounded, opt-in)
    pretrained: dict[str, Any] | None = None  # hub weights loaded: hub_id, tag, revision, file, sha256

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherRecord":
        d = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        d["temperatures"] = tuple(float(t) for t in d["temperatures"])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to extend this teacher rather than conflict with it."""
        d = self.to_dict()
        d.pop("num_params", None)
        d.pop("checkpoint", None)
        return d


@dataclass
class CacheMeta:
    """The root group's ``pld_cache`` attribute."""
    num_classes: int
    rows_per_shard: int
    key_bytes: int
    shards: list[ShardRecord]
    recipe: dict[str, Any]  # view recipe: name + parameters (see views.py)
    num_views: int
    seed: int
    teachers: dict[str, TeacherRecord] = field(default_factory=dict)
    class_names: list[str] | None = None
    created_by: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.recipe.get("mix") is not None:
            self.version = max(self.version, MIXED_FORMAT_VERSION)

    @property
    def params_width(self) -> int:
        """Integers stored per view (``views/params``' last dimension)."""
        return len(MIXED_FIELDS) if self.recipe.get("mix") is not None else PLAIN_WIDTH

    @property
    def num_rows(self) -> int:
        return self.rows_per_shard * len(self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "version": self.version, "created_by": self.created_by,
            "num_classes": self.num_classes, "class_names": self.class_names,
            "rows_per_shard": self.rows_per_shard, "key_bytes": self.key_bytes,
            "shards": [asdict(s) for s in self.shards],
            "views": {"recipe": self.recipe, "num_views": self.num_views, "seed": self.seed},
            "teachers": {tid: t.to_dict() for tid, t in self.teachers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CacheMeta":
        if d.get("format") != FORMAT_NAME:
            raise CacheError(f"Not a {FORMAT_NAME} cache (format={d.get('format')!r}).")
        if int(d.get("version", -1)) < FORMAT_VERSION:
            raise CacheError(
                f"Cache format v{d.get('version')} predates the integrity records (per-unit metadata binding, sample "
                f"digests) that this pld-pipeline checks on every read (v{FORMAT_VERSION}); re-create it by rerunning "
                "its `pld cache-teacher` command with --overwrite.")
        if int(d.get("version", -1)) > MIXED_FORMAT_VERSION:
            raise CacheError(
                f"Cache format version {d['version']} is newer than this pld-pipeline reads ({MIXED_FORMAT_VERSION}); "
                "upgrade pld-pipeline.")
        if (int(d["version"]) == MIXED_FORMAT_VERSION) != (d["views"]["recipe"].get("mix") is not None):
            raise CacheError(f"Cache format v{d['version']} and its view recipe disagree on mixed views (edited "
                             "metadata?); re-create it with `pld cache-teacher --overwrite`.")
        return cls(
            num_classes=int(d["num_classes"]), rows_per_shard=int(d["rows_per_shard"]),
            key_bytes=int(d["key_bytes"]), shards=[ShardRecord.from_dict(s) for s in d["shards"]],
            recipe=dict(d["views"]["recipe"]), num_views=int(d["views"]["num_views"]),
            seed=int(d["views"]["seed"]),
            teachers={tid: TeacherRecord.from_dict(t) for tid, t in d.get("teachers", {}).items()},
            class_names=d.get("class_names"), created_by=dict(d.get("created_by", {})),
            format=d["format"], version=int(d["version"]),
        )


# Unit markers: leaf groups under units/ named
#   s{shard:06d}.samples               keys, labels, status of the shard's rows
#   s{shard:06d}.views.{a}-{b}          view params for views [a, b)
#   s{shard:06d}.teacher.{id}.{a}-{b}   one teacher's arrays for views [a, b)
# A marker is written (atomically) only after its data, so its presence means the unit is complete.

def samples_unit(shard: int) -> str:
    return f"s{shard:06d}.samples"


def views_unit(shard: int, views: tuple[int, int]) -> str:
    return f"s{shard:06d}.views.{views[0]}-{views[1]}"


def teacher_unit(shard: int, tid: str, views: tuple[int, int]) -> str:
    return f"s{shard:06d}.teacher.{tid}.{views[0]}-{views[1]}"


@dataclass(frozen=True)
class UnitName:
    """A typed unit name: what a marker's name says (``parse_unit_name`` reads one, ``name`` writes it)."""
    shard: int
    kind: str  # samples | views | teacher
    teacher: str | None = None
    views: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        if self.kind == "samples":
            return samples_unit(self.shard)
        if self.kind == "views":
            return views_unit(self.shard, self.views)
        return teacher_unit(self.shard, self.teacher, self.views)


def parse_unit_name(name: str) -> UnitName | None:
    parts = name.split(".")
    if not parts or not re.fullmatch(r"s\d{6}", parts[0]):
        return None
    shard = int(parts[0][1:])
    try:
        if parts[1:] == ["samples"]:
            return UnitName(shard, "samples")
        if len(parts) == 3 and parts[1] == "views":
            a, b = (int(x) for x in parts[2].split("-"))
            return UnitName(shard, "views", views=(a, b))
        if len(parts) == 4 and parts[1] == "teacher":
            a, b = (int(x) for x in parts[3].split("-"))
            return UnitName(shard, "teacher", teacher=parts[2], views=(a, b))
    except ValueError:
        return None
    return None



def units_by_shard(names: list[str], shards) -> dict[int, set[str]]:
    """The given shards' unit names among ``names`` (each shard present, possibly with none): what a shard's
    unit index must list."""
    by_shard: dict[int, set[str]] = {s: set() for s in shards}
    for name in names:
        unit = parse_unit_name(name)
        if unit is not None and unit.shard in by_shard:
            by_shard[unit.shard].add(name)
    return by_shard


#: Teacher-record fields added after format v2 was first written, left out of the binding while at their default,
#: so a record written before the field existed (and read back with the default) keeps its binding.
_UNBOUND_DEFAULTS: dict[str, Any] = {"precision": "fp32", "pretrained": None}


def unit_binding(name: str, meta: CacheMeta) -> str:
    """sha256 of what gives a unit's bytes their meaning, recorded in its marker: the unit's own name (so a
    marker cannot be moved), the format version, classes, row layout, its shard's identity, the view recipe and
    seed, and for teacher units the teacher's whole record (k, temperature grid, index dtype, preprocessing,
    weights). An edit of any of these root attributes no longer matches the markers, and every reader refuses.
    Encoded as canonical JSON (sorted keys, no spaces, ``ensure_ascii``); teacher fields at their default in
    ``_UNBOUND_DEFAULTS`` are left out."""
    unit = parse_unit_name(name)
    if unit is None or not 0 <= unit.shard < len(meta.shards):
        raise CacheError(f"Unit {name!r} names no shard of this cache.")
    shard = asdict(meta.shards[unit.shard])
    shard.pop("url")  # where it was read from is informational; content hashes identify it
    doc: dict[str, Any] = {
        "unit": name, "format": meta.format, "version": meta.version, "num_classes": meta.num_classes,
        "class_names": meta.class_names, "rows_per_shard": meta.rows_per_shard, "key_bytes": meta.key_bytes,
        "shard": shard, "recipe": meta.recipe, "seed": meta.seed}
    if unit.kind == "teacher":
        if unit.teacher not in meta.teachers:
            raise CacheError(f"Unit {name!r} belongs to teacher '{unit.teacher}', which the cache does not list.")
        record = meta.teachers[unit.teacher].to_dict()
        doc["teacher"] = {k: v for k, v in record.items() if k not in _UNBOUND_DEFAULTS or v != _UNBOUND_DEFAULTS[k]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def near_chance(accuracy: float | None, num_classes: int) -> bool:
    """A teacher whose top-1 on its own cached views is within 10% of the way from chance to perfect: almost
    always wrong weights or wrong preprocessing (input size, mean/std), not a weak teacher."""
    if accuracy is None or num_classes < 2:
        return False
    chance = 1.0 / num_classes
    return accuracy < chance + 0.1 * (1.0 - chance)
