"""Stage 1: run one or more teachers once over sharded data and fill the cache.

tar -> decode (DataLoader workers) -> view params from a stable hash -> replayed uint8 views -> pinned batch ->
every teacher on the device (inference_mode, channels_last, fp32 or opt-in bf16) -> top-k record ->
per-shard buffer -> background thread writes the unit and its marker. Each rank owns whole shards, so ranks
never write the same chunk; rerunning the same command resumes from the markers.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import distributed as D
from .cache import Cache, CacheMeta, SampleStatus, TeacherBlock, TeacherRecord, UnitName, teacher_id_from_name
from .cache import claims, progress, schema, values
from .cache import format as fmt
from .cache.encode import encode_teacher_logits
from .cache.check import _check_views, chance_warning, check_unit
from .cache.format import CacheError, ShardRecord, index_dtype
from .cache.cache import class_names_problem
from .data import (
    LABEL_FIELD, DataError, ShardIndex, check_unique_keys, expand_shards, index_shard, iter_shard,
    parse_label, pick_field, quick_hash, shard_name, worker_errors,
)
from .models import file_sha256, load_model, output_width, preprocessing_of, pretrained_identity, require_teacher_input
from .views import (
    IMAGE_FIELDS, KIND_PLAIN, MixRecipe, ViewRecipe, decode_image, first_labels, mix_draw, mixed_params, normalize,
    own_label_dominates, replay_mixed, replay_view, stable_int, view_params,
)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TeacherSpec:
    """One teacher: a timm name or ``module.path:factory``, optional checkpoint, optional cache id."""
    source: str
    checkpoint: str | None = None
    name: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    pretrained: bool = False  # timm hub weights (pretrained tag or hf-hub: name) instead of a checkpoint

    @property
    def id(self) -> str:
        return fmt.check_teacher_id(self.name) if self.name else teacher_id_from_name(self.source)


@dataclass
class CacheTeacherConfig:
    data: str | list[str]
    out: str
    teachers: list[TeacherSpec]
    views: int = 8
    recipe: str = "cifar"
    size: int | None = None  # default: the first teacher's input size
    recipe_overrides: dict[str, Any] = field(default_factory=dict)  # pad, scale, ratio, crop_pct, ...
    clean_view: bool = False
    seed: int = 0
    k: int | None = 32  # None or >= num_classes: full mode
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    num_classes: int | None = None
    class_names: list[str] | None = None
    batch_size: int = 256
    workers: int | None = None  # decode workers; None: 2 on CPU, up to 8 per GPU (distributed.loader_workers)
    device: str = "auto"
    image_field: str = IMAGE_FIELDS
    label_field: str = LABEL_FIELD
    on_bad_sample: str = "error"  # or "skip"
    overwrite: bool = False
    compression_level: int = 3
    channels_last: bool = True
    precision: str = "fp32"  # teacher forward: fp32 (exact logits; TF32 off) or bf16 (autocast: faster, rounded)
    part: tuple[int, int] = (0, 1)  # (I, N): this independent worker does shards s with s % N == I
    part_wait: float = 1800.0  # seconds parts I > 0 wait for part 0 to create (or extend) the cache
    claim_ttl: float = 600.0  # seconds a worker's claim on a shard lasts without a refresh (cache/claims.py)
    # A shard in progress saves its finished rows every save_seconds seconds (and every save_rows rows when set),
    # whichever comes first (cache/progress.py): a kill loses at most that much teacher work (plus one batch) per
    # shard in progress. By time by default: a save rewrites the shard's objects, so its cost grows with the shard,
    # and a time bound costs the same fraction of any teacher's time (docs/results.md, "Resuming inside a shard").
    save_rows: int | None = None
    save_seconds: float = 60.0


@dataclass
class _Job:
    """What this rank computes for one shard: which views, and which units to write."""
    shard: int
    url: str
    nsamples: int
    views: list[int]  # views to compute (union of all missing units)
    write_samples: bool
    param_runs: list[tuple[int, int]]
    teacher_runs: dict[str, list[tuple[int, int]]]
    start: int = 0  # rows [0, start) are restored from a progress record: read (and checked), not computed
    prefix: "_Expected | None" = None  # those rows' keys and content digests

    def units(self) -> list[UnitName]:
        """The units this job writes, in writing order (samples, views, teachers)."""
        return (([UnitName(self.shard, "samples")] if self.write_samples else [])
                + [UnitName(self.shard, "views", views=run) for run in self.param_runs]
                + [UnitName(self.shard, "teacher", tid, run)
                   for tid, runs in self.teacher_runs.items() for run in runs])


def _runs(views: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of sorted view indices: one unit (and marker) per run."""
    runs: list[tuple[int, int]] = []
    for v in sorted(views):
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


@dataclass
class _Expected:
    """What a shard must hold: its keys in order (from indexing or the cache) and, where the cache already has
    its samples unit, each sample's content digest (so an extension never mixes in an edited shard)."""
    keys: list[str]
    digests: np.ndarray | None = None  # [n, 16] uint8


class _ViewItems(IterableDataset):
    """One item per (sample, view): decoded once per sample, every needed view replayed from its params."""

    def __init__(self, jobs: list[_Job], recipe: ViewRecipe, seed: int, cfg: CacheTeacherConfig,
                 num_classes: int, expected: dict[int, _Expected]) -> None:
        self.jobs, self.recipe, self.seed, self.cfg = jobs, recipe, seed, cfg
        self.num_classes, self.expected = num_classes, expected

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        size, mix, width = self.recipe.size, self.recipe.mixing, self.recipe.params_width
        for job in jobs:
            expected = self.expected.get(job.shard)
            recent: deque[tuple[int, str, int, torch.Tensor | None]] = deque(maxlen=mix.window if mix else 1)
            for i, sample in enumerate(iter_shard(job.url)):
                key = sample["__key__"]
                digest = fmt.sample_digest(sample)
                if expected is not None and (i >= len(expected.keys) or expected.keys[i] != key):
                    raise DataError(f"Shard {job.url} changed since it was indexed (sample {i} is {key!r}); "
                                    "rerun with --overwrite to re-index it.")
                if expected is not None and expected.digests is not None and expected.digests[i].tobytes() != digest:
                    raise DataError(f"Sample {key!r} of shard {job.url} differs from the one already cached (content "
                                    "digest): the shard was edited. Use the original shard, or --overwrite to re-cache.")
                if i < job.start:  # restored from the progress record: no view, no teacher forward
                    if job.prefix is None or job.prefix.keys[i] != key or job.prefix.digests[i].tobytes() != digest:
                        raise DataError(f"Shard {job.url} changed while it was being read (sample {i} is {key!r}); "
                                        "rerun the same command.")
                    image = None
                    if mix is not None and i >= job.start - mix.window:  # a partner of the rows still to compute
                        try:
                            image = decode_image(pick_field(sample, self.recipe.image_field))
                        except Exception:  # noqa: BLE001 - undecodable partners leave views plain, as when computed
                            image = None
                    recent.append((i, key, parse_label(sample, self.cfg.label_field, self.num_classes), image))
                    continue
                digest_t = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
                label = parse_label(sample, self.cfg.label_field, self.num_classes)
                status, image = SampleStatus.OK, None
                try:
                    data = pick_field(sample, self.recipe.image_field)
                    if data is None:
                        raise DataError(f"no '{self.recipe.image_field}' field")
                    image = decode_image(data)
                except Exception as e:  # noqa: BLE001 - undecodable input is a data problem, reported by key
                    if self.cfg.on_bad_sample != "skip":
                        raise DataError(f"Cannot decode image of sample {key!r} in shard {job.url}: {e}. "
                                        "Fix the data or pass --on-bad-sample skip.") from None
                    status = SampleStatus.SKIPPED
                for v in job.views:
                    first = label  # the label ranked first: the sample's own, or a mixed view's dominant one
                    if image is None:
                        params = np.zeros(width, np.int32)
                        view = torch.zeros(3, size, size, dtype=torch.uint8)
                    else:
                        params = view_params(self.recipe, self.seed, key, v, image.shape[1], image.shape[2])
                        if mix is not None:
                            params, partner, first = self._mixed(mix, recent, params, key, v, i, label)
                            view = replay_mixed(image, partner, params, self.recipe)
                        else:
                            view = replay_view(image, params, self.recipe, check=False)  # its own draw
                    yield job.shard, i, v, key, label, first, status, view, torch.from_numpy(params), digest_t
                recent.append((i, key, label, image))
            if expected is not None and i + 1 != len(expected.keys):
                raise DataError(f"Shard {job.url} has {i + 1} samples, the index says {len(expected.keys)}; "
                                "rerun with --overwrite to re-index it.")


    def _mixed(self, mix: MixRecipe, recent: deque, params: np.ndarray, key: str, view: int, row: int,
               label: int) -> tuple[np.ndarray, torch.Tensor | None, int]:
        """A view's stored integers, its partner's decoded image and the label PLD ranks first (the dominant one:
        lambda >= 1/2 keeps the sample's own). A partner that could not be decoded leaves the view plain."""
        draw = mix_draw(mix, self.seed, key, view, row, self.recipe.size)
        found = next((e for e in recent if e[0] == int(draw[1])), None)
        if draw[0] == KIND_PLAIN or found is None or found[3] is None:
            return mixed_params(params, draw, None), None, label
        _, partner_key, partner_label, partner = found
        partner_params = view_params(self.recipe, self.seed, partner_key, view, partner.shape[1], partner.shape[2])
        stored = mixed_params(params, draw, partner_params)
        return stored, partner, label if own_label_dominates(int(stored[12])) else partner_label


class _ShardBuffer:
    """Accumulates one shard's results until every (sample, view) item has arrived."""

    def __init__(self, job: _Job, teachers: dict[str, TeacherRecord], width: int) -> None:
        n, v = job.nsamples, len(job.views)
        self.job, self.pos = job, {view: p for p, view in enumerate(job.views)}
        self.keys: list[str] = [""] * n
        self.labels = np.full(n, -1, np.int32)
        self.status = np.zeros(n, np.uint8)
        self.digests = np.zeros((n, fmt.DIGEST_BYTES), np.uint8)
        self.params = np.zeros((n, v, width), np.int32)
        self.out = {tid: {"topk_idx": np.full((n, v, t.k), -1, np.dtype(t.index_dtype)),
                          "topk_logp": np.full((n, v, t.k), np.nan, np.float32),
                          "label_logp": np.full((n, v), np.nan, np.float32),
                          "logz": np.full((n, v, len(t.temperatures)), np.nan, np.float32),
                          "correct": np.zeros((n, v), bool)} for tid, t in teachers.items()}
        self.remaining = n * v
        self.left = np.full(n, v, np.int32)  # views still to come, per row
        self.done = 0  # rows [0, done) have every view: what a save can write
        self.saved = 0  # rows [0, saved) are in the arrays and named by the shard's progress record
        self.saved_at = time.monotonic()
        self.restored: progress.Blocks = {}  # stored form of rows [0, job.start), by unit, as read back

    def restore(self, rows: int, blocks: progress.Blocks) -> None:
        """Rows [0, rows) come from the progress record: nothing more to compute for them."""
        self.left[:rows] = 0
        self.done = self.saved = rows
        self.remaining -= rows * len(self.job.views)
        self.restored = blocks

    def advance(self) -> None:
        while self.done < len(self.left) and self.left[self.done] == 0:
            self.done += 1

    def due(self, rows: int | None, seconds: float) -> bool:
        """Whether to save now: ``rows`` finished rows unsaved, or ``seconds`` since the last save (and a new row)."""
        if self.remaining == 0 or self.done == self.saved:
            return False
        return (rows is not None and self.done - self.saved >= rows) or time.monotonic() - self.saved_at >= seconds

    def unit_arrays(self, unit: UnitName, key_bytes: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [0, stop) of one of this job's units in stored form (restored rows as they were read back: a
        float32 -> float16-delta round trip could move a value)."""
        if unit.kind == "samples":
            out = {"key": schema.encode_keys(self.keys[:stop], key_bytes), "label": self.labels[:stop],
                   "status": self.status[:stop], "digest": self.digests[:stop]}
        elif unit.kind == "views":
            out = {"params": self.params[:stop, [self.pos[v] for v in range(*unit.views)]]}
        else:
            b = self.teacher_block(unit.teacher, unit.views)
            out = schema.encode_teacher(b.topk_idx[:stop], b.topk_logp[:stop], b.label_logp[:stop], b.logz[:stop])
        out = {name: np.array(arr) for name, arr in out.items()}  # copies: the main thread goes on filling rows
        for name, rows in self.restored.get(unit.name, {}).items():
            out[name][:len(rows)] = rows
        return out

    def add(self, rows: np.ndarray, views: np.ndarray, keys: list[str], labels: np.ndarray, status: np.ndarray,
            params: np.ndarray, digests: np.ndarray, encoded: dict[str, dict[str, np.ndarray]], sel: np.ndarray) -> None:
        pos = np.array([self.pos[int(v)] for v in views[sel]], dtype=np.int64)
        r = rows[sel]
        for row, i in zip(r, np.flatnonzero(sel)):
            self.keys[row] = keys[i]
        self.labels[r], self.status[r], self.params[r, pos] = labels[sel], status[sel], params[sel]
        self.digests[r] = digests[sel]
        for tid, enc in encoded.items():
            for name, arr in enc.items():
                self.out[tid][name][r, pos] = arr[sel]
        self.remaining -= int(sel.sum())
        np.subtract.at(self.left, r, 1)
        self.advance()

    def teacher_block(self, tid: str, run: tuple[int, int]) -> TeacherBlock:
        cols = [self.pos[v] for v in range(*run)]
        o = self.out[tid]
        ok = self.status == SampleStatus.OK
        block = TeacherBlock(o["topk_idx"][:, cols], o["topk_logp"][:, cols], o["label_logp"][:, cols],
                             o["logz"][:, cols], correct=int(o["correct"][ok][:, cols].sum()),
                             count=int(ok.sum()) * len(cols))
        # Skipped samples keep the arrays' fill values (-1 / NaN): nothing was computed for them.
        block.topk_idx[~ok], block.topk_logp[~ok], block.label_logp[~ok], block.logz[~ok] = -1, np.nan, np.nan, np.nan
        return block


def _write_shard(cache: Cache, buf: _ShardBuffer) -> tuple[str, int | None, int]:
    """Every unit of the shard, each whole with its marker (as without progress), then drop its progress record."""
    job = buf.job
    if job.write_samples:
        cache.write_samples(job.shard, buf.keys, buf.labels, buf.status, buf.digests)
    for run in job.param_runs:
        cache.write_views(job.shard, run, buf.params[:, [buf.pos[v] for v in range(*run)]])
    for tid, runs in job.teacher_runs.items():
        for run in runs:
            block, unit = buf.teacher_block(tid, run), UnitName(job.shard, "teacher", tid, run)
            # Cache.write_teacher's record, from the stored form (restored rows exactly as they were read back)
            cache.write(unit, buf.unit_arrays(unit, cache.meta.key_bytes, job.nsamples), teacher=tid, views=list(run),
                        correct=block.correct, count=block.count)
    if buf.saved or job.start:
        progress.discard(cache.root, job.shard)
    return cache.meta.shards[job.shard].name, None, job.nsamples


def _resume(cache: Cache, buf: _ShardBuffer, emit: ProgressFn) -> None:
    """Take the rows a previous run saved for this job's units (cache/progress.py), when every check passes:
    the record's own (binding, sha256 of the rows as read back), the values every reader checks, and the shard's
    first rows read again (keys and content digests). Otherwise the record is deleted and the shard starts over."""
    job = buf.job
    name = cache.meta.shards[job.shard].name
    rows, blocks, why = progress.load(cache.root, cache.meta, job.units(), job.nsamples)
    if rows:
        why = _restored_problem(cache, buf, rows, blocks)
    if why:
        if why != "none":
            progress.discard(cache.root, job.shard)
            emit({"event": "progress_refused", "shard": name, "why": why})
        return
    buf.restore(rows, blocks)
    job.start, job.prefix = rows, _Expected(buf.keys[:rows], buf.digests[:rows].copy())
    emit({"event": "resuming_shard", "shard": name, "rows": rows, "of": job.nsamples})


def _restored_problem(cache: Cache, buf: _ShardBuffer, rows: int, blocks: progress.Blocks) -> str:
    """Fill the buffer's rows [0, rows) from restored blocks (and the shard's complete units); what is wrong
    with them, or "" when they pass the checks every reader runs and match the shard as it reads now."""
    job, meta = buf.job, cache.meta
    try:
        samples = blocks.get(fmt.samples_unit(job.shard))
        if samples is None:  # the samples unit is complete: its checked read
            complete = cache.samples(job.shard)
            samples = {spec.name: complete[spec.path()] for spec in schema.BY_KIND["samples"]}
        keys, labels = samples["key"][:rows], samples["label"][:rows]
        status, digests = samples["status"][:rows], samples["digest"][:rows]
        problems = values.sample_problems(status, labels, keys, rows, meta.num_classes)
        if problems:
            return f"its rows hold {problems[0]}"
        buf.keys[:rows], buf.labels[:rows] = schema.decode_keys(keys), labels
        buf.status[:rows], buf.digests[:rows] = status, digests
        for unit in cache.units(job.shard, "views"):  # the params of views whose views unit is already complete
            done = cache.read_unit(unit)[schema.PARAMS.path()]
            for v in range(*unit.views):
                if v in buf.pos:
                    buf.params[:rows, buf.pos[v]] = done[:rows, v - unit.views[0]]
    except (CacheError, KeyError, ValueError, UnicodeDecodeError) as e:
        return f"its shard's complete units cannot be read ({e})"
    ok = status == SampleStatus.OK
    for unit in job.units():
        if unit.kind == "views":
            cols = [buf.pos[v] for v in range(*unit.views)]
            buf.params[:rows, cols] = blocks[unit.name]["params"]
            problems = _check_views(buf.params[:rows, cols], ok, meta.recipe.get("size", 0))
            if problems:
                return f"its rows hold {problems[0]}"
    for unit in job.units():
        if unit.kind != "teacher":
            continue
        b, cols = blocks[unit.name], [buf.pos[v] for v in range(*unit.views)]
        first = first_labels(buf.params[:rows, cols], buf.labels[:rows])
        found = values.first_problem(b["topk_idx"].astype(np.int64), schema.join_logp(b["topk_dlogp"], b["top1_logp"]),
                                     b["label_logp"], b["logz"], ok, meta.num_classes,
                                     meta.teachers[unit.teacher].temperatures, first)
        if found is not None:
            return f"its rows of {unit.name} hold {found[0]}"
        buf.out[unit.teacher]["correct"][:rows, cols] = b["topk_idx"][..., 0] == first
    if not _prefix_matches(job.url, buf.keys[:rows], buf.digests[:rows]):
        return "its shard changed since (a sample's key or content differs)"
    return ""


def _prefix_matches(url: str, keys: list[str], digests: np.ndarray) -> bool:
    """Whether the shard's first samples are still these (keys and content digests): read, not decoded."""
    i = -1
    for i, sample in enumerate(iter_shard(url)):
        if i >= len(keys):
            break
        if sample["__key__"] != keys[i] or fmt.sample_digest(sample) != digests[i].tobytes():
            return False
    return i >= len(keys) - 1


def _save_rows(cache: Cache, shard: int, blocks: progress.Blocks, start: int, stop: int,
               opened: dict[str, Any]) -> tuple[str, int | None, int]:
    """Rows [start, stop) of a shard in progress into its units' arrays, then its progress record (writer thread)."""
    progress.save(cache.root, cache.meta, blocks, start, stop, opened)
    return cache.meta.shards[shard].name, stop, cache.meta.shards[shard].nsamples


def _index(urls: list[str], known: list[ShardRecord], known_key_bytes: int, dist: D.DistInfo) -> tuple[list[ShardRecord], int, dict[int, list[str]]]:
    """Shard records, key width and (for freshly indexed shards) the expected key order.

    Shards already fingerprinted in the cache are matched by their quick hash (cheap) instead of re-read;
    the rest are read and hashed once, split across ranks."""
    by_name = {r.name: r for r in known}
    mine: dict[int, Any] = {}
    for i in range(dist.rank, len(urls), dist.world_size):
        rec = by_name.get(shard_name(urls[i]))
        if rec is not None and rec.quick_hash == quick_hash(urls[i]):
            mine[i] = ShardIndex(ShardRecord(**{**rec.__dict__, "url": urls[i]}), known_key_bytes, [])
        else:
            mine[i] = index_shard(urls[i])
    merged: dict[int, ShardIndex] = {}
    for part in D.all_gather_objects(mine, dist):
        merged.update(part)
    indexes = [merged[i] for i in range(len(urls))]
    check_unique_keys([ix for ix in indexes if ix.keys])
    keys = {i: ix.keys for i, ix in enumerate(indexes) if ix.keys and dist.rank == i % dist.world_size}
    return [ix.record for ix in indexes], max(ix.max_key_bytes for ix in indexes), keys


def _recheck(cache: Cache, shards: Sequence[int]) -> list[tuple[str, str]]:
    """Re-check every existing unit of these shards (checksums, binding, meaning; no teacher forward) and
    withdraw the markers of damaged ones, so they are planned and rewritten like missing units and a crash
    during the repair never leaves a marker claiming damaged data. Returns (unit, first problem) pairs."""
    samples_of: dict[int, Any] = {}
    damaged = []
    for unit in (unit for shard in shards for unit in cache.units(shard)):
        found = check_unit(cache, unit, samples_of)
        if found.problems:
            damaged.append((unit.name, found.problems[0]))
            cache.withdraw(unit)
    return damaged


def _drop_stale_progress(cache: Cache, complete: set[int]) -> None:
    """Progress records of shards whose units are all complete (a crash between the last marker and the record's
    deletion): nothing reads them; delete them so `pld verify` does not report a shard in progress."""
    for name in progress.found(cache.root):
        shard = int(name[1:7]) if name[1:7].isdigit() and len(name) == 12 else -1
        if shard in complete:
            progress.discard(cache.root, shard)


def _plan(cache: Cache, shards: Sequence[int], num_views: int,
          teacher_ids: list[str], expected: dict[int, _Expected], urls: Sequence[str]) -> list[_Job]:
    """One job per shard with missing units. Shards whose samples unit is intact must match it sample by
    sample (keys and content digests) when they are read again. ``urls``: the user's own --data, in cache
    order (matched by content hash); a url recorded in the cache is never opened (it is a stranger's text and
    webdataset would run a ``pipe:`` one)."""
    jobs = []
    for s in shards:
        missing_params = sorted(set(range(num_views)) - cache.views_done(s))
        missing = {tid: sorted(set(range(num_views)) - cache.views_done(s, tid)) for tid in teacher_ids}
        need_samples = not cache.has_samples(s)
        views = sorted(set(missing_params).union(*missing.values())) or ([0] if need_samples else [])
        if not views:
            continue
        if not need_samples and (s not in expected or expected[s].digests is None):  # once, not every round
            samples = cache.samples(s)
            expected[s] = _Expected(schema.decode_keys(samples[schema.KEY.path()]), samples[schema.DIGEST.path()])
        rec = cache.meta.shards[s]
        jobs.append(_Job(s, urls[s], rec.nsamples, views, need_samples, _runs(missing_params),
                         {tid: _runs(v) for tid, v in missing.items() if v}))
    return jobs


def _wait_for_part_zero(cfg: CacheTeacherConfig, urls: list[str], emit: ProgressFn) -> None:
    """Independent workers (``--part I/N``, I > 0) share part 0's cache instead of racing to create it: wait until
    it holds every requested shard, teacher and view. Its shards are then matched by quick hash, not re-read."""
    names = {shard_name(u) for u in urls}
    deadline = time.monotonic() + cfg.part_wait
    while True:
        meta = Cache.meta_at(cfg.out)
        if meta is not None:
            if (names <= {s.name for s in meta.shards} and meta.num_views >= cfg.views
                    and {t.id for t in cfg.teachers} <= set(meta.teachers)):
                return
        if time.monotonic() > deadline:
            raise CacheError(f"--part {cfg.part[0]}/{cfg.part[1]}: part 0 has not created {cfg.out} with these shards, "
                             f"teachers and views within {cfg.part_wait:.0f} s; start part 0 (it creates the cache).")
        emit({"event": "waiting", "for": "part 0 to create the cache"})
        time.sleep(2.0)


def _load_teachers(cfg: CacheTeacherConfig, device: torch.device) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    models, prep = {}, {}
    for spec in cfg.teachers:
        # Seeded by (seed, id) so a teacher without a checkpoint (random init) is the same model on every rank,
        # resume and later extension, wherever it sits in the --teacher list.
        torch.manual_seed(stable_int(cfg.seed, spec.id) % 2**63)
        if spec.id in models:
            raise ValueError(f"Two teachers share the id '{spec.id}'; give them distinct --teacher-name values.")
        model = load_model(spec.source, num_classes=cfg.num_classes, checkpoint=spec.checkpoint,
                           pretrained=spec.pretrained)
        prep[spec.id] = preprocessing_of(model, mean=spec.mean, std=spec.std)
        require_teacher_input(prep[spec.id], spec.source, size_given=cfg.size is not None)
        model = model.to(device).eval()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[spec.id] = model
    return models, prep


def _num_classes(models: dict[str, torch.nn.Module], cfg: CacheTeacherConfig) -> int:
    widths = {tid: output_width(m) for tid, m in models.items()}
    if cfg.num_classes is not None:
        return cfg.num_classes
    values = {w for w in widths.values() if w}
    if len(values) != 1:
        raise ValueError(f"Cannot tell num_classes from the teachers ({widths}); pass --num-classes.")
    return values.pop()


def cache_teacher(cfg: CacheTeacherConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Fill ``cfg.out`` with every teacher's top-k record for every (sample, view). Resumable; torchrun-aware."""
    if not cfg.teachers:
        raise ValueError("No teacher given; pass --teacher NAME (timm name or module.path:factory).")
    if cfg.on_bad_sample not in ("error", "skip"):
        raise ValueError(f"--on-bad-sample must be 'error' or 'skip', got {cfg.on_bad_sample!r}.")
    if cfg.views < 1:
        raise ValueError(f"--views must be >= 1, got {cfg.views}.")
    # every setting is checked before anything is created at --out
    if (cfg.batch_size < 1 or (cfg.workers is not None and cfg.workers < 0)
            or not 0 < cfg.claim_ttl <= claims.MAX_TTL):
        raise ValueError(f"--batch-size must be >= 1, --workers >= 0 and --claim-ttl in (0, {claims.MAX_TTL:.0f}] "
                         f"seconds, got {cfg.batch_size}, {cfg.workers} and {cfg.claim_ttl}.")
    if (cfg.save_rows is not None and cfg.save_rows < 1) or not cfg.save_seconds > 0:
        raise ValueError(f"--save-rows must be >= 1 and --save-seconds > 0, got {cfg.save_rows} and "
                         f"{cfg.save_seconds}.")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"--teacher-precision must be fp32 or bf16, got {cfg.precision!r}.")
    if os.path.isfile(cfg.out):
        raise ValueError(f"--out {cfg.out} is an existing file; a cache is a directory (a zarr group): choose "
                         "another --out.")
    part, parts = cfg.part
    if part > 0 and cfg.overwrite:
        raise ValueError(f"--part {part}/{parts} with --overwrite would delete the other parts' work; only part 0 "
                         "may start a cache over.")
    if not 0 <= part < parts:
        raise ValueError(f"--part {part}/{parts}: the part index must lie in [0, {parts}) (0-based, like SLURM "
                         "array and Kubernetes completion indexes).")
    emit = progress or (lambda event: None)
    device = D.resolve_device(cfg.device, D.env_int("LOCAL_RANK", 0))
    D.configure_backends(device)
    dist = D.init_distributed(device)
    try:
        return _run(cfg, device, dist, emit)
    finally:
        D.cleanup(dist)


def _run(cfg: CacheTeacherConfig, device: torch.device, dist: D.DistInfo, emit: ProgressFn) -> dict[str, Any]:
    t_start = time.perf_counter()
    models, prep = _load_teachers(cfg, device)
    num_classes = _num_classes(models, cfg)
    first = cfg.teachers[0].id
    size = cfg.size or int(prep[first]["input_size"][-1])
    recipe = ViewRecipe(name=cfg.recipe, size=size, clean_view=cfg.clean_view, image_field=cfg.image_field,
                        # the teacher's declared resize filter where the recipe supports it, else the recipe's bilinear
                        interpolation=prep[first]["interpolation"] if prep[first]["interpolation"] in ("bilinear", "bicubic", "nearest") else "bilinear",
                        **cfg.recipe_overrides)
    k = num_classes if cfg.k is None else min(int(cfg.k), num_classes)
    if k < 1:
        raise ValueError(f"--top-k must be >= 1, got {cfg.k}.")
    temps = tuple(float(t) for t in cfg.temperatures)
    if not temps or any(t <= 0 for t in temps):
        raise ValueError(f"--temperatures must be positive numbers, got {cfg.temperatures}.")

    urls = expand_shards(cfg.data)
    if cfg.part[0] > 0:  # part 0 creates or extends the cache; the others start once it has
        _wait_for_part_zero(cfg, urls, emit)
    existing = None if cfg.overwrite else Cache.meta_at(cfg.out)
    known, known_key_bytes = (existing.shards, existing.key_bytes) if existing else ([], 1)
    emit({"event": "indexing", "shards": len(urls)})
    records, key_bytes, indexed_keys = _index(urls, known, known_key_bytes, dist)
    expected = {s: _Expected(keys) for s, keys in indexed_keys.items()}
    teachers = {}
    for spec in cfg.teachers:
        p = prep[spec.id]
        p["input_size"] = [3, size, size]
        hub = pretrained_identity(models[spec.id]) if spec.pretrained else None
        teachers[spec.id] = TeacherRecord(
            id=spec.id, source=spec.source, checkpoint=os.path.basename(spec.checkpoint) if spec.checkpoint else None,
            checkpoint_sha256=file_sha256(spec.checkpoint) if spec.checkpoint else (hub or {}).get("sha256"),
            preprocessing=p, k=k, temperatures=temps, index_dtype=str(index_dtype(num_classes)),
            num_params=sum(x.numel() for x in models[spec.id].parameters()), precision=cfg.precision, pretrained=hub)
    problem = class_names_problem(cfg.class_names)
    if problem:  # readers refuse such a cache at open: do not write one
        raise ValueError(f"--class-names {problem}; give one distinct, non-empty name per class.")
    request = CacheMeta(num_classes=num_classes, rows_per_shard=max(r.nsamples for r in records),
                        key_bytes=key_bytes, shards=records, recipe=recipe.to_dict(), num_views=cfg.views,
                        seed=cfg.seed, teachers=teachers, class_names=cfg.class_names)
    cache = None
    if dist.is_main:
        cache = Cache.create_or_extend(cfg.out, request, overwrite=cfg.overwrite,
                                       compression_level=cfg.compression_level)
    D.barrier(dist)  # every array and group exists before any unit is written
    cache = cache or Cache(cfg.out, mode="r+")
    part, parts = cfg.part
    my_shards = [s for s in range(len(records)) if s % parts == part][dist.rank::dist.world_size]
    cache.sync_index(my_shards)  # hosts that cannot list read the index: it must match the markers
    repaired = _recheck(cache, my_shards)
    if repaired:
        emit({"event": "repairing", "units": repaired})
    user_urls = [r.url for r in records]  # the user's --data, never the urls recorded in the cache
    jobs = _plan(cache, my_shards, cfg.views, list(teachers), expected, user_urls)
    _drop_stale_progress(cache, set(my_shards) - {j.shard for j in jobs})
    total_items = sum(j.nsamples * len(j.views) for j in jobs)
    emit({"event": "start", "items": total_items, "shards": len(jobs), "shards_total": len(records),
          "skipped_shards": len(my_shards) - len(jobs), "rank": dist.rank, "save_rows": cfg.save_rows,
          "save_seconds": cfg.save_seconds})
    stats = _empty_stats(teachers)
    owner = claims.new_owner()
    while jobs:  # rounds: claim a share of the free shards, write them, re-plan (other workers may have done some)
        checked_at = time.monotonic()
        free = [j for j in _rotate(jobs, owner) if not claims.held_by_other(cache.root, j.shard, owner)]
        if not free:  # every shard left is being written by another live worker: wait for it, or for its claim to expire
            emit({"event": "waiting", "for": f"{len(jobs)} shard(s) claimed by other workers"})
            time.sleep(min(5.0, cfg.claim_ttl / 4))
        else:
            wanted = free[:max(1, -(-len(jobs) // 8))]
            mine = set(claims.acquire(cache.root, [j.shard for j in wanted], owner, cfg.claim_ttl, checked_at))
            batch = [j for j in wanted if j.shard in mine]
            with claims.Heartbeat(cache.root, [j.shard for j in batch], owner, cfg.claim_ttl):
                _add_stats(stats, _process(cfg, batch, cache, models, prep, teachers, recipe, num_classes, device,
                                           expected, emit))
        cache.refresh()
        jobs = _plan(cache, [j.shard for j in jobs], cfg.views, list(teachers), expected, user_urls)
    totals = D.all_reduce_sum([stats["items"], stats["skipped"], *[stats["correct"][t] for t in teachers],
                               *[stats["count"][t] for t in teachers]], dist, device)
    repaired = [name for part in D.all_gather_objects([name for name, _ in repaired], dist) for name in part]
    D.barrier(dist)  # rank 0 reports only after every rank's units are written
    digest, complete = None, False
    if dist.is_main:
        cache.ensure_key_index(cfg.compression_level)
        # What a consumer pins (docs/cache-format.md, "Cache digest"). A --part worker that finishes before the
        # others reports the digest of an incomplete cache: it changes as the other parts write.
        complete = not any(cache.missing_units(tid) for tid in cache.meta.teachers) and not cache.missing_units(None)
        digest = cache.digest()
    elapsed = time.perf_counter() - t_start
    n_t = len(teachers)
    summary = {
        "cache": cfg.out, "shards": len(records), "shards_written": stats["shards"], "items": int(totals[0]),
        "skipped_samples": int(totals[1]), "seconds": elapsed, "items_per_s": totals[0] / max(elapsed, 1e-9),
        "teacher_accuracy": {tid: totals[2 + i] / totals[2 + n_t + i] if totals[2 + n_t + i] else None
                             for i, tid in enumerate(teachers)},
        "num_classes": num_classes, "k": k, "views": cfg.views, "world_size": dist.world_size,
        "repaired_units": sorted(repaired), "digest": digest, "complete": complete,
    }
    summary["warnings"] = [w for tid, acc in summary["teacher_accuracy"].items()
                           if (w := chance_warning(tid, acc, num_classes))]
    emit({"event": "end", **summary})
    return summary


def _empty_stats(teachers: dict[str, TeacherRecord]) -> dict[str, Any]:
    return {"items": 0, "skipped": 0, "shards": 0, "correct": dict.fromkeys(teachers, 0),
            "count": dict.fromkeys(teachers, 0)}


def _add_stats(total: dict[str, Any], part: dict[str, Any]) -> None:
    for name in ("items", "skipped", "shards"):
        total[name] += part[name]
    for name in ("correct", "count"):
        for tid, value in part[name].items():
            total[name][tid] += value


def _rotate(jobs: list[_Job], owner: str) -> list[_Job]:
    """Each worker scans the shards from its own starting point, so workers started together claim different
    shards instead of racing for the same first ones."""
    start = stable_int(owner) % len(jobs)
    return jobs[start:] + jobs[:start]


def _process(cfg: CacheTeacherConfig, jobs: list[_Job], cache: Cache, models: dict[str, torch.nn.Module],
             prep: dict[str, dict], teachers: dict[str, TeacherRecord], recipe: ViewRecipe, num_classes: int,
             device: torch.device, expected: dict[int, _Expected], emit: ProgressFn) -> dict[str, Any]:
    stats = _empty_stats(teachers)
    if not jobs:
        return stats
    buffers = {j.shard: _ShardBuffer(j, teachers, recipe.params_width) for j in jobs}
    for job in jobs:  # before the loader copies the jobs into its workers
        _resume(cache, buffers[job.shard], emit)
    dataset = _ViewItems(jobs, recipe, cfg.seed, cfg, num_classes, expected)
    workers = min(D.loader_workers(cfg.workers, device), len(jobs))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    # fp32 by default: bf16 logits reorder the top-k of most rows of a 1000-class batch (ties and near-ties) and
    # move log-probs by up to ~0.08, so a GPU-built cache would differ from a CPU-built one. bf16 is an opt-in,
    # recorded in the teacher record (and so bound to every unit).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    if device.type == "cuda" and cfg.precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions round inputs to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = False
    pending: list[Future] = []
    opened: dict[str, Any] = {}  # arrays the writer thread has opened for saves

    def save(buf: _ShardBuffer) -> None:  # the finished rows of a shard in progress, in the writer thread
        blocks = {u.name: buf.unit_arrays(u, cache.meta.key_bytes, buf.done) for u in buf.job.units()}
        pending.append(pool.submit(_save_rows, cache, buf.job.shard, blocks, buf.saved, buf.done, opened))
        buf.saved, buf.saved_at = buf.done, time.monotonic()

    def finished(result: tuple[str, int | None, int]) -> None:
        name, rows, of = result
        if rows is None:
            stats["shards"] += 1
            emit({"event": "shard_done", "shard": name})
        else:
            emit({"event": "rows_saved", "shard": name, "rows": rows, "of": of})

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pld-cache-writer") as pool:
        try:
            for shard_ids, rows, views, keys, labels, firsts, status, images, params, digests in worker_errors(loader):
                x = images.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                labels_dev = firsts.to(device, non_blocking=True).long()  # label_logp: the label ranked first
                ok_dev = status.to(device, non_blocking=True) == SampleStatus.OK
                encoded: dict[str, dict[str, np.ndarray]] = {}
                with torch.inference_mode(), autocast:
                    for tid, model in models.items():
                        logits = model(normalize(x, prep[tid]["mean"], prep[tid]["std"])).float()
                        bad = ~torch.isfinite(logits).all(1) & ok_dev
                        if bad.any():
                            i = int(bad.nonzero()[0])
                            raise DataError(f"Teacher '{tid}' produced NaN/Inf logits for sample {keys[i]!r} view "
                                            f"{int(views[i])}; check the checkpoint and preprocessing.")
                        logits = torch.nan_to_num(logits)
                        enc = encode_teacher_logits(logits, labels_dev, k=teachers[tid].k,
                                                    temperatures=teachers[tid].temperatures)
                        encoded[tid] = {name: t.cpu().numpy() for name, t in enc.items()}
                shard_np, rows_np, views_np = shard_ids.numpy(), rows.numpy(), views.numpy()
                status_np, labels_np = status.numpy().astype(np.uint8), labels.numpy().astype(np.int32)
                params_np, digests_np = params.numpy(), digests.numpy()
                keys = list(keys)
                for shard in np.unique(shard_np):
                    sel = shard_np == shard
                    buf = buffers[int(shard)]
                    buf.add(rows_np, views_np, keys, labels_np, status_np, params_np, digests_np, encoded, sel)
                    if buf.remaining == 0:
                        ok = buf.status == SampleStatus.OK
                        for tid in teachers:
                            stats["correct"][tid] += int(buf.out[tid]["correct"][ok].sum())
                            stats["count"][tid] += int(ok.sum()) * len(buf.job.views)
                        stats["skipped"] += int((buf.status == SampleStatus.SKIPPED).sum())
                        pending.append(pool.submit(_write_shard, cache, buffers.pop(int(shard))))
                    elif buf.due(cfg.save_rows, cfg.save_seconds):
                        save(buf)
                stats["items"] += len(keys)
                emit({"event": "batch", "items": len(keys)})
                while pending and (pending[0].done() or len(pending) > 2):  # bounded memory; surface write errors
                    finished(pending.pop(0).result())
        except KeyboardInterrupt:  # Ctrl-C: keep every finished row (writes complete before the executor exits)
            for buf in buffers.values():
                if buf.done > buf.saved:
                    save(buf)
            for fut in pending:
                finished(fut.result())
            raise
        for fut in pending:
            finished(fut.result())
    if buffers:
        raise DataError(f"Shards ended early: {', '.join(cache.meta.shards[s].name for s in buffers)}.")
    return stats
