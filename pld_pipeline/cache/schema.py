"""Every stored array, declared once: path, dtype, trailing shape, chunking, fill, meaning, encode and decode.

The writer creates arrays from these declarations, the cache reads and checks units by them, verify and inspect
name arrays through them, and docs/cache-format.md's array table is rendered from them (a test keeps the page and
this module in lockstep). Another storage layout later is a change here, not in five places.

Storage: every array uses the v3 core codecs (``bytes`` little-endian, ``zstd``, ``crc32c`` on every chunk). The
per-sample arrays have one chunk per data shard. The per-view arrays have one chunk per (data shard, view) and
store ``VIEWS_PER_OBJECT`` consecutive views' chunks in one object with zarr's sharding codec (core spec): an
ImageNet cache is ~10 objects per data shard instead of ~100, and a student epoch reads 4x faster from S3
(docs/results.md). Units still write whole chunks; an object's other chunks are kept as stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .format import DIGEST_BYTES, MIN_LOGP, CacheError, CacheMeta, SampleStatus, TeacherRecord, UnitName

#: Views whose chunks share one stored object (zarr shard) in the per-view arrays: views 16j..16j+15.
VIEWS_PER_OBJECT = 16


@dataclass(frozen=True)
class ArraySpec:
    """One stored array. ``trailing`` are the dimensions after the row (and view) axes: integers, or the names
    ``key_bytes``, ``W`` (integers per view), ``k`` and ``T`` (the teacher's top-k and temperature count)."""
    name: str
    unit: str  # samples | views | teacher: the unit kind that writes it
    dtype: str  # a numpy dtype, or "index": the teacher's index_dtype
    trailing: tuple[int | str, ...]
    fill: Any
    meaning: str

    @property
    def per_view(self) -> bool:
        return self.unit != "samples"

    def path(self, tid: str | None = None) -> str:
        if self.unit == "teacher":
            if tid is None:
                raise ValueError(f"teacher array {self.name} needs a teacher id")
            return f"teachers/{tid}/{self.name}"
        return f"{self.unit}/{self.name}"

    def template(self) -> str:
        return self.path("{id}") if self.unit == "teacher" else self.path()


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("key", "samples", "uint8", ("key_bytes",), 0, "the webdataset `__key__`, UTF-8, zero padded"),
    ArraySpec("label", "samples", "int32", (), -1, "true class index"),
    ArraySpec("status", "samples", "uint8", (), int(SampleStatus.EMPTY),
              "0 = padding row, 1 = sample OK, 2 = sample skipped (undecodable, `--on-bad-sample skip`)"),
    ArraySpec("digest", "samples", "uint8", (DIGEST_BYTES,), 0,
              "blake2b-128 of the sample's content (below); 0 for padding rows"),
    ArraySpec("params", "views", "int32", ("W",), 0,
              "realised view: `top, left, height, width, flip` (W = 5); v3: W = 17, the 5 then the mix fields of "
              "\"Mixed views\""),
    ArraySpec("topk_idx", "teacher", "index", ("k",), -1,
              "the k classes with the highest teacher logits, descending; ties by lower class index"),
    ArraySpec("top1_logp", "teacher", "float32", (), float("nan"),
              "`log_softmax(t)` (temperature 1) of the top class, `topk_idx[..., 0]`"),
    ArraySpec("topk_dlogp", "teacher", "float16", ("k",), float("nan"),
              "`log_softmax(t)` of each top-k class minus `top1_logp` (<= 0; entry 0 is 0), clamped at -60000"),
    ArraySpec("label_logp", "teacher", "float32", (), float("nan"),
              "`log_softmax(t)[label]` (temperature 1), clamped at -60000; for a mixed view (v3) the label is its "
              "dominant one"),
    ArraySpec("logz", "teacher", "float32", ("T",), float("nan"),
              "`logsumexp(log_softmax(t) / tau)` for each tau of `temperatures`"),
)
BY_KIND: dict[str, tuple[ArraySpec, ...]] = {kind: tuple(a for a in ARRAYS if a.unit == kind)
                                             for kind in ("samples", "views", "teacher")}
KEY, LABEL, STATUS, DIGEST = BY_KIND["samples"]
PARAMS = BY_KIND["views"][0]


def unit_paths(unit: UnitName) -> tuple[str, ...]:
    """The arrays a unit writes (and its marker checksums), in declaration order."""
    return tuple(spec.path(unit.teacher) for spec in BY_KIND[unit.kind])


def unit_region(unit: UnitName, rows_per_shard: int) -> tuple[slice, ...]:
    """The unit's region in each of its arrays: all of its shard's rows (padding included) x its views."""
    rows = slice(unit.shard * rows_per_shard, (unit.shard + 1) * rows_per_shard)
    return (rows,) if unit.views is None else (rows, slice(*unit.views))


def _dims(spec: ArraySpec, meta: CacheMeta, teacher: TeacherRecord | None) -> tuple[int, ...]:
    named = {"key_bytes": meta.key_bytes, "W": meta.params_width}
    if teacher is not None:
        named.update(k=teacher.k, T=len(teacher.temperatures))
    return tuple(d if isinstance(d, int) else named[d] for d in spec.trailing)


def dtype_of(spec: ArraySpec, teacher: TeacherRecord | None = None) -> np.dtype:
    return np.dtype(teacher.index_dtype if spec.dtype == "index" else spec.dtype)


def layout(spec: ArraySpec, meta: CacheMeta, teacher: TeacherRecord | None = None) -> dict[str, tuple[int, ...] | None]:
    """shape, chunks (one data shard's rows, one view) and shards (the stored objects; None: one chunk each)."""
    s, trailing = meta.rows_per_shard, _dims(spec, meta, teacher)
    if not spec.per_view:
        return {"shape": (meta.num_rows,) + trailing, "chunks": (s,) + trailing, "shards": None}
    return {"shape": (meta.num_rows, meta.num_views) + trailing, "chunks": (s, 1) + trailing,
            "shards": (s, VIEWS_PER_OBJECT) + trailing}


def compressors(level: int = 3) -> list:
    """zstd, then crc32c so every stored chunk carries a checksum: both are v3 core codecs."""
    return [ZstdCodec(level=level), Crc32cCodec()]


def create(root: zarr.Group, kind: str, meta: CacheMeta, teacher: TeacherRecord | None = None,
           level: int = 3) -> None:
    """Create the arrays of one unit kind (a teacher's for ``kind='teacher'``), replacing any left by a crash."""
    for spec in BY_KIND[kind]:
        root.create_array(spec.path(teacher and teacher.id), dtype=dtype_of(spec, teacher), fill_value=spec.fill,
                          compressors=compressors(level), overwrite=True, **layout(spec, meta, teacher))


def per_view_paths(meta: CacheMeta) -> list[str]:
    """Every array with a view axis: what grows when views are added."""
    return [PARAMS.path()] + [spec.path(tid) for tid in meta.teachers for spec in BY_KIND["teacher"]]


def spec_of(path: str) -> ArraySpec:
    """The declaration of the array at ``path`` (``samples/key``, ``teachers/r56/logz``, ...)."""
    parts = path.split("/")
    kind, name = ("teacher", parts[-1]) if parts[0] == "teachers" and len(parts) == 3 else (parts[0], parts[-1])
    for spec in BY_KIND.get(kind, ()):
        if spec.name == name and len(parts) == (3 if kind == "teacher" else 2):
            return spec
    raise KeyError(f"no array is declared at {path!r}")


def object_key(path: str, shard: int, view: int = 0, views_per_object: int = VIEWS_PER_OBJECT) -> str:
    """The stored object that holds a data shard's rows (and ``view``) of the array at ``path``, relative to the
    root: zarr v3's default chunk keys, ``c/`` then one index per dimension. ``views_per_object``: 16 for arrays
    created by this layout, 1 for caches written before it (one object per chunk)."""
    spec = spec_of(path)
    coords = [shard] + ([view // views_per_object] if spec.per_view else []) + [0] * len(spec.trailing)
    return f"{path}/c/" + "/".join(map(str, coords))


# -- encode (what a unit stores) and decode (what a reader gets back) ------------------------------------------

def encode_keys(keys: list[str], key_bytes: int) -> np.ndarray:
    encoded = np.zeros((len(keys), key_bytes), dtype=np.uint8)
    for i, key in enumerate(keys):
        raw = key.encode("utf-8")
        if len(raw) > key_bytes:
            raise CacheError(f"Key {key!r} is longer than the cache's key_bytes={key_bytes}.")
        encoded[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return encoded


def decode_keys(raw: np.ndarray) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in raw]


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



def encode_teacher(topk_idx: np.ndarray, topk_logp: np.ndarray, label_logp: np.ndarray,
                   logz: np.ndarray) -> dict[str, np.ndarray]:
    """A teacher unit's arrays by short name: top-k log-probs split into a float32 top-1 and float16 deltas."""
    dlogp, top1 = split_logp(topk_logp)
    return {"topk_idx": topk_idx, "top1_logp": top1, "topk_dlogp": dlogp,
            "label_logp": np.maximum(label_logp, MIN_LOGP), "logz": logz}


def decode_teacher(arrays: dict[str, np.ndarray], tid: str) -> dict[str, np.ndarray]:
    """A teacher unit's arrays (by path) -> ``topk_idx``, ``topk_logp`` (float32, joined), ``label_logp``,
    ``logz`` (all temperature columns)."""
    get = lambda name: arrays[f"teachers/{tid}/{name}"]  # noqa: E731
    return {"topk_idx": get("topk_idx"), "topk_logp": join_logp(get("topk_dlogp"), get("top1_logp")),
            "label_logp": get("label_logp"), "logz": get("logz")}


def spec_table() -> str:
    """docs/cache-format.md's array table, from the declarations above."""
    symbol = {"key_bytes": "key_bytes", "W": "W", "k": "k", "T": "T"}
    rows = ["| path | dtype | shape | chunk | object | fill | meaning |", "|---|---|---|---|---|---|---|"]
    for spec in ARRAYS:
        trailing = [symbol.get(d, str(d)) if isinstance(d, str) else str(d) for d in spec.trailing]
        shape = ", ".join(["R"] + (["V"] if spec.per_view else []) + trailing)
        chunk = ", ".join(["S"] + (["1"] if spec.per_view else []) + trailing)
        obj = ", ".join(["S", str(VIEWS_PER_OBJECT)] + trailing) if spec.per_view else "= chunk"
        fill = "NaN" if isinstance(spec.fill, float) and np.isnan(spec.fill) else str(spec.fill)
        dtype = "int16/int32" if spec.dtype == "index" else spec.dtype
        rows.append(f"| `{spec.template()}` | {dtype} | [{shape}] | [{chunk}] | "
                    f"{'[' + obj + ']' if spec.per_view else obj} | {fill} | {spec.meaning} |")
    return "\n".join(rows)
