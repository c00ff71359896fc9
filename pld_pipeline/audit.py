"""Audit a cache against its teacher: re-run the teacher on randomly drawn cached views and compare.

Checksums, bindings and a pinned digest prove the bytes are the ones published; they do not prove the published
targets are what the named teacher outputs on those views (a wrong preprocessing, bf16 rounding, another
checkpoint, a buggy or dishonest writer). The audit draws N (sample, view) pairs with a seeded generator,
replays each view from the user's own shards with the stored params (views.py, exactly the student's replay),
runs the teacher in fp32 with the preprocessing *the cache records* (never the user's guess) and compares every
cached quantity with its recomputation. The tolerance is the auditor's, never the cache's: strict (fp32) unless
the auditor asks for another (``tolerance``: a number, or a precision name); anything beyond it fails, naming the
sample keys. A precision record the observed agreement contradicts (top-k agreeing to fp32 while the log-partition
or label log-prob do not, whatever the record says) fails too (docs/cache-format.md, "Auditing a cache").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .cache import Cache, schema
from .cache.format import MIN_LOGP, CacheError, SampleStatus, TeacherRecord, sample_digest
from .data import expand_shards, iter_shard, pick_field, quick_hash
from .distributed import resolve_device
from .models import file_sha256, load_model, preprocessing_of, pretrained_identity
from .views import KIND_PLAIN, ViewError, ViewRecipe, decode_image, first_labels, normalize, replay_mixed, stable_int, view_kind

#: Allowed |difference| of a log-prob (and of logz, label log-prob) by recorded teacher precision. fp32: what
#: another device, kernel or batch composition moves (observed <= 1e-4) with a wide margin; bf16: autocast
#: rounding moves log-probs of 1000-class teachers by up to ~0.08.
TOLERANCE = {"fp32": 2e-3, "bf16": 0.15}
#: float16 storage of top-k deltas (schema.split_logp) rounds a delta d by up to |d| * 2^-11: the recomputation is
#: rounded the same way, and one float16 step (a value near a rounding boundary) is allowed on top.
FP16_REL = 2.0 ** -11
VIEW_KINDS = {0: "plain", 1: "mixup", 2: "cutmix"}


def resolve_tolerance(tolerance: float | str | None) -> float:
    """The auditor's tolerance: None -> the strict fp32 one; a precision name (fp32, bf16) -> its tolerance; a
    positive number as given. A cache's own ``precision`` record never widens it (a re-signed cache could say bf16)."""
    if tolerance is None:
        return TOLERANCE["fp32"]
    if isinstance(tolerance, str) and tolerance in TOLERANCE:
        return TOLERANCE[tolerance]
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"--tolerance {tolerance!r} must be a positive number or one of {', '.join(TOLERANCE)}.")
    return value


@dataclass
class AuditedView:
    key: str
    shard: int
    row: int
    view: int
    kind: str
    max_logp_diff: float  # over the cached top-k entries
    label_logp_diff: float
    logz_diff: float  # over the cached temperatures
    rank_mismatches: int  # ranks whose cached class differs from the recomputed one beyond the tolerance
    top1_agrees: bool
    ok: bool

    def worst(self) -> float:
        return max(self.max_logp_diff, self.label_logp_diff, self.logz_diff)


@dataclass
class AuditReport:
    cache: str
    teacher: str
    source: dict[str, str]  # recorded / given
    weights: dict[str, Any]  # recorded and given sha256, match (None: nothing to compare)
    precision: str  # what the cache records (informational: the tolerance is the auditor's)
    tolerance: float
    preprocessing: dict[str, Any]  # what the teacher was run with (the recorded one)
    notes: list[str]
    views: list[AuditedView] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.views) and all(v.ok for v in self.views) and not self.contradiction()

    def contradiction(self) -> str | None:
        """Why the observed agreement contradicts the cache's precision record, None where it does not: top-k
        log-probs agreeing to fp32 while the log-partition or label log-prob of the same logits do not is no
        precision at all (a logz shifted by 0.14 nats in every view once passed as "bf16")."""
        s = self.summary()
        strict = TOLERANCE["fp32"]
        other = max(s["max_logz_diff"], s["max_label_logp_diff"])
        if self.views and s["max_logp_diff"] <= strict < other:
            return (f"the cache records precision {self.precision}, but its top-k log-probs agree with the teacher to "
                    f"{s['max_logp_diff']:.2g} while its log-partition or label log-prob differ by {other:.2g}: no "
                    "teacher precision explains that (edited?)")
        return None

    def summary(self) -> dict[str, Any]:
        vs = self.views
        return {"views": len(vs), "failed": sum(not v.ok for v in vs),
                "mixed": sum(v.kind != "plain" for v in vs),
                "top1_agreement": sum(v.top1_agrees for v in vs) / max(len(vs), 1),
                "max_logp_diff": max((v.max_logp_diff for v in vs), default=0.0),
                "max_label_logp_diff": max((v.label_logp_diff for v in vs), default=0.0),
                "max_logz_diff": max((v.logz_diff for v in vs), default=0.0),
                "rank_mismatches": sum(v.rank_mismatches for v in vs)}

    def worst(self, n: int = 5) -> list[AuditedView]:
        return sorted(self.views, key=lambda v: (v.ok, -v.worst(), -v.rank_mismatches))[:n]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "views"}
        return {**d, "ok": self.ok, "contradiction": self.contradiction(), "summary": self.summary(),
                "worst": [asdict(v) for v in self.worst()],
                "audited": [asdict(v) for v in self.views]}


def _draw(reader: Cache, shards: list[int], n: int, seed: int) -> dict[int, list[tuple[int, int]]]:
    """``n`` distinct (row, view) pairs by shard, uniform over the usable rows of ``shards`` and every view. Drawn by
    position among all rows (no list of an ImageNet-sized population is built); rows skipped at cache time are
    passed over, and only the drawn shards' samples units are read."""
    rng = np.random.default_rng(seed)
    views = reader.meta.num_views
    starts = np.concatenate([[0], np.cumsum([reader.meta.shards[s].nsamples * views for s in shards])])
    total = int(starts[-1])
    candidates = (rng.permutation(total) if total <= 4 * n + 64 else rng.choice(total, 2 * n + 64, replace=False))
    status: dict[int, np.ndarray] = {}
    out: dict[int, list[tuple[int, int]]] = {}
    found = 0
    for _ in range(2):
        for i in (int(c) for c in candidates):
            k = int(np.searchsorted(starts, i, side="right")) - 1
            s, row, v = shards[k], (i - int(starts[k])) // views, (i - int(starts[k])) % views
            if s not in status:
                status[s] = reader.samples(s)[schema.STATUS.path()]
            if status[s][row] == SampleStatus.OK and (row, v) not in out.get(s, []):
                out.setdefault(s, []).append((row, v))
                found += 1
                if found == n:
                    return out
        if len(candidates) == total:
            break
        candidates = rng.permutation(total)  # many skipped rows: walk the whole population
    if not found:
        raise CacheError(f"{reader.url} holds no usable sample in the given shards to audit.")
    return out


def _given_sha256(model: torch.nn.Module, checkpoint: str | None, pretrained: bool) -> str | None:
    if checkpoint:
        return file_sha256(checkpoint)
    if pretrained:
        return (pretrained_identity(model) or {}).get("sha256")
    return None


def _teacher(reader: Cache, rec: TeacherRecord, source: str, checkpoint: str | None, pretrained: bool,
             device: torch.device, notes: list[str]) -> torch.nn.Module:
    """The teacher as cache-teacher built it: same num_classes and, for a random-init teacher, the same seed."""
    torch.manual_seed(stable_int(reader.meta.seed, rec.id) % 2**63)
    model = load_model(source, num_classes=reader.meta.num_classes, checkpoint=checkpoint, pretrained=pretrained)
    declared = preprocessing_of(model)
    for name in ("mean", "std"):
        if declared[name] is not None and not np.allclose(declared[name], rec.preprocessing[name], atol=1e-6):
            notes.append(f"the cache records {name} {rec.preprocessing[name]} but {source} declares {declared[name]}: "
                         "the audit runs the recorded one")
    return model.to(device).eval().to(memory_format=torch.channels_last)


def _replay(url: str, block: Any, picks: list[tuple[int, int]], recipe: ViewRecipe) -> list[torch.Tensor]:
    """The picked views of one shard, replayed from the user's shard (each sample checked against its digest)."""
    need = {r for r, _ in picks}
    for r, v in picks:
        if view_kind(block.params[r, v]) != KIND_PLAIN:
            need.add(int(block.params[r, v][6]))
    encoded: dict[int, bytes] = {}
    for i, sample in enumerate(iter_shard(url)):
        if i in need:
            if i >= len(block.keys) or block.keys[i] != sample["__key__"] or block.digests[i].tobytes() != sample_digest(sample):
                raise CacheError(f"Sample {i} ({sample['__key__']!r}) of {url} is not the sample cached in that row (key "
                                 "or content digest differs): audit with the shards the cache was made from.")
            encoded[i] = pick_field(sample, recipe.image_field)
        if i >= max(need):
            break
    if not need <= set(encoded):
        raise CacheError(f"{url} ended before row {max(need)}: it is not the shard the cache was made from.")
    out = []
    for r, v in picks:
        params = block.params[r, v]
        partner = decode_image(encoded[int(params[6])]) if view_kind(params) != KIND_PLAIN else None
        try:
            out.append(replay_mixed(decode_image(encoded[r]), partner, params, recipe))
        except ViewError as e:
            raise CacheError(f"View {v} of row {r} of {url}: {e}; the cache is damaged or was edited (run "
                             "`pld verify`).") from None
    return out


def audit_cache(cache: str, data: str, teacher: str, *, checkpoint: str | None = None, pretrained: bool = False,
                teacher_id: str | None = None, n: int = 64, seed: int = 0, device: str = "auto",
                batch_size: int = 64, expect_digest: str | None = None,
                tolerance: float | str | None = None) -> AuditReport:
    """Re-run ``teacher`` on ``n`` randomly drawn cached (sample, view) pairs replayed from ``data`` and compare.
    ``tolerance``: the auditor's (:func:`resolve_tolerance`; strict fp32 by default, whatever the cache records)."""
    tol = resolve_tolerance(tolerance)
    if n < 1:
        raise ValueError(f"--audit needs a number of views >= 1, got {n}.")
    if checkpoint and pretrained:
        raise ValueError("Give the teacher either --teacher-checkpoint or --pretrained, not both.")
    reader = Cache(cache, expect_digest=expect_digest)
    rec = reader.teacher(teacher_id)
    prep = rec.preprocessing or {}
    if not prep.get("mean") or not prep.get("std") or rec.precision not in TOLERANCE:
        raise CacheError(f"{cache} does not record teacher '{rec.id}''s normalisation (mean/std) or precision, so it "
                         "cannot be audited: re-cache it with a current `pld cache-teacher`.")
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    by_hash = {}
    for url in expand_shards(data):
        qh = quick_hash(url)
        try:
            by_hash[reader.shard_for(quick_hash=qh)] = url
        except CacheError:
            raise CacheError(f"{url} is not one of the shards {cache} was made from (by content hash); pass the "
                             "cached shards (a subset is fine) with --data.") from None
    shards = sorted(s for s in by_hash if reader.complete(s, rec.id))
    if not shards:
        raise CacheError(f"Teacher '{rec.id}' has no complete shard among the given --data; finish the cache first.")
    dev = resolve_device(device)
    notes: list[str] = []
    if teacher != rec.source:
        notes.append(f"the cache records teacher source {rec.source!r}, the audit runs {teacher!r}")
    model = _teacher(reader, rec, teacher, checkpoint, pretrained, dev, notes)
    given = _given_sha256(model, checkpoint, pretrained)
    weights = {"recorded_sha256": rec.checkpoint_sha256, "given_sha256": given,
               "match": None if rec.checkpoint_sha256 is None and given is None else rec.checkpoint_sha256 == given}
    report = AuditReport(cache, rec.id, {"recorded": rec.source, "given": teacher}, weights, rec.precision, tol,
                         {k: prep.get(k) for k in ("mean", "std", "input_size", "interpolation")}, notes)
    for s, picks in _draw(reader, shards, n, seed).items():
        block = reader.read(s, rec.id, rec.temperatures[0])
        report.views += _compare_shard(reader, rec, block, by_hash[s], picks, recipe, model, dev, tol, batch_size)
    return report


def _logz_all(reader: Cache, s: int, rec: TeacherRecord) -> np.ndarray:
    """[n, V, T]: logz at every cached temperature."""
    return np.stack([reader.read(s, rec.id, t).logz for t in rec.temperatures], axis=-1)


def _compare_shard(reader: Cache, rec: TeacherRecord, block: Any, url: str, picks: list[tuple[int, int]],
                   recipe: ViewRecipe, model: torch.nn.Module, device: torch.device, tol: float,
                   batch_size: int) -> list[AuditedView]:
    views = _replay(url, block, picks, recipe)
    logits = []
    with torch.inference_mode():
        for i in range(0, len(views), batch_size):
            x = torch.stack(views[i:i + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
            logits.append(model(normalize(x, rec.preprocessing["mean"], rec.preprocessing["std"])).double().cpu())
    logp_all = torch.log_softmax(torch.cat(logits), dim=1).numpy()
    firsts = first_labels(block.params, block.labels)
    logz = _logz_all(reader, block.shard, rec)
    out = []
    for (r, v), logp in zip(picks, logp_all):
        idx, cached = block.topk_idx[r, v].astype(np.int64), block.topk_logp[r, v].astype(np.float64)
        ours = np.maximum(logp, MIN_LOGP)
        order = np.argsort(-logp, kind="stable")[: len(idx)]
        stored = schema.join_logp(*schema.split_logp(ours[idx][None]))[0]  # rounded as the cache stores them
        allowed = tol + 2 * FP16_REL * np.abs(ours[idx] - ours[idx[0]])  # a rounding boundary: one float16 step
        dlogp = np.abs(cached - stored)
        ranks = int(np.sum((idx != order) & (np.abs(logp[idx] - logp[order]) > tol)))
        dlabel = abs(float(block.label_logp[r, v]) - float(ours[int(firsts[r, v])]))
        want_logz = np.array([float(np.logaddexp.reduce(logp / t)) for t in rec.temperatures])
        dlogz = float(np.max(np.abs(logz[r, v] - want_logz)))
        ok = bool(np.all(dlogp <= allowed)) and ranks == 0 and dlabel <= tol and dlogz <= tol
        out.append(AuditedView(block.keys[r], block.shard, r, v, VIEW_KINDS.get(view_kind(block.params[r, v]), "?"),
                               float(dlogp.max()), dlabel, dlogz, ranks, int(idx[0]) == int(order[0]), ok))
    return out
