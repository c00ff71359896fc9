"""Class maps: a teacher's label space (ImageNet-1k, a hub model's classes) seen through a student's smaller one.

A map is one entry per student class, in student-class order: the teacher class(es) that class covers, by index
or by name. The student's distribution over its own classes is the teacher's probability mass of each group,
renormalised over the mapped classes; mass on unmapped teacher classes is dropped (and reported as out-of-map
mass). Mapping happens when targets are built, not when a cache is written, so one teacher cache serves any
number of subset students (docs/design.md, "Class maps"; the definition in docs/cache-format.md).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from .class_map_spec import ClassMap, ClassMapError, load_class_map, map_by_names, parse_class_map
from .losses import TeacherTargets, _compute_dtype

__all__ = ["ClassMap", "ClassMapError", "LABEL_SPACES", "load_class_map", "parse_class_map", "map_by_names",
           "map_targets", "out_of_map_mass", "label_space", "student_labels", "teacher_names", "dataset_classes",
           "timm_class_names", "timm_index_map", "inspect_class_map"]

#: What a dataset's labels under a class map can be: the teacher's classes (mapped to the student class whose group
#: holds them; labels in no group are skipped) or already the student's (map entry j is label j).
LABEL_SPACES = ("teacher", "student")


def label_space(cmap: ClassMap, labels: Any, given: str | None = None,
                dataset_classes: int | None = None) -> str:
    """Which label space the data's ``labels`` (the cached labels of the samples used, all in [0, C_t)) are in.

    ``given`` (``--labels teacher|student``) decides; without it: a label >= the map's student classes can only be a
    teacher class; else the dataset's own class count (its classes.json) says which when it is one side's only;
    else, when every label present means the same student class either way, it does not matter. Anything else is
    ambiguous and refused: guessing would train a student on the wrong classes without a sign."""
    import numpy as np
    labels = np.asarray(labels, dtype=np.int64)
    top = int(labels.max()) if labels.size else -1
    c_s, c_t = cmap.num_classes, cmap.num_teacher_classes
    if given is not None and given not in LABEL_SPACES:
        raise ClassMapError(f"--labels {given!r}: use teacher (the shards are labelled in the teacher's classes) or "
                            "student (labelled in the map's classes, entry j is label j).")
    if given == "student" or given is None and dataset_classes == c_s != c_t:
        if top >= c_s:
            raise ClassMapError(f"label {top} is not a student class of the class map ({c_s} entries, labels "
                                f"0..{c_s - 1}): these shards are labelled in the teacher's classes; use --labels "
                                "teacher.")
        return "student"
    if given == "teacher" or top >= c_s or dataset_classes == c_t != c_s:
        return "teacher"
    present = np.unique(labels)
    if np.array_equal(cmap._student_of.numpy()[present], present):
        return "student"  # every label names the same student class read either way
    raise ClassMapError(f"the data's labels (0..{top}) fit both the teacher's {c_t} classes and the map's {c_s} "
                        "student classes; say which with --labels teacher (labels are teacher classes: each is "
                        "mapped to its group's student class, the rest skipped) or --labels student.")


def teacher_names(names: Sequence[str] | None, num_teacher_classes: int) -> Sequence[str] | None:
    """A cache's ``class_names`` when they are the teacher's (one per teacher class): a map by name resolves in them.
    Another count is the dataset's own classes.json, recorded by default (see :func:`dataset_classes`)."""
    return names if names is not None and len(names) == num_teacher_classes else None


def dataset_classes(names: Sequence[str] | None, num_teacher_classes: int) -> int | None:
    """The dataset's class count when a cache's ``class_names`` cannot be the teacher's (another count): then they
    are the classes.json of the shards it cached, and the shards' labels are in that space."""
    return len(names) if names is not None and len(names) != num_teacher_classes else None


def student_labels(cmap: ClassMap, space: str) -> "Any":
    """int64 numpy [C_t]: each stored label's student class, -1 for a label in no group (that sample is skipped);
    None when the labels already are the student's."""
    if space == "student":
        return None
    table = cmap._student_of.numpy().copy()
    table[table == cmap.num_classes] = -1
    return table


def timm_class_names(subset: str) -> list[str]:
    """The class names (WordNet synsets) timm ships for an ImageNet label set: imagenet-1k, imagenet-12k,
    imagenet-22k, imagenet-21k-goog, ... (no network). With
    :func:`map_by_names` this gives e.g. the 22k -> 1k map: ``map_by_names(timm_class_names('imagenet-1k'),
    timm_class_names('imagenet-22k'))``."""
    from timm.data import ImageNetInfo
    try:
        return list(ImageNetInfo(subset).label_names())
    except (AssertionError, KeyError, FileNotFoundError, ValueError) as e:
        raise ClassMapError(f"timm ships no class names for {subset!r} ({e}); try imagenet-1k, imagenet-12k, "
                            "imagenet-22k or imagenet-21k-goog.") from None


def timm_index_map(name: str) -> list[int]:
    """One of timm's own label-map files (``timm/data/_info/{name}_indices.txt``, shipped with timm, no network):
    the teacher index of each student class, e.g. ``imagenet22k_to_12k`` (a 22k teacher, a 12k student),
    ``imagenet21k_goog_to_12k``, ``imagenet_a`` / ``imagenet_r`` / ``mini_imagenet`` (a 1k teacher, a
    200/200/100-class student)."""
    from importlib import resources
    if not name.replace("_", "").isalnum():
        raise ClassMapError(f"{name!r} is not a timm label-map name (e.g. imagenet22k_to_12k, imagenet_a).")
    path = resources.files("timm.data") / "_info" / f"{name}_indices.txt"
    if not path.is_file():
        raise ClassMapError(f"timm ships no label map {name!r} (no _info/{name}_indices.txt); e.g. "
                            "imagenet22k_to_12k, imagenet21k_goog_to_12k, imagenet_a, imagenet_r, mini_imagenet.")
    return [int(line) for line in path.read_text().split()]


def _group_log_mass(log_p: Tensor, group: Tensor, groups: int) -> Tensor:
    """[B, groups]: ``log sum exp(log_p)`` over the entries of each group (``-inf`` for an empty one), computed
    with a per-group shift so tiny probabilities do not underflow to 0."""
    batch = log_p.shape[0]
    hi = torch.full((batch, groups), -math.inf, dtype=log_p.dtype, device=log_p.device)
    hi = hi.scatter_reduce(1, group, log_p, "amax", include_self=True)
    shift = hi.gather(1, group)
    total = torch.zeros_like(hi).scatter_add_(1, group, torch.exp(log_p - shift))
    return hi + total.log()


def map_targets(targets: TeacherTargets, cmap: ClassMap, labels: Tensor) -> TeacherTargets:
    """The teacher's targets seen through ``cmap``: a student-space :class:`TeacherTargets` (``num_classes`` =
    the student's) at the same temperature T, which every loss reads as it reads a cached target.

    ``q_j = m_j / (M + t)``: ``m_j`` the teacher's probability (at T) of student class j's group among its top-k,
    ``M`` the sum of the ``m_j`` (the in-map mass), ``t`` the tail mass outside the top-k. From full targets
    (t = 0) this is the exact renormalised group mass. From top-k targets each ``q_j`` is a lower bound of the
    exact one (``m_j`` can only grow and ``M + t`` bounds the true in-map mass from above), and the unranked
    remainder ``t / (M + t)`` is the mapped target's own tail. Keeps the ``min(k, C_s)`` student classes with the
    largest ``q`` (ties: lower index first). ``labels`` (student classes; the dominant label of a mixed view)
    give the label's ``q``, which PLD ranks first. Expressed at T directly (``topk_logp = T log q``, ``logz = 0``),
    as :meth:`TeacherTargets.ensemble` does."""
    if targets.num_classes != cmap.num_teacher_classes:
        raise ClassMapError(f"the class map is for a teacher with {cmap.num_teacher_classes} classes; this "
                            f"teacher has {targets.num_classes}.")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cmap.num_classes):
        bad = int(labels.max()) if int(labels.max()) >= cmap.num_classes else int(labels.min())
        raise ClassMapError(f"label {bad} is not a student class of the class map ({cmap.num_classes} entries, "
                            f"labels 0..{cmap.num_classes - 1}); the map needs one entry per student class.")
    dtype = _compute_dtype(targets.topk_logp)
    temp, c_s = targets.temperature, cmap.num_classes
    log_p = targets.topk_log_probs().to(dtype)
    group = cmap.student_of(log_p.device)[targets.topk_idx.long()]
    log_m = _group_log_mass(log_p, group, c_s + 1)[:, :c_s]  # column c_s: the unmapped classes, dropped
    full = targets.k == targets.num_classes
    tail = torch.zeros_like(log_p[:, 0]) if full else targets.tail_mass().to(dtype)
    log_den = torch.logaddexp(torch.logsumexp(log_m, dim=1), tail.log())
    log_den = torch.where(torch.isfinite(log_den), log_den, 0.0)  # nothing in the map among the top-k: all q = 0
    log_q = log_m - log_den[:, None]
    k = min(targets.k, c_s)
    top = torch.sort(log_q, dim=1, descending=True, stable=True)
    floor = math.log(torch.finfo(dtype).tiny)  # a class with no known mass: a lower bound of 0, kept finite
    label_log_q = log_q.gather(1, labels[:, None]).squeeze(1)
    return TeacherTargets(topk_idx=top.indices[:, :k], topk_logp=temp * top.values[:, :k].clamp_min(floor),
                          label_logp=temp * label_log_q.clamp_min(floor), logz=torch.zeros_like(label_log_q),
                          temperature=temp, num_classes=c_s)


def out_of_map_mass(targets: TeacherTargets, cmap: ClassMap) -> tuple[Tensor, Tensor]:
    """Per view: the teacher's probability (at T) on unmapped classes among its top-k (a lower bound), and the
    tail mass outside the top-k (the most the exact out-of-map mass can exceed it by; 0 for full targets)."""
    log_p = targets.topk_log_probs().to(_compute_dtype(targets.topk_logp))
    unmapped = cmap.student_of(log_p.device)[targets.topk_idx.long()] == cmap.num_classes
    known = torch.where(unmapped, log_p.exp(), 0.0).sum(1)
    full = targets.k == targets.num_classes
    return known, torch.zeros_like(known) if full else targets.tail_mass()


def inspect_class_map(url: str, class_map: str | list, expect_digest: str | None = None,
                      max_shards: int = 8, labels: str | None = None) -> dict[str, Any]:
    """What a map does to a cache's teachers (``pld inspect --class-map``), over up to ``max_shards`` complete
    shards at temperature 1, over the views whose label is in the map (the student's; the others are counted
    apart): the out-of-map mass (the teacher's top-k probability on unmapped classes, a lower bound, and that plus
    the tail, an upper bound; both clamped to [0, 1], the float round-off of a sum of probabilities) and the
    teacher's top-1 accuracy in the student's classes (the student class with the largest
    mapped mass against each view's label, read in ``labels``' space as `pld distill` reads it) over the views
    whose label is in the map only; the others are counted apart."""
    import numpy as np
    from .cache import Cache
    from .cache.format import SampleStatus
    cache = Cache(url, expect_digest=expect_digest)
    meta = cache.meta
    names = teacher_names(meta.class_names, meta.num_classes)
    cmap = (load_class_map(class_map, meta.num_classes, names) if isinstance(class_map, str)
            else parse_class_map(class_map, meta.num_classes, names))
    shards = {tid: [s for s in range(len(meta.shards)) if cache.complete(s, tid)][:max_shards] for tid in meta.teachers}
    read = sorted({s for chosen in shards.values() for s in chosen})
    blocks = {s: cache.read(s) for s in read}
    ok_labels = [b.labels[b.status == SampleStatus.OK] for b in blocks.values()]
    space = label_space(cmap, np.concatenate(ok_labels) if ok_labels else np.zeros(0, np.int64), labels,
                        dataset_classes(meta.class_names, meta.num_classes))
    table = student_labels(cmap, space)
    teachers = {}
    for tid in meta.teachers:
        known, upper, hits, count, outside = [], [], 0, 0, 0
        for shard in shards[tid]:
            block = cache.read(shard, tid, temperature=1.0)
            ok = block.status == SampleStatus.OK
            n, v, k = block.topk_idx[ok].shape
            stored = np.repeat(block.labels[ok].astype(np.int64), v)
            mapped_labels = stored if table is None else table[stored]
            labels_t = torch.from_numpy(np.where(mapped_labels < 0, cmap.num_classes, mapped_labels))
            targets = TeacherTargets(torch.from_numpy(block.topk_idx[ok].reshape(n * v, k).astype(np.int64)),
                                     torch.from_numpy(block.topk_logp[ok].reshape(n * v, k)),
                                     torch.zeros(n * v), torch.from_numpy(block.logz[ok].reshape(n * v)),
                                     1.0, meta.num_classes)
            inside = labels_t < cmap.num_classes  # the student's views: the others never train it
            outside += int((~inside).sum())
            lo, tail = out_of_map_mass(targets, cmap)
            lo = lo.double().clamp(0.0, 1.0)  # a sum of probabilities: round-off may pass 1
            known.append(lo[inside].numpy())
            upper.append(torch.maximum((lo + tail.double()).clamp(0.0, 1.0), lo)[inside].numpy())
            if bool(inside.any()):
                mapped = map_targets(targets, cmap, torch.where(inside, labels_t, 0))
                hits += int((mapped.topk_idx[:, 0] == labels_t)[inside].sum())
                count += int(inside.sum())
        lo_all = np.concatenate(known) if known else np.zeros(0)
        hi_all = np.concatenate(upper) if upper else np.zeros(0)
        quant = lambda m: ({"mean": float(m.mean()), "p50": float(np.quantile(m, 0.5)),  # noqa: E731
                            "p90": float(np.quantile(m, 0.9)), "max": float(m.max())} if m.size else {})
        teachers[tid] = {"out_of_map_mass": quant(lo_all), "out_of_map_mass_upper": quant(hi_all),
                         "student_accuracy_on_cached_views": hits / count if count else None,
                         "views_in_the_map": count, "views_with_labels_outside_the_map": outside}
    return {"class_map_sha256": cmap.to_dict()["sha256"], "student_classes": cmap.num_classes,
            "mapped_teacher_classes": sum(len(g) for g in cmap.groups), "labels": space,
            "teacher_classes": meta.num_classes, "teachers": teachers}
