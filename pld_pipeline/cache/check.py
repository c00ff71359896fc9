"""`verify` (is every byte what its writer wrote, and does it make sense) and `inspect` (what is in it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import format as fmt
from . import progress, schema, values
from .cache import Cache, first_error
from .format import CacheError, SampleStatus, UnitName
from .integrity import REPAIR, DamagedUnit
from .store import can_list, store_nbytes
from ..views import KIND_CUTMIX, KIND_MIXUP, KIND_PLAIN, LAMBDA_ONE, PLAIN_WIDTH, first_labels


@dataclass
class VerifyReport:
    url: str
    units_checked: int = 0
    problems: list[str] = field(default_factory=list)  # "<unit>: <what is wrong>", one per finding
    damaged: list[str] = field(default_factory=list)  # names of the units with problems
    warnings: list[str] = field(default_factory=list)  # intact, but probably not what was meant
    teacher_accuracy: dict[str, float | None] = field(default_factory=dict)  # top-1 on the intact units' views
    fix: str = REPAIR
    digest: str | None = None  # what consumers pin (None: a metadata document is not JSON; a problem says which)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "units_checked": self.units_checked, "problems": self.problems,
                "damaged_units": self.damaged, "warnings": self.warnings, "teacher_accuracy": self.teacher_accuracy,
                "fix": None if self.ok else self.fix, "digest": self.digest}


@dataclass
class UnitCheck:
    """One unit's findings; for intact teacher units also the teacher's top-1 hits over the unit's OK rows."""
    problems: list[str] = field(default_factory=list)
    correct: int = 0
    count: int = 0
    counted: bool = False  # correct/count recounted from the data (False: its samples or views unit is damaged)


def check_unit(cache: Cache, unit: UnitName, samples_of: dict[int, dict[str, np.ndarray] | None],
               read: dict[str, np.ndarray] | Exception | None = None) -> UnitCheck:
    """Integrity (checksums, metadata binding) and then meaning: labels in range, view boxes non-empty, teacher
    values valid and consistent with the shard's labels. ``samples_of`` caches each shard's checked samples
    unit (None where it is damaged or missing) across calls. No teacher forward: cheap enough for every rerun.
    ``read``: the unit's :meth:`Cache.read_units` result when already read (else it is read here)."""
    try:
        arrays = cache.read_unit(unit) if read is None else first_error([read])[0]
    except DamagedUnit as e:
        if unit.kind == "samples":
            samples_of[unit.shard] = None
        return UnitCheck([e.why])
    n = cache.meta.shards[unit.shard].nsamples
    if unit.kind == "samples":
        problems = values.sample_problems(arrays[schema.STATUS.path()], arrays[schema.LABEL.path()],
                                          arrays[schema.KEY.path()], n, cache.meta.num_classes)
        samples_of[unit.shard] = None if problems else {path: arr[:n] for path, arr in arrays.items()}
        return UnitCheck(problems)
    if unit.shard not in samples_of:
        try:
            samples_of[unit.shard] = cache.samples(unit.shard)
        except CacheError:
            samples_of[unit.shard] = None
    samples = samples_of[unit.shard]
    if samples is None:  # the samples unit reports its own damage; nothing to compare against here
        return UnitCheck()
    ok = samples[schema.STATUS.path()] == SampleStatus.OK
    if unit.kind == "views":
        return UnitCheck(_check_views(arrays[schema.PARAMS.path()][:n], ok, cache.meta.recipe.get("size", 0)))
    block = {path.rsplit("/", 1)[1]: arr[:n][ok] for path, arr in arrays.items()}
    labels = samples[schema.LABEL.path()][ok]
    if cache.meta.params_width != PLAIN_WIDTH:  # mixed views rank their dominant label first: compare with that
        a, b = unit.views
        try:
            params = cache.read(unit.shard, views=b).params[:, a:b]
        except CacheError:
            return UnitCheck()  # damaged or missing views units report themselves
        labels = first_labels(params, samples[schema.LABEL.path()])[ok]
    rec = cache.meta.teachers[unit.teacher]
    logp = schema.join_logp(block["topk_dlogp"], block["top1_logp"])
    problems = [f"{what} (view {unit.views[0] + view})" for what, view in values.teacher_problems(
        block["topk_idx"].astype(np.int64), logp, block["label_logp"].astype(np.float32), block["logz"],
        np.ones(len(logp), bool), cache.meta.num_classes, rec.temperatures, labels)]
    if problems:
        return UnitCheck(problems)
    first = labels if labels.ndim == 2 else labels[:, None]
    return UnitCheck(correct=int((block["topk_idx"][..., 0] == first).sum()), count=block["top1_logp"].size,
                     counted=True)


def _check_views(params: np.ndarray, ok: np.ndarray, size: int) -> list[str]:
    """Non-empty boxes, flips 0/1; for mixed views also kind, partner row (an earlier usable row), lambda and
    the CutMix box inside the view."""
    boxes = params[ok]
    bad = (boxes[..., 2] < 1) | (boxes[..., 3] < 1) | ~np.isin(boxes[..., 4], (0, 1))
    problems = [f"{int(bad.sum())} view(s) with an empty box or a flip other than 0/1"] if bad.any() else []
    if params.shape[-1] == PLAIN_WIDTH:
        return problems
    rows = np.arange(len(params))[ok][:, None]
    kind, partner, lam = boxes[..., 5], boxes[..., 6], boxes[..., 12]
    mixed = kind != KIND_PLAIN
    partner_ok = np.zeros_like(mixed)
    inside = (partner >= 0) & (partner < rows)
    partner_ok[inside] = ok[partner[inside]]
    bad = (~np.isin(kind, (KIND_PLAIN, KIND_MIXUP, KIND_CUTMIX)) | (lam < 0) | (lam > LAMBDA_ONE)
           | (mixed & (~partner_ok | (boxes[..., 9] < 1) | (boxes[..., 10] < 1) | ~np.isin(boxes[..., 11], (0, 1))))
           | ((kind == KIND_CUTMIX) & ((boxes[..., 13] < 0) | (boxes[..., 14] < 0) | (boxes[..., 15] < 0)
                                       | (boxes[..., 16] < 0) | (boxes[..., 13] + boxes[..., 15] > size)
                                       | (boxes[..., 14] + boxes[..., 16] > size))))
    if bad.any():
        problems.append(f"{int(bad.sum())} mixed view(s) with a bad kind, partner, lambda or CutMix box")
    return problems


def verify_cache(url: str, expect_digest: str | None = None) -> VerifyReport:
    """Check every unit (see :func:`check_unit`) and that every unit a reader needs exists. Reports every
    finding and never stops at the first; also warns about teachers whose top-1 is near chance.
    ``expect_digest``: refuse (CacheError) a cache whose digest differs, before checking anything else."""
    cache = Cache(url, expect_digest=expect_digest)
    report = VerifyReport(url, digest=_digest_or_none(cache))
    report.problems.extend(f"incomplete: {m}" for m in cache.missing_units(None))
    for tid in cache.meta.teachers:
        report.problems.extend(f"incomplete: {m}" for m in cache.missing_units(tid, data=False))
    for name in cache.strays:
        report.units_checked += 1
        report.problems.append(f"{name}: a unit name this cache cannot hold")
        report.damaged.append(name)
    samples_of: dict[int, dict[str, np.ndarray] | None] = {}
    hits = {tid: [0, 0] for tid in cache.meta.teachers}
    for unit, read, marker in _read_ahead(cache, cache.units()):
        report.units_checked += 1
        found = check_unit(cache, unit, samples_of, read)
        if found.problems:
            report.damaged.append(unit.name)
            report.problems.extend(f"{unit.name}: {p}" for p in found.problems)
        elif unit.kind == "teacher" and unit.teacher in hits:
            hits[unit.teacher][0] += found.correct
            hits[unit.teacher][1] += found.count
            rec = first_error([marker])[0]  # its counts are not checksummed: recounted here from the data
            recorded = (rec.get("correct"), rec.get("count")) if isinstance(rec, dict) else None
            if found.counted and recorded != (found.correct, found.count):
                report.damaged.append(unit.name)
                report.problems.append(f"{unit.name}: its marker records {recorded} top-1 hits/views, the data "
                                       f"gives ({found.correct}, {found.count})")
    for tid, (correct, count) in hits.items():
        report.teacher_accuracy[tid] = correct / count if count else None
        warning = chance_warning(tid, report.teacher_accuracy[tid], cache.meta.num_classes)
        if warning:
            report.warnings.append(warning)
    report.warnings.extend(index_warnings(cache))
    saved = progress.found(cache.root)
    if saved:  # a writer's notes, not data: nothing here is read as data (docs/cache-format.md, "Progress records")
        report.warnings.append(f"{len(saved)} shard(s) hold the saved rows of an interrupted `pld cache-teacher` "
                               f"({progress.GROUP}/{saved[0]}, ...): not data, never read; rerun the same command "
                               "to finish them.")
    index_problems = cache.check_key_index({s: a for s, a in samples_of.items() if a is not None})
    if index_problems:
        report.problems.extend(index_problems)
        report.damaged.append("key_index")
    if cache.key_index_state() == "stale":
        report.warnings.append("the key index was made for other shards (readers scan the samples units instead); "
                               "rerun the `pld cache-teacher` command to rebuild it.")
    return report


def _read_ahead(cache: Cache, units: list[UnitName], window: int = 64) -> Iterator[tuple[UnitName, Any, Any]]:
    """Each unit with its :meth:`Cache.read_units` result and its :meth:`Cache.markers` one, ``window`` units read
    at once (a few round trips per window, not ~9 per unit; at most a window's arrays held)."""
    for start in range(0, len(units), window):
        part = units[start:start + window]
        teacher = [unit for unit in part if unit.kind == "teacher"]  # verify compares their recorded counts
        markers = dict(zip(teacher, cache.markers(teacher)))
        yield from ((unit, read, markers.get(unit)) for unit, read in zip(part, cache.read_units(part)))


def index_warnings(cache: Cache) -> list[str]:
    """Where the store can list, compare each shard's unit index with its markers: readers on hosts without
    listing (plain HTTP) see exactly what the index lists. Not damage (nothing wrong is ever read), so warnings."""
    if not can_list(cache.url):
        return []
    by_shard = fmt.units_by_shard([u.name for u in cache.done], range(len(cache.meta.shards)))
    stale = [s for (s, names), index in zip(by_shard.items(), cache.unit_indexes(by_shard))
             if set(index or []) != names]
    if not stale:
        return []
    return [f"the unit index of {len(stale)} shard(s) (e.g. {cache.meta.shards[stale[0]].name}) does not list "
            "exactly its complete units: readers that cannot list folders (HTTP hosts) would see those shards as "
            "incomplete. Rerun the `pld cache-teacher` command to rewrite it."]


def chance_warning(tid: str, accuracy: float | None, num_classes: int) -> str | None:
    if not fmt.near_chance(accuracy, num_classes):
        return None
    return (f"teacher '{tid}' is near chance on its cached views: top-1 {accuracy * 100:.2f}% with {num_classes} "
            f"classes (chance {100 / num_classes:.2f}%). Check its weights (--teacher-checkpoint) and preprocessing "
            "(--size, --mean, --std): students would learn from noise. (Labels in a student's own classes, not the "
            "teacher's, also look like this: see `pld inspect --class-map`.)")


def tail_mass_quantiles(cache: Cache, tid: str, max_shards: int = 8) -> dict[str, float]:
    """Teacher probability outside the stored top-k (temperature 1), over up to ``max_shards`` complete shards:
    how much of the PLD weight a given k drops, so users can choose k."""
    teacher = cache.teacher(tid)
    masses = []
    done = [s for s in range(len(cache.shards)) if cache.complete(s, tid)][:max_shards]
    for shard in done:
        block = cache.read(shard, tid, temperature=1.0)
        logp = block.topk_logp[block.status == SampleStatus.OK]
        masses.append(np.clip(1.0 - np.exp(logp.astype(np.float64)).sum(-1), 0.0, 1.0).ravel())
    if not masses or teacher.k == cache.meta.num_classes:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0} if masses else {}
    m = np.concatenate(masses)
    return {"p50": float(np.quantile(m, 0.5)), "p90": float(np.quantile(m, 0.9)),
            "p99": float(np.quantile(m, 0.99)), "max": float(m.max())}


def _digest_or_none(cache: Cache) -> str | None:
    """The cache's digest; None where a document it covers is not JSON (verify reports that unit as damaged)."""
    try:
        return cache.expected_digest or cache.digest()
    except CacheError:
        return None


def inspect_cache(url: str, expect_digest: str | None = None) -> dict[str, Any]:
    """A summary for humans and scripts: teachers, classes, k, views, temperatures, completion, bytes, the
    digest, and warnings (a teacher near chance). Reads checked blocks of up to 8 shards per teacher for the
    tail mass. ``expect_digest``: refuse (CacheError) a cache whose digest differs."""
    cache = Cache(url, expect_digest=expect_digest)
    meta = cache.meta
    nbytes = store_nbytes(url)
    samples = sum(s.nsamples for s in meta.shards)
    teachers, warnings = {}, []
    for tid, t in meta.teachers.items():
        correct = count = 0
        units = cache.units(kind="teacher", teacher=tid)
        for unit, rec in zip(units, first_error(cache.markers(units))):
            hits = (rec.get("correct"), rec.get("count")) if isinstance(rec, dict) else (0, 0)
            most = meta.shards[unit.shard].nsamples * (unit.views[1] - unit.views[0])
            if all(isinstance(x, int) and not isinstance(x, bool) for x in hits) and 0 <= hits[0] <= hits[1] <= most:
                correct, count = correct + hits[0], count + hits[1]  # a stranger's marker: only plausible counts
        accuracy = (correct / count) if count else None
        warning = chance_warning(tid, accuracy, meta.num_classes)
        if warning:
            warnings.append(warning)
        teachers[tid] = {
            "source": t.source, "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
            "k": t.k, "full": t.k == meta.num_classes, "temperatures": list(t.temperatures),
            "shards_done": sum(1 for s in range(len(meta.shards)) if set(range(meta.num_views)) <= cache.views_done(s, tid)),
            "accuracy_on_cached_views": accuracy,
            "tail_mass": tail_mass_quantiles(cache, tid), "preprocessing": t.preprocessing,
        }
    shards_done = sum(1 for s in range(len(meta.shards)) if cache.complete(s))
    views_total = samples * meta.num_views
    return {
        "url": url, "format": f"{meta.format} v{meta.version}", "num_classes": meta.num_classes,
        "class_names": meta.class_names, "samples": samples, "shards_total": len(meta.shards),
        "shards_done": shards_done, "views": meta.num_views, "recipe": meta.recipe, "seed": meta.seed,
        "teachers": teachers, "bytes_on_disk": nbytes,
        "bytes_per_view": (nbytes / views_total) if nbytes and views_total else None,
        "created_by": meta.created_by, "warnings": warnings, "key_index": cache.key_index_state(),
        "complete": shards_done == len(meta.shards) and all(t["shards_done"] == len(meta.shards) for t in teachers.values()),
        "digest": _digest_or_none(cache),
    }
