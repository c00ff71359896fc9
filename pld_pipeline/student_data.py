"""What a student trains and evaluates on: tar samples joined with cached teacher targets by key.

Per epoch: shards shuffled by (seed, epoch), dealt to ranks, then to DataLoader workers. A worker reads one
whole cache block per shard (one contiguous read per array and view), replays each sample's chosen view from
its stored params and emits image + targets together, so targets travel with the sample through the shuffle
buffer. Memory is one shard block per worker plus the shuffle buffer, whatever the dataset size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .cache.format import CacheError, SampleStatus, sample_digest
from .cache.reader import CacheReader
from .data import DataError, iter_shard, parse_label, pick_field
from .losses import TeacherTargets
from .views import ViewRecipe, decode_image, eval_params, replay_view, stable_int, view_params

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
                 cache_url: str | None = None, teacher: str | None = None, temperature: float = 1.0,
                 num_views: int = 1, view_policy: str = "rotate", shuffle_buffer: int = 1000,
                 image_field: str = "jpg;jpeg;png;webp", label_field: str = "cls", num_classes: int | None = None,
                 cache_dir: str | None = None) -> None:
        self.shards, self.recipe, self.seed, self.rank, self.world = list(shards), recipe, seed, rank, world
        self.cache_url, self.teacher, self.temperature = cache_url, teacher, temperature
        self.num_views, self.view_policy, self.shuffle_buffer = num_views, view_policy, shuffle_buffer
        self.image_field, self.label_field, self.num_classes = image_field, label_field, num_classes
        self.cache_dir = cache_dir
        self.epoch = 0
        self._reader: CacheReader | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cache(self) -> CacheReader:
        if self._reader is None:  # opened lazily inside each worker process
            self._reader = CacheReader(self.cache_url, self.cache_dir)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def _samples(self, part: ShardRange) -> Iterator[dict[str, Any]]:
        shard, used = part.shard, -1  # used: index of the current sample among the shard's usable ones
        block = None
        if self.cache_url is not None:
            block = self._cache().read_block(shard.cache_shard, self.teacher, self.temperature, self.num_views)
            row_of = block.row_of()
        for i, sample in enumerate(iter_shard(shard.url)):
            key = sample["__key__"]
            item: dict[str, Any] = {}
            if block is not None:
                row = i if i < len(block.keys) and block.keys[i] == key else row_of.get(key)
                if row is None:
                    raise CacheError(f"Sample {key!r} of {shard.url} is not in the cache; the shard differs from "
                                     "the one cached (check `pld inspect`).")
                if block.digests[row].tobytes() != sample_digest(sample):
                    raise CacheError(f"Sample {key!r} of {shard.url} is not the sample cached under that key (content "
                                     "digest differs): the shard was edited or re-encoded after caching. Train on "
                                     "the cached shards, or re-cache them (`pld cache-teacher --overwrite`).")
                if block.status[row] != SampleStatus.OK:
                    continue  # skipped at cache time (undecodable): skipped here too
                used += 1
                if used < part.start:
                    continue
                if used >= part.stop:
                    return
                v = choose_view(self.view_policy, self.seed, key, self.epoch, self.num_views)
                params = block.params[row, v]
                label = int(block.labels[row])
                if block.topk_idx is not None:  # --loss ce reads no teacher arrays
                    item.update(topk_idx=block.topk_idx[row, v].astype(np.int64), topk_logp=block.topk_logp[row, v],
                                label_logp=block.label_logp[row, v], logz=block.logz[row, v])
                image = decode_image(pick_field(sample, self.image_field))
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
            item.update(__key__=key, image=replay_view(image, params, self.recipe), label=label)
            yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = ranges_for(self.shards, self.epoch, self.seed, self.rank, self.world)[wid::nworkers]
        stream = (item for part in mine for item in self._samples(part))
        rng = random.Random(stable_int(self.seed, "shuffle", self.epoch, self.rank, wid))
        for item in wds.filters.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(stream):
            item.pop("__key__")
            yield item


class EvalSamples(IterableDataset):
    """The clean eval view of every sample in the given shards (split across ranks and workers)."""

    def __init__(self, urls: Sequence[str], *, recipe: ViewRecipe, rank: int, world: int, num_classes: int,
                 image_field: str = "jpg;jpeg;png;webp", label_field: str = "cls") -> None:
        self.urls, self.recipe, self.rank, self.world = list(urls), recipe, rank, world
        self.num_classes, self.image_field, self.label_field = num_classes, image_field, label_field

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nworkers = (0, 1) if info is None else (info.id, info.num_workers)
        for url in self.urls[self.rank::self.world][wid::nworkers]:
            for sample in iter_shard(url):
                data = pick_field(sample, self.image_field)
                if data is None:
                    raise DataError(f"No '{self.image_field}' image in sample {sample['__key__']!r} of {url}.")
                image = decode_image(data)
                params = eval_params(self.recipe, image.shape[1], image.shape[2])
                yield {"image": replay_view(image, params, self.recipe),
                       "label": parse_label(sample, self.label_field, self.num_classes)}


def batch_targets(batch: dict[str, torch.Tensor], temperature: float, num_classes: int, device: torch.device,
                  top_k: int | None = None) -> TeacherTargets | None:
    """The batch's cached arrays as loss targets on ``device`` (None when training without a cache).
    ``top_k`` keeps the first k classes: exactly what a cache made with that k would hold."""
    if "topk_idx" not in batch:
        return None
    k = slice(0, top_k)
    targets = TeacherTargets(topk_idx=batch["topk_idx"][:, k], topk_logp=batch["topk_logp"][:, k].float(),
                             label_logp=batch["label_logp"].float(), logz=batch["logz"].float(),
                             temperature=temperature, num_classes=num_classes)
    return targets.to(device, non_blocking=device.type == "cuda")
