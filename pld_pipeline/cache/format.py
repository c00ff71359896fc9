"""The cache's on-disk vocabulary: metadata records, array paths, unit marker names, codecs.

Everything here is documented field by field in docs/cache-format.md; keep the two in lockstep.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FORMAT_NAME = "pld-cache"
FORMAT_VERSION = 1
ROOT_ATTR = "pld_cache"  # the root group's attribute holding CacheMeta

KEY_ARRAY = "samples/key"  # uint8 [R, key_bytes], UTF-8 key, zero padded
LABEL_ARRAY = "samples/label"  # int32 [R], -1 where no sample
STATUS_ARRAY = "samples/status"  # uint8 [R], see SampleStatus
PARAMS_ARRAY = "views/params"  # int32 [R, V, 5]: top, left, height, width, flip
TEACHER_ARRAYS = ("topk_idx", "topk_dlogp", "top1_logp", "label_logp", "logz")
UNITS_GROUP = "units"

#: Clamp for stored log-probabilities: float16's finite range; such classes have probability exp(-6e4) = 0.
MIN_LOGP = -60000.0


def split_logp(topk_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored form of top-k log-probs: float16 deltas from the top-1 (<= 0) and the top-1 in float32.

    float16 keeps ~11 bits relative to a value's magnitude, so storing deltas puts the precision where the
    weight is: a class's weight error is at most p_T(top) * max_x(x e^-x) * 2^-11 < 2e-4 at any temperature,
    where float16 absolute log-probs would exceed 1e-3 for unconfident teachers at T < 1.
    """
    logp = np.asarray(topk_logp, dtype=np.float32)
    top1 = logp[..., 0]
    dlogp = np.maximum(logp - top1[..., None], MIN_LOGP).astype(np.float16)
    return dlogp, top1


def join_logp(topk_dlogp: np.ndarray, top1_logp: np.ndarray) -> np.ndarray:
    """Top-k log-probs (float32) from their stored form."""
    return np.asarray(top1_logp, dtype=np.float32)[..., None] + np.asarray(topk_dlogp, dtype=np.float32)


class SampleStatus:
    """``samples/status`` values: why a row holds or lacks a sample."""
    EMPTY = 0  # padding row beyond the shard's sample count
    OK = 1
    SKIPPED = 2  # undecodable sample skipped under --on-bad-sample skip; distill skips it too


class CacheError(ValueError):
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


def teacher_array(tid: str, name: str) -> str:
    return f"teachers/{tid}/{name}"


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
        if int(d.get("version", -1)) > FORMAT_VERSION:
            raise CacheError(
                f"Cache format version {d['version']} is newer than this pld-pipeline reads ({FORMAT_VERSION}); "
                "upgrade pld-pipeline.")
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
    shard: int
    kind: str  # samples | views | teacher
    teacher: str | None = None
    views: tuple[int, int] | None = None


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

