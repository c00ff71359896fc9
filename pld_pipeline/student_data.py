"""What a student trains and evaluates on: tar samples joined with cached teacher targets by key.

:class:`StudentData` is the public face (any training loop; `pld distill` is built on it). Per epoch: shards
shuffled by (seed, epoch), cut into equal runs of samples per rank, then dealt to DataLoader workers. A worker reads one
whole cache block per shard (one contiguous read per array and view), replays each sample's chosen view from
its stored params and emits image + targets together, so targets travel with the sample through the shuffle
buffer. Memory is one shard block per worker plus the shuffle buffer, whatever the dataset size.
"""
from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .cache import Cache
from .class_map import (
    ClassMap, ClassMapError, dataset_classes, label_space, load_class_map, map_targets, parse_class_map, student_labels,
    teacher_names,
)
from .cache import schema
from .cache.format import CacheError, SampleStatus, TeacherRecord, sample_digest
from .data import (
    DataError, expand_shards, index_shard, iter_shard, parse_label, pick_field, quick_hash, shard_name, worker_errors,
)
from .losses import MixedLabels, TeacherTargets
from .shards import read_classes
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .views import (
    KIND_PLAIN, ViewError, ViewRecipe, decode_image, eval_params, replay_mixed, replay_view, stable_int, view_kind, view_lambda,
    view_params,
)

VIEW_POLICIES = ("rotate", "random")


@dataclass(frozen=True)
class TrainShard:
    url: str
    nsamples: int
    cache_shard: int | None  # row block in the cache; None when training without one (--loss ce)


def choose_view(policy: str, seed: int, key: str, epoch: int, num_views: int) -> int:
    """rotate: every sample walks through all views, starting at a per-sample offset from a stable hash;
    random: an independent stable draw per (sample, epoch)."""
    if policy == "rotate":
        return (epoch + stable_int(seed, key)) % num_views
    if policy == "random":
        return stable_int(seed, key, epoch) % num_views
    raise ValueError(f"Unsupported view policy '{policy}'. Use one of: {', '.join(VIEW_POLICIES)}.")


@dataclass(frozen=True)
class ShardRange:
    """Part of one shard for one rank in one epoch: its usable samples ``start <= i < stop`` (0-based, counting
    only samples that train: those skipped at cache time do not count)."""
    shard: TrainShard
    start: int
    stop: int


def samples_per_rank(shards: Sequence[TrainShard], world: int) -> int:
    return sum(s.nsamples for s in shards) // world


def ranges_for(shards: Sequence[TrainShard], epoch: int, seed: int, rank: int, world: int) -> list[ShardRange]:
    """This rank's part of an epoch: the shards in the epoch's shuffled order, laid end to end and cut into
    ``world`` equal runs of samples. Every rank gets the same number of samples (DDP needs equal steps) and
    every shard is read every epoch, whatever the shard sizes (at most world - 1 samples are left over); a rank
    whose run starts inside a shard streams past the samples before it without decoding them."""
    order = list(shards)
    random.Random(stable_int(seed, "shards", epoch)).shuffle(order)
    quota = samples_per_rank(order, world)
    lo, hi, pos, mine = rank * quota, (rank + 1) * quota, 0, []
    for shard in order:
        a, b = max(lo, pos), min(hi, pos + shard.nsamples)
        if a < b:
            mine.append(ShardRange(shard, a - pos, b - pos))
        pos += shard.nsamples
    return mine


class TrainSamples(IterableDataset):
    """One epoch of training samples for this rank; call :meth:`set_epoch` before each epoch."""

    def __init__(self, shards: Sequence[TrainShard], *, recipe: ViewRecipe, seed: int, rank: int, world: int,
                 cache_url: str | None = None, teachers: Sequence[str] = (), k: int | None = None,
                 temperature: float = 1.0,
                 num_views: int = 1, view_policy: str = "rotate", shuffle_buffer: int = 1000,
                 image_field: str = "jpg;jpeg;png;webp", label_field: str = "cls", num_classes: int | None = None,
                 cache_dir: str | None = None, student_size: int | None = None, cache: Cache | None = None,
                 label_map: np.ndarray | None = None) -> None:
        self.shards, self.recipe, self.seed, self.rank, self.world = list(shards), recipe, seed, rank, world
        #: teacher-labelled data under a class map: each cached label's student class, -1 outside the map (skipped)
        self.label_map = label_map
        #: the caller's pinned digest: each worker process checks it again when it opens the cache
        self.expect_digest = cache.expected_digest if cache is not None else None
        self._pins = cache.pins() if cache is not None else None  # what it was checked against (not re-read)
        self.cache_url, self.teachers, self.temperature = cache_url, list(teachers), temperature
        self.k = k
        self.num_views, self.view_policy, self.shuffle_buffer = num_views, view_policy, shuffle_buffer
        self.image_field, self.label_field, self.num_classes = image_field, label_field, num_classes
        self.student_size = student_size
        self.cache_dir = cache_dir
        self.epoch = 0
        #: the process's open cache (``cache``: the caller's, reused in its process); other processes open their own
        self._reader, self._reader_pid = cache, os.getpid()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cache(self) -> Cache:
        if self._reader is None or self._reader_pid != os.getpid():  # zarr/fsspec handles do not survive a fork
            self._reader = Cache(self.cache_url, cache_dir=self.cache_dir, expect_digest=self.expect_digest,
                                 pinned=self._pins)
            self._reader_pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def _replay(self, replay: Callable[..., torch.Tensor], key: str, shard: TrainShard, view: int,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        """A cached view replayed, or one line naming the sample when its stored parameters are not drawable."""
        try:
            return replay(*args, self.recipe, **kwargs)
        except ViewError as e:
            raise CacheError(f"View {view} of sample {key!r} (cache shard {shard.cache_shard}): {e}; the cache is "
                             "damaged or was edited (run `pld verify`), nothing was trained on it.") from None

    def _block_rows(self, blocks: list[Any]) -> dict[str, Any]:
        """Per-block work done once per shard in numpy instead of once per sample: each row's view this epoch,
        its (mapped) label and the targets of exactly that view from every teacher (rows are then views into
        these arrays)."""
        block = blocks[0]
        views = np.array([choose_view(self.view_policy, self.seed, key, self.epoch, self.num_views)
                          for key in block.keys], np.int64).reshape(-1)
        rows = np.arange(len(views))
        labels = block.labels.astype(np.int64)
        if self.label_map is not None:  # mapped where the row trains (other rows' labels may be -1)
            ok = block.status == SampleStatus.OK
            labels = np.where(ok, 0, -1)
            labels[ok] = self.label_map[block.labels[ok].astype(np.int64)]
        out: dict[str, Any] = {"views": views.tolist(), "status": block.status.tolist(), "labels": labels.tolist(),
                               "source": np.stack([np.full(len(views), block.shard, np.int64), views], 1)}
        if self.teachers:  # [n, teachers, k]: --loss ce reads no teacher arrays
            k = slice(0, self.k)
            out.update(topk_idx=np.stack([b.topk_idx[rows, views, k] for b in blocks], 1).astype(np.int64),
                       topk_logp=np.stack([b.topk_logp[rows, views, k] for b in blocks], 1),
                       label_logp=np.stack([b.label_logp[rows, views] for b in blocks], 1),
                       logz=np.stack([b.logz[rows, views] for b in blocks], 1))
        return out

    def _samples(self, part: ShardRange) -> Iterator[dict[str, Any]]:
        shard, used = part.shard, -1  # used: index of the current sample among the shard's usable ones
        block = None
        if self.cache_url is not None:  # one block per teacher (an ensemble reads several); keys and views from the first
            blocks = [self._cache().read(shard.cache_shard, tid, self.temperature, self.num_views)
                      for tid in self.teachers or [None]]
            block = blocks[0]
            per = self._block_rows(blocks)
            status, labels, views = per["status"], per["labels"], per["views"]
            targets = [name for name in ("topk_idx", "topk_logp", "label_logp", "logz") if name in per]
        mix = self.recipe.mixing if block is not None else None
        recent: dict[int, bytes] = {}  # mixed views: encoded images of the last `window` rows (partners come from there)
        for i, sample in enumerate(iter_shard(shard.url)):
            key = sample["__key__"]
            item: dict[str, Any] = {}
            if block is not None:
                row = i  # the cache's rows are the shard's samples in tar order: each row is used once per pass
                if row >= len(block.keys) or block.keys[row] != key:
                    cached = repr(block.keys[row]) if row < len(block.keys) else "no sample"
                    raise CacheError(f"Sample {i} of {shard.url} is {key!r} where the cache holds {cached}: the shard "
                                     "was reordered, edited or repeats a sample; train on the cached shards.")
                if self.label_map is not None and (status[row] != SampleStatus.OK or labels[row] < 0):
                    continue  # not in this student's classes: not hashed, not decoded, not counted
                if block.digests[row].tobytes() != sample_digest(sample):
                    raise CacheError(f"Sample {key!r} of {shard.url} is not the sample cached under that key (content "
                                     "digest differs): the shard was edited or re-encoded after caching. Train on "
                                     "the cached shards, or re-cache them (`pld cache-teacher --overwrite`).")
                if mix is not None:
                    recent[row] = pick_field(sample, self.image_field)
                    recent.pop(row - mix.window - 1, None)
                if status[row] != SampleStatus.OK:
                    continue  # skipped at cache time (undecodable): skipped here too
                used += 1
                if used < part.start:
                    continue
                if used >= part.stop:
                    return
                v, label = views[row], labels[row]
                item["source"] = per["source"][row]  # where its targets came from: (cache shard, view)
                params = block.params[row, v]
                item.update((name, per[name][row]) for name in targets)
                image = decode_image(pick_field(sample, self.image_field))
                if mix is not None:
                    partner = None
                    if view_kind(params) != KIND_PLAIN:
                        partner_row = int(params[6])
                        if partner_row not in recent:
                            raise CacheError(f"Mixed view {v} of sample {key!r} names partner row {partner_row}, "
                                             f"not one of the {mix.window} rows before it in {shard.url}: the "
                                             "cache is damaged (run `pld verify`).")
                        partner = decode_image(recent[partner_row])
                        item.update(label2=int(block.labels[partner_row]), lam=view_lambda(params))
                    else:
                        item.update(label2=label, lam=1.0)
                    view_image = self._replay(replay_mixed, key, shard, v, image, partner, params)
                else:
                    view_image = self._replay(replay_view, key, shard, v, image, params, contiguous=False)
                item.update(__key__=key, image=at_size(view_image, self.student_size), label=label)
                yield item
                continue
            else:
                used += 1
                if used < part.start:
                    continue
                if used >= part.stop:
                    return
                label = parse_label(sample, self.label_field, self.num_classes)
                data = pick_field(sample, self.image_field)
                if data is None:
                    raise DataError(f"No '{self.image_field}' image in sample {key!r} of {shard.url}; set --image-field.")
                image = decode_image(data)
                params = view_params(self.recipe, self.seed, key, self.epoch, image.shape[1], image.shape[2])
                view = replay_view(image, params, self.recipe, check=False, contiguous=False)  # drawn here
                item.update(__key__=key, image=at_size(view, self.student_size), label=label)
            yield item
        if block is not None and used + 1 < part.stop:  # every OK row the range needs was streamed, once
            raise CacheError(f"{shard.url} yielded {used + 1} usable samples, fewer than the {part.stop} the cache "
                             "recorded for it: the shard was truncated or edited; train on the cached shards.")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = ranges_for(self.shards, self.epoch, self.seed, self.rank, self.world)[wid::nworkers]
        stream = (item for part in mine for item in self._samples(part))
        rng = random.Random(stable_int(self.seed, "shuffle", self.epoch, self.rank, wid))
        threads = torch.get_num_threads() if info is None else 1
        try:  # DataLoader workers run on one intra-op thread (torch sets it); in the caller's process (workers=0)
            # decoding and replay do too, and the caller gets its threads back whenever it holds an item
            torch.set_num_threads(1)
            for item in wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream):
                item.pop("__key__")
                torch.set_num_threads(threads)
                yield item
                torch.set_num_threads(1)
        finally:
            torch.set_num_threads(threads)


class EvalSamples(IterableDataset):
    """The clean eval view of every sample in the given shards (split across ranks and workers)."""

    def __init__(self, urls: Sequence[str], *, recipe: ViewRecipe, rank: int, world: int, num_classes: int,
                 image_field: str = "jpg;jpeg;png;webp", label_field: str = "cls",
                 student_size: int | None = None, label_map: np.ndarray | None = None) -> None:
        self.urls, self.recipe, self.rank, self.world = list(urls), recipe, rank, world
        self.num_classes, self.image_field, self.label_field = num_classes, image_field, label_field
        self.student_size = student_size
        #: teacher-labelled shards under a class map (``num_classes`` then the teacher's): each label's student
        #: class, -1 for a label in no group (that sample is skipped, not decoded: top-1 is over in-map samples)
        self.label_map = label_map

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (0, 1) if info is None else (info.id, info.num_workers)
        for url in self.urls[self.rank::self.world][wid::nworkers]:
            for sample in iter_shard(url):
                label = parse_label(sample, self.label_field, self.num_classes)
                if self.label_map is not None:
                    label = int(self.label_map[label])
                    if label < 0:
                        continue
                data = pick_field(sample, self.image_field)
                if data is None:
                    raise DataError(f"No '{self.image_field}' image in sample {sample['__key__']!r} of {url}.")
                image = decode_image(data)
                params = eval_params(self.recipe, image.shape[1], image.shape[2])
                view = replay_view(image, params, self.recipe, check=False)  # the eval view, drawn here
                yield {"image": at_size(view, self.student_size), "label": label}


def at_size(view: torch.Tensor, size: int | None) -> torch.Tensor:
    """The student's input: the replayed view, resized to ``size`` (antialiased bilinear on uint8) when the student
    trains at its own resolution (fastest on a channels-last view: ``replay_view(..., contiguous=False)``). The
    teacher's targets belong to the full-resolution view; distilling them into a low-resolution student is the
    usual way to get a fast one (see docs/quickstart.md)."""
    if size is None or view.shape[-1] == size and view.shape[-2] == size:
        return view
    return TF.resize_image(view, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def batch_targets(batch: dict[str, torch.Tensor], temperature: float, num_classes: int,
                  top_k: int | None = None, class_map: ClassMap | None = None) -> TeacherTargets | None:
    """A loader batch's cached arrays (``[B, teachers, k]``) as loss targets (None when training without a cache):
    one teacher's as they are, several teachers' as their :meth:`TeacherTargets.ensemble`. ``top_k`` keeps the
    first k classes: exactly what a cache made with that k would hold. ``num_classes``: the teacher's.
    ``class_map``: the (ensembled) teacher's targets mapped to the student's classes (class_map.map_targets), the
    label ranked first being the sample's own or, for a mixed view, the dominant one."""
    if "topk_idx" not in batch:
        return None
    k = slice(0, top_k)
    members = [TeacherTargets(topk_idx=batch["topk_idx"][:, i, k], topk_logp=batch["topk_logp"][:, i, k].float(),
                              label_logp=batch["label_logp"][:, i].float(), logz=batch["logz"][:, i].float(),
                              temperature=temperature, num_classes=num_classes)
               for i in range(batch["topk_idx"].shape[1])]
    targets = members[0] if len(members) == 1 else TeacherTargets.ensemble(members)
    if class_map is None:
        return targets
    labels = batch["label"].long()
    if "lam" in batch:
        labels = MixedLabels(batch["label2"].long(), batch["lam"].float()).dominant(labels)
    return map_targets(targets, class_map, labels)


@dataclass
class Batch:
    """One training batch: the replayed views (the exact uint8 tensors the teacher saw), labels, and the cached
    teacher's targets for exactly those views (None without a cache). All on the CPU; move with ``.to``."""
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]: each sample's own label
    targets: TeacherTargets | None
    mix: MixedLabels | None = None  # a cache with mixed views: partners' labels and lambdas (pass to the loss)
    #: int64 [B, 2] on the CPU: each sample's (cache shard, view), to name the cache units a bad step came from
    source: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.images), move(self.labels),
                     None if self.targets is None else self.targets.to(device, non_blocking),
                     None if self.mix is None else self.mix.to(device, non_blocking), self.source)


class StudentData:
    """What `pld distill` trains on, for any training loop: open a cache once, then iterate an epoch's batches.

    The same key join, view choice, rank split, shuffle and read-time integrity checks as `pld distill` (which is
    built on it): every rank gets the same number of batches per epoch (``len(data)``), and a run's data order
    depends only on (seed, epoch). Under torch.distributed the rank and world size are read from the process
    group. Without ``cache`` it streams plain labelled views (``num_classes`` and ``recipe`` then needed).
    ``expect_digest`` (``sha256:HEX``, as published beside a shared cache) refuses any other cache."""

    def __init__(self, data: str | Sequence[str], *, cache: str | None = None, teacher: str | None = None,
                 temperature: float = 1.0, batch_size: int = 128, seed: int = 0, view_policy: str = "rotate",
                 top_k: int | None = None, with_targets: bool = True, workers: int = 2, shuffle_buffer: int = 1000,
                 cache_dir: str | None = None, num_classes: int | None = None, recipe: ViewRecipe | None = None,
                 image_field: str | None = None, label_field: str = "cls", pin_memory: bool = False,
                 student_size: int | None = None, rank: int | None = None, world_size: int | None = None,
                 expect_digest: str | None = None, class_map: str | list | ClassMap | None = None,
                 labels: str | None = None) -> None:
        if view_policy not in VIEW_POLICIES:
            raise ValueError(f"Unsupported view policy '{view_policy}'. Use one of: {', '.join(VIEW_POLICIES)}.")
        if rank is None or world_size is None:
            import torch.distributed as dist
            on = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.batch_size, self.temperature, self.top_k, self.workers = batch_size, temperature, top_k, workers
        self.pin_memory, self.rank, self.world_size = pin_memory, rank, world_size
        if expect_digest is not None and not cache:
            raise ValueError("expect_digest pins a teacher cache, but no cache was given.")
        # expect_digest: refuse (before anything else reads it) a cache other than the one the digest was published for
        self.reader = Cache(cache, cache_dir=cache_dir, expect_digest=expect_digest) if cache else None
        self.teachers: list[TeacherRecord] = []
        self.class_map: ClassMap | None = None
        self.teacher_classes: int | None = None  # the cached teacher's classes (the student's too, without a map)
        if class_map is not None and self.reader is None:
            raise ValueError("--class-map maps a cached teacher's classes to the student's; it needs --cache.")
        if labels is not None and class_map is None:
            raise ValueError("--labels says which classes the shards' labels are in under a --class-map; give one.")
        if self.reader is not None:
            meta = self.reader.meta
            self.teacher_classes = meta.num_classes
            if class_map is not None:  # the student's classes are the map's entries
                self.class_map = _class_map(class_map, meta.num_classes,
                                            teacher_names(meta.class_names, meta.num_classes))
            student_classes = self.class_map.num_classes if self.class_map else meta.num_classes
            if num_classes is not None and num_classes != student_classes:
                whose = "class map's" if self.class_map else "cache's"
                raise ValueError(f"--num-classes {num_classes} differs from the {whose} {student_classes} classes.")
            self.num_classes, self.recipe = student_classes, ViewRecipe.from_dict(meta.recipe)
            if image_field is not None and image_field != self.recipe.image_field:
                raise ValueError(f"--image-field {image_field!r} differs from the field(s) the cache's views were "
                                 f"drawn from ({self.recipe.image_field!r}): the student must see the teacher's "
                                 "image; drop --image-field.")
            if with_targets:  # "a,b": an ensemble of cached teachers
                ids = [t.strip() for t in teacher.split(",")] if teacher else [None]
                self.teachers = [self.reader.teacher(tid) for tid in ids]
                for rec in self.teachers:
                    self.reader.temperature_column(rec, temperature)  # refuses one outside the cached grid
                k = min(rec.k for rec in self.teachers)
                if top_k is not None and not 1 <= top_k <= k:
                    raise ValueError(f"--top-k {top_k} must lie in [1, {k}], the k the teacher(s) were cached with.")
        else:
            if num_classes is None or recipe is None:
                raise ValueError("Training without a cache needs num_classes and a view recipe.")
            self.num_classes, self.recipe = num_classes, recipe
            if image_field is not None:
                self.recipe = dataclasses.replace(recipe, image_field=image_field)
        #: the sample field(s) images are read from: the cache's when training from one
        self.image_field = self.recipe.image_field
        self.shards = self._shards(data)
        if self.reader is not None:
            for rec in self.teachers or [None]:
                self.reader.require_complete(rec and rec.id, [s.cache_shard for s in self.shards])
        #: under a class map: "teacher" or "student", the classes the shards' labels are in (class_map.label_space)
        self.label_space: str | None = None
        #: teacher-labelled data: each cached label's student class, -1 outside the map (those samples are skipped)
        self.label_map: np.ndarray | None = None
        #: usable samples of the training shards, and those this student trains on (fewer under a subset map)
        self.cached_samples = self.train_samples = sum(s.nsamples for s in self.shards)
        if self.class_map is not None:
            self._subset(data, labels)
        per_rank = samples_per_rank(self.shards, world_size)
        if per_rank < batch_size:
            raise ValueError(f"--batch-size {batch_size} exceeds the {per_rank} samples each of the {world_size} "
                             "process(es) sees per epoch; lower --batch-size.")
        self.steps_per_epoch = per_rank // batch_size
        self.dataset = TrainSamples(
            self.shards, recipe=self.recipe, seed=seed, rank=rank, world=world_size,
            cache_url=self.reader.url if self.reader else None, teachers=[rec.id for rec in self.teachers],
            k=min((rec.k for rec in self.teachers), default=None),
            temperature=temperature, num_views=self.reader.meta.num_views if self.reader else 1,
            view_policy=view_policy, shuffle_buffer=shuffle_buffer, image_field=self.image_field, label_field=label_field,
            num_classes=self.num_classes, cache_dir=cache_dir, student_size=student_size, cache=self.reader,
            label_map=self.label_map)
        self.student_size = student_size

    def _subset(self, data: str | Sequence[str], labels: str | None) -> None:
        """Which classes the shards' labels are in and, for the teacher's, the subset of samples in the map: each
        shard's count comes from its cached labels, so every rank's share (and step count) is exact before any
        image is read, and a resumed run gets the same subset."""
        assert self.reader is not None and self.class_map is not None
        cached = [self._usable_labels[s.cache_shard] for s in self.shards]
        classes = read_classes(expand_shards(data)[0])  # the dataset's own classes, when make-shards wrote them
        meta = self.reader.meta
        self.label_space = label_space(self.class_map, np.concatenate(cached) if cached else np.zeros(0, np.int64),
                                       labels, len(classes) if classes else dataset_classes(meta.class_names,
                                                                                            meta.num_classes))
        self.label_map = student_labels(self.class_map, self.label_space)
        if self.label_map is None:
            return
        if self.recipe.mixing is not None:
            raise ClassMapError("a cache with mixed views (CutMix/Mixup) pairs samples across classes; a class map "
                                "over teacher-labelled shards cannot drop the out-of-map ones from those pairs: "
                                "use a cache without --mix, or shards labelled in the student's classes.")
        self.shards = [dataclasses.replace(s, nsamples=int((self.label_map[c] >= 0).sum()))
                       for s, c in zip(self.shards, cached)]
        self.train_samples = sum(s.nsamples for s in self.shards)
        if not self.train_samples:
            raise ClassMapError("no training sample has a label in the class map's groups; check the map (or "
                                "--labels).")

    def _shards(self, data: str | Sequence[str]) -> list[TrainShard]:
        """The training shards, matched to the cache by content (quick hash): a subset of the cached ones is fine."""
        urls = expand_shards(data)
        if self.reader is None:
            return [TrainShard(u, index_shard(u).record.nsamples, None) for u in urls]
        found = []
        for url in urls:
            qh = quick_hash(url)
            try:
                idx = self.reader.shard_for(quick_hash=qh) if qh is not None else self.reader.shard_for(name=shard_name(url))
            except CacheError:
                raise CacheError(f"Training shard {url} is not one the cache {self.reader.url} covers (by content hash); "
                                 "train on the cached shards (a subset is fine) or cache these first.") from None
            found.append((url, idx))
        #: each training shard's cached labels of its usable samples (``samples/label``; no image is read): every
        #: samples unit read and checked once, all at once (_subset counts a class map's samples from them)
        self._usable_labels = self.reader.samples_of([idx for _, idx in found], keep=_ok_labels)
        return [TrainShard(url, len(self._usable_labels[idx]), idx) for url, idx in found]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's ``len(self)`` batches of one epoch, in an order fixed by (seed, epoch)."""
        self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers, pin_memory=False,
                            prefetch_factor=4 if self.workers else None, persistent_workers=False, collate_fn=collate)
        for step, batch in enumerate(rebatch(worker_errors(loader), self.batch_size, pin=self.pin_memory)):
            if step >= self.steps_per_epoch:
                return
            mix = MixedLabels(batch["label2"].long(), batch["lam"].float()) if "lam" in batch else None
            yield Batch(batch["image"], batch["label"].long(),
                        batch_targets(batch, self.temperature, self.teacher_classes, self.top_k, self.class_map),
                        mix, batch.get("source"))

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the teacher outputs a run used (recorded in each run's config.json)."""
        if self.reader is None:
            return None
        meta = self.reader.meta
        return {"url": self.reader.url, "num_classes": meta.num_classes, "num_views": meta.num_views,
                "seed": meta.seed, "recipe": meta.recipe,
                "shards": [{"name": s.name, "sha256": s.sha256} for s in meta.shards],
                "teacher": self.teachers[0].to_dict() if len(self.teachers) == 1 else None,
                "ensemble": [rec.to_dict() for rec in self.teachers] if len(self.teachers) > 1 else None,
                **({"class_map": {**self.class_map.to_dict(), "labels": self.label_space,
                                  "train_samples": self.train_samples}} if self.class_map else {})}


def _ok_labels(samples: dict[str, np.ndarray]) -> np.ndarray:
    """The labels of a shard's usable samples, from its checked samples unit."""
    return samples[schema.LABEL.path()][samples[schema.STATUS.path()] == SampleStatus.OK].astype(np.int64)


def _class_map(spec: str | list | ClassMap, num_teacher_classes: int, names: list[str] | None) -> ClassMap:
    """A class map given as a JSON file, its parsed JSON value, or a ClassMap, checked against the cache's teacher."""
    if isinstance(spec, ClassMap):
        if spec.num_teacher_classes != num_teacher_classes:
            raise ValueError(f"The class map is for a teacher with {spec.num_teacher_classes} classes; the cache's "
                             f"has {num_teacher_classes}.")
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_class_map(os.fspath(spec), num_teacher_classes, names)
    return parse_class_map(spec, num_teacher_classes, names)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``default_collate`` of TrainSamples' items, cheaper: each array field (targets, source) is one ``np.stack``
    (rows are views into a block's arrays) instead of a tensor per sample; images go through ``default_collate``,
    which stacks them straight into shared memory in a worker. Same dtypes as ``default_collate``."""
    out: dict[str, torch.Tensor] = {}
    for name, first in items[0].items():
        values = [item[name] for item in items]
        if isinstance(first, torch.Tensor):
            out[name] = default_collate(values)
        elif isinstance(first, np.ndarray):
            out[name] = torch.from_numpy(np.stack(values))
        else:  # labels (int64) and mixing weights (float64), as default_collate makes them
            out[name] = torch.tensor(values, dtype=torch.float64 if isinstance(first, float) else torch.int64)
    return out


def rebatch(batches: Any, batch_size: int, pin: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Exact ``batch_size`` batches from a loader whose workers end on partial batches (drop_last per worker
    would drop up to one batch per worker and shard pass); tensors are concatenated, not re-collated. ``pin``:
    page-lock each batch (``torch.cat`` of pinned tensors is not pinned, and non_blocking copies need it)."""
    pending: list[dict[str, torch.Tensor]] = []
    have = 0
    for batch in batches:
        pending.append(batch)
        have += len(batch["label"])
        while have >= batch_size:
            joined = {k: torch.cat([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:batch_size].pin_memory() if pin else v[:batch_size] for k, v in joined.items()}
            rest = {k: v[batch_size:] for k, v in joined.items()}
            have -= batch_size
            pending = [rest] if have else []
