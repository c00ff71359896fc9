"""`verify` (is every byte what its writer wrote, and does it make sense) and `inspect` (what is in it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import format as fmt
from .format import SampleStatus
from .reader import CacheReader
from .store import read_marker, store_nbytes
from .writer import block_sha256


@dataclass
class VerifyReport:
    url: str
    units_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "units_checked": self.units_checked, "problems": self.problems}


def _unit_region(reader: CacheReader, unit: fmt.UnitName) -> tuple:
    start = unit.shard * reader.meta.rows_per_shard
    rows = slice(start, start + reader.meta.rows_per_shard)
    return (rows,) if unit.views is None else (rows, slice(*unit.views))


def verify_cache(url: str) -> VerifyReport:
    """Check every unit: marker present for every shard/view/teacher, chunk checksums (crc32c, by zarr) and
    content checksums (sha256 in the marker) match, indices in range and distinct per row, values finite,
    the label log-prob consistent with the top-k entry for the label."""
    reader = CacheReader(url)
    report = VerifyReport(url)
    for missing in reader.missing_units(None):
        report.problems.append(f"incomplete: {missing}")
    for tid in reader.meta.teachers:
        for missing in reader.missing_units(tid):
            if ".teacher." in missing:
                report.problems.append(f"incomplete: {missing}")
    labels_by_shard: dict[int, np.ndarray] = {}
    status_by_shard: dict[int, np.ndarray] = {}
    for name in reader.markers:
        unit = fmt.parse_unit_name(name)
        if unit is None:
            report.problems.append(f"{name}: unrecognised unit name")
            continue
        report.units_checked += 1
        try:
            record = read_marker(reader.root, name)
        except Exception as e:  # noqa: BLE001 - a broken marker is a finding, not a crash
            report.problems.append(f"{name}: unreadable marker ({e})")
            continue
        region = _unit_region(reader, unit)
        blocks: dict[str, np.ndarray] = {}
        for path, want in record.get("checksums", {}).items():
            try:
                blocks[path] = np.asarray(reader.root[path][region])
            except Exception as e:  # noqa: BLE001 - crc32c mismatch, truncated or undecodable chunk
                report.problems.append(f"{name}: {path} unreadable ({type(e).__name__}: {e})")
                continue
            if block_sha256(blocks[path]) != want:
                report.problems.append(f"{name}: {path} content differs from what was written (checksum mismatch)")
        if unit.kind == "teacher" and len(blocks) == len(fmt.TEACHER_ARRAYS):
            if unit.shard not in labels_by_shard:
                labels_by_shard[unit.shard] = np.asarray(reader.root[fmt.LABEL_ARRAY][region[0]])
                status_by_shard[unit.shard] = np.asarray(reader.root[fmt.STATUS_ARRAY][region[0]])
            report.problems.extend(
                f"{name}: {p}" for p in _check_teacher_values(
                    reader, unit.teacher, blocks, labels_by_shard[unit.shard], status_by_shard[unit.shard]))
    return report


def _check_teacher_values(reader: CacheReader, tid: str, blocks: dict[str, np.ndarray], labels: np.ndarray,
                          status: np.ndarray) -> list[str]:
    ok = status == SampleStatus.OK
    idx = blocks[fmt.teacher_array(tid, "topk_idx")][ok].astype(np.int64)
    logp = fmt.join_logp(blocks[fmt.teacher_array(tid, "topk_dlogp")], blocks[fmt.teacher_array(tid, "top1_logp")])[ok]
    label_logp = blocks[fmt.teacher_array(tid, "label_logp")][ok].astype(np.float32)
    logz = blocks[fmt.teacher_array(tid, "logz")][ok]
    problems = []
    c = reader.meta.num_classes
    if idx.size and (idx.min() < 0 or idx.max() >= c):
        problems.append(f"class indices outside [0, {c})")
    if idx.size:
        s = np.sort(idx, axis=-1)
        if (s[..., 1:] == s[..., :-1]).any():
            problems.append("repeated class index within a row")
    for what, arr in (("topk_logp", logp), ("label_logp", label_logp), ("logz", logz)):
        if not np.isfinite(arr).all():
            problems.append(f"non-finite {what} values")
    if idx.size and np.isfinite(logp).all():
        if (np.diff(logp, axis=-1) > 1e-3).any():
            problems.append("top-k log-probs not in descending order")
        if (logp > 1e-3).any() or np.log(np.exp(logp.astype(np.float64)).sum(-1)).max() > 1e-2:
            problems.append("top-k probabilities sum above 1")
        is_label = idx == labels[ok][:, None, None]
        if is_label.any():
            # The top-k entry is a float16 delta from the top-1: it may differ by its rounding, |delta| * 2^-11.
            delta = np.abs(logp - logp[..., :1])[is_label]
            gap = np.abs(np.broadcast_to(label_logp[..., None], logp.shape)[is_label] - logp[is_label])
            if (gap > delta * 2.0 ** -10 + 1e-5).any():
                problems.append(f"label log-prob differs from its top-k entry by {gap.max():.3g}")
    return problems


def tail_mass_quantiles(reader: CacheReader, tid: str, max_shards: int = 8) -> dict[str, float]:
    """Teacher probability outside the stored top-k (temperature 1), over complete shards: how much
    of the PLD weight a given k drops, so users can choose k."""
    teacher = reader.teacher(tid)
    masses = []
    done = [s for s in range(len(reader.shards)) if reader.teacher_done.get((s, tid))][:max_shards]
    for shard in done:
        views = sorted(reader.teacher_done[(shard, tid)])
        rows = reader._rows(shard)
        region = (rows, slice(0, max(views) + 1))
        logp = fmt.join_logp(np.asarray(reader.root[fmt.teacher_array(tid, "topk_dlogp")][region]),
                             np.asarray(reader.root[fmt.teacher_array(tid, "top1_logp")][region]))
        status = np.asarray(reader.root[fmt.STATUS_ARRAY][rows])
        logp = logp[status == SampleStatus.OK][:, views]
        masses.append(np.clip(1.0 - np.exp(logp.astype(np.float64)).sum(-1), 0.0, 1.0).ravel())
    if not masses or teacher.k == reader.meta.num_classes:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0} if masses else {}
    m = np.concatenate(masses)
    return {"p50": float(np.quantile(m, 0.5)), "p90": float(np.quantile(m, 0.9)),
            "p99": float(np.quantile(m, 0.99)), "max": float(m.max())}


def inspect_cache(url: str) -> dict[str, Any]:
    """A summary for humans and scripts: teachers, classes, k, views, temperatures, completion, bytes."""
    reader = CacheReader(url)
    meta = reader.meta
    nbytes = store_nbytes(url)
    samples = sum(s.nsamples for s in meta.shards)
    teachers = {}
    for tid, t in meta.teachers.items():
        correct = count = 0
        for name in reader.markers:
            unit = fmt.parse_unit_name(name)
            if unit is not None and unit.kind == "teacher" and unit.teacher == tid:
                rec = read_marker(reader.root, name)
                correct += rec.get("correct", 0)
                count += rec.get("count", 0)
        shards_done = sum(1 for s in range(len(meta.shards))
                          if set(range(meta.num_views)) <= reader.teacher_done.get((s, tid), set()))
        teachers[tid] = {
            "source": t.source, "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
            "k": t.k, "full": t.k == meta.num_classes, "temperatures": list(t.temperatures),
            "shards_done": shards_done, "accuracy_on_cached_views": (correct / count) if count else None,
            "tail_mass": tail_mass_quantiles(reader, tid), "preprocessing": t.preprocessing,
        }
    shards_done = sum(1 for s in range(len(meta.shards))
                      if s in reader.samples_done and set(range(meta.num_views)) <= reader.views_done.get(s, set()))
    views_total = samples * meta.num_views
    return {
        "url": url, "format": f"{meta.format} v{meta.version}", "num_classes": meta.num_classes,
        "class_names": meta.class_names, "samples": samples, "shards_total": len(meta.shards),
        "shards_done": shards_done, "views": meta.num_views, "recipe": meta.recipe, "seed": meta.seed,
        "teachers": teachers, "bytes_on_disk": nbytes,
        "bytes_per_view": (nbytes / views_total) if nbytes and views_total else None,
        "created_by": meta.created_by,
    }
