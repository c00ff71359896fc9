"""One cache, many students (issue 29): shards labelled in the teacher's classes, trained through a class map as a
subset or superclass student. Labels mapped, out-of-map samples skipped in training and validation, exact and
balanced epochs from the cached labels, resume, inspect's statistics and duplicate class names.

The session ``cache`` is teacher-labelled: tiny_data's 10 classes (labels 0..9), cached by the 10-class teacher."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from pld_pipeline.cache import Cache
from pld_pipeline.cache.format import CacheError, SampleStatus
from pld_pipeline.class_map import ClassMapError, label_space, parse_class_map
from pld_pipeline.student_data import StudentData
from test_hostile_cache import copy, edit_meta, one_line, resign  # noqa: F401 (copy: a fixture)

VEHICLES = [0, 1, 8, 9]
SUPER = [VEHICLES, [2, 3, 4, 5, 6, 7]]  # vehicles vs animals


def cached_labels(cache_url):
    """Every usable sample's cached label, in shard order."""
    cache = Cache(cache_url)
    out = []
    for s in range(len(cache.meta.shards)):
        b = cache.read(s)
        out.append(b.labels[b.status == SampleStatus.OK].astype(np.int64))
    return np.concatenate(out)


def student_of(groups):
    table = {}
    for j, g in enumerate(groups):
        for c in (g if isinstance(g, list) else [g]):
            table[c] = j
    return table


def epoch_labels(data, epoch=0):
    return [int(y) for batch in data.epoch(epoch) for y in batch.labels]


@pytest.mark.parametrize("groups", [VEHICLES, SUPER], ids=["subset", "superclass"])
def test_teacher_labelled_shards_train_the_student_on_its_own_samples_with_mapped_labels(tiny_data, cache, groups):
    table = student_of(groups)
    want = Counter(table[c] for c in cached_labels(cache) if c in table)
    data = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=1, workers=0, class_map=groups)
    assert data.label_space == "teacher" and data.num_classes == len(groups)
    assert data.train_samples == sum(want.values()) < data.cached_samples or len(groups) == 2
    assert len(data) == data.train_samples  # batch 1, one rank: every in-map sample once
    batches = list(data.epoch(0))
    assert Counter(int(b.labels[0]) for b in batches) == want
    assert all(b.targets.num_classes == len(groups) for b in batches)


def test_each_samples_label_is_the_student_class_of_its_cached_teacher_label(tiny_data, cache):
    from pld_pipeline.student_data import ranges_for
    reader, table = Cache(cache), student_of(SUPER)
    data = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=1, workers=0, class_map=SUPER)
    items = [item for part in ranges_for(data.shards, 0, 0, 0, 1) for item in data.dataset._samples(part)]
    assert len(items) == data.train_samples
    for item in items:
        shard, row = reader.find(item["__key__"])
        assert item["label"] == table[int(reader.read(shard).labels[row])]


def test_every_rank_runs_the_same_steps_over_the_subset_and_no_sample_twice(tiny_data, cache):
    table = student_of(VEHICLES)
    total = sum(1 for c in cached_labels(cache) if c in table)
    ranks = [StudentData(tiny_data["train"].pattern, cache=cache, batch_size=2, workers=0, class_map=VEHICLES,
                         rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (total // 2) // 2
    for epoch in range(2):
        got = [epoch_labels(d, epoch) for d in ranks]
        assert [len(g) for g in got] == [len(ranks[0]) * 2] * 2  # a short rank would stall DDP at its last step
        assert all(0 <= y < 4 for g in got for y in g)


def test_the_label_space_is_decided_or_the_ambiguity_refused_in_one_line():
    cmap = parse_class_map(VEHICLES, 10)
    assert label_space(cmap, np.arange(10)) == "teacher"  # a label >= 4 can only be a teacher class
    assert label_space(cmap, np.arange(5)) == "teacher"  # 4 itself, the map's size, is no student class either
    assert label_space(cmap, np.arange(4), dataset_classes=4) == "student"  # the shards' classes.json
    assert label_space(cmap, np.arange(4), dataset_classes=10) == "teacher"
    assert label_space(parse_class_map([0, 1, 2, 3], 10), np.arange(4)) == "student"  # the same either way
    with pytest.raises(ClassMapError, match="say which with --labels teacher .* or --labels student") as e:
        label_space(cmap, np.arange(4))
    one_line(e)
    assert label_space(cmap, np.arange(4), "teacher") == "teacher"
    with pytest.raises(ClassMapError, match="label 9 is not a student class .* use --labels teacher"):
        label_space(cmap, np.arange(10), "student")
    with pytest.raises(ClassMapError, match="--labels 'both'"):
        label_space(cmap, np.arange(10), "both")


def test_a_mapped_run_validates_in_the_students_classes_over_in_map_samples_and_records_the_subset(
        tiny_data, cache, tmp_path):
    from pld_pipeline.data import expand_shards, iter_shard
    table = student_of(VEHICLES)
    val = [int(s["cls"]) for u in expand_shards(tiny_data["val"].pattern) for s in iter_shard(u)]
    summary = _run_with_map(tiny_data, cache, tmp_path, VEHICLES)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["val_samples"] == sum(1 for y in val if y in table) < len(val)
    total = sum(1 for c in cached_labels(cache) if c in table)
    assert summary["train_samples"] == total and summary["labels"] == "teacher" and summary["num_classes"] == 4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_samples"] == total == sum(s["nsamples"] for s in config["train_shards"])
    assert config["cache"]["class_map"]["labels"] == "teacher"


def _run_with_map(tiny_data, cache, tmp_path, groups, out="run", progress=None, **kw):
    from pld_pipeline.distill import DistillConfig, distill
    path = tmp_path / f"{out}.map.json"
    path.write_text(json.dumps(groups))
    return distill(DistillConfig(data=tiny_data["train"].pattern, out=str(tmp_path / out), student="cifar_resnet8",
                                 loss="pld", cache=cache, class_map=str(path), batch_size=2, workers=0, device="cpu",
                                 val_data=tiny_data["val"].pattern, **{"epochs": 1, **kw}), progress)


class CrashAfterEpoch(Exception):
    pass


def test_a_resumed_subset_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_data, cache, tmp_path):
    from safetensors.torch import load_file

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 0:
            raise CrashAfterEpoch
    _run_with_map(tiny_data, cache, tmp_path, VEHICLES, out="straight", epochs=2)
    with pytest.raises(CrashAfterEpoch):
        _run_with_map(tiny_data, cache, tmp_path, VEHICLES, out="resumed", epochs=2, progress=crash)
    summary = _run_with_map(tiny_data, cache, tmp_path, VEHICLES, out="resumed", epochs=2, resume=True)
    assert summary["resumed_from_epoch"] == 1 and summary["train_samples"] < summary["cached_samples"]
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"different settings \(labels\)"):
        _run_with_map(tiny_data, cache, tmp_path, VEHICLES, out="resumed", epochs=2, resume=True, labels="teacher")


def test_inspect_counts_accuracy_over_in_map_views_only_and_its_bounds_are_ordered(cache):
    from pld_pipeline.class_map import inspect_class_map
    info = inspect_class_map(cache, VEHICLES)
    assert info["labels"] == "teacher"
    r14 = info["teachers"]["r14"]
    reader = Cache(cache)
    hits = n = outside = 0
    table, masses = student_of(VEHICLES), []
    for s in range(len(reader.meta.shards)):
        b = reader.read(s, "r14", temperature=1.0)
        ok = b.status == SampleStatus.OK
        p = np.zeros(b.topk_idx[ok].shape[:2] + (10,))
        np.put_along_axis(p, b.topk_idx[ok].astype(np.int64), np.exp(b.topk_logp[ok].astype(np.float64)), axis=2)
        for row, label in enumerate(b.labels[ok]):
            if int(label) not in table:
                outside += p.shape[1]
                continue
            masses.extend(np.delete(p[row], VEHICLES, axis=-1).sum(-1))  # the student's views only
            pred = p[row][:, VEHICLES].argmax(-1)  # ties: lower student class, as map_targets' stable sort
            hits += int((pred == table[int(label)]).sum())
            n += p.shape[1]
    assert (r14["views_in_the_map"], r14["views_with_labels_outside_the_map"]) == (n, outside)
    assert r14["student_accuracy_on_cached_views"] == pytest.approx(hits / n)
    lo, hi = r14["out_of_map_mass"], r14["out_of_map_mass_upper"]
    assert lo["mean"] == pytest.approx(np.clip(masses, 0, 1).mean(), abs=1e-6)
    assert all(0.0 <= lo[q] <= hi[q] <= 1.0 for q in ("mean", "p50", "p90", "max"))


def test_inspect_clamps_a_mass_past_one_by_round_off_and_keeps_the_upper_bound_above_it(cache, monkeypatch):
    import pld_pipeline.class_map as cm
    real = cm.out_of_map_mass

    def rounded_up(targets, cmap):  # a teacher sure of an unmapped class: its top-k sum rounds to 1.0000367
        known, tail = real(targets, cmap)
        return torch.full_like(known, 1.0000367), torch.zeros_like(tail)
    monkeypatch.setattr(cm, "out_of_map_mass", rounded_up)
    r14 = cm.inspect_class_map(cache, VEHICLES)["teachers"]["r14"]
    assert r14["out_of_map_mass"]["max"] == 1.0 and r14["out_of_map_mass_upper"]["mean"] == 1.0


def test_a_sweep_trains_several_subset_students_from_one_cache(tiny_data, cache, tmp_path):
    from pld_pipeline.sweep import run_sweep
    maps = []
    for name, groups in (("vehicles", VEHICLES), ("super", SUPER)):
        (tmp_path / f"{name}.json").write_text(json.dumps(groups))
        maps.append(str(tmp_path / f"{name}.json"))
    rows = run_sweep({"data": tiny_data["train"].pattern, "cache": cache, "student": "cifar_resnet8", "epochs": 1,
                      "batch_size": 2, "workers": 0, "device": "cpu", "val_data": tiny_data["val"].pattern},
                     {"class_map": maps}, [], str(tmp_path / "sweep"))
    assert len(rows) == 2
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert sorted(s["num_classes"] for s in summaries) == [2, 4]
    assert all(s["labels"] == "teacher" for s in summaries)


# -- class names: one distinct name per class ----------------------------------------------------------------

def test_a_cache_whose_class_names_repeat_or_are_empty_is_refused_at_open_in_one_line(copy):
    names = [f"class{i}" for i in range(10)]
    edit_meta(copy, lambda m: m.update(class_names=names[:5] + ["class3"] + names[6:]))
    resign(copy)
    with pytest.raises(CacheError, match="class_names repeat 'class3' \\(classes 3 and 5\\).*distinct") as e:
        Cache(copy)
    one_line(e)
    edit_meta(copy, lambda m: m.update(class_names=names[:9] + [" "]))
    resign(copy)
    with pytest.raises(CacheError, match="class_names name class 9"):
        Cache(copy)


def test_a_map_by_a_name_that_repeats_among_the_teachers_is_refused():
    with pytest.raises(ClassMapError, match="entry 1 names class 'cat', which the teacher's class names hold 2 "
                                            "times; use its class index"):
        parse_class_map(["dog", "cat"], 4, ["cat", "dog", "bird", "cat"])


@pytest.mark.slow
def test_a_two_process_torchrun_run_over_a_subset_steps_together_to_the_end(tiny_data, cache, tmp_path):
    """`torchrun --nproc_per_node 2 -m pld_pipeline distill`: under DDP a rank with fewer batches would wait forever
    on the others' all-reduce (or stop short); both ranks' validation shards are counted once; only rank 0 prints
    the --json summary."""
    import subprocess
    import sys
    from conftest import free_port
    (tmp_path / "map.json").write_text(json.dumps(VEHICLES))
    out = tmp_path / "ddp"
    run = subprocess.run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "pld_pipeline", "distill", "--data", tiny_data["train"].pattern, "--cache", cache, "--class-map",
        str(tmp_path / "map.json"), "--val-data", tiny_data["val"].pattern, "--student", "cifar_resnet8", "--out",
        str(out), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # one JSON document: rank 1 prints nothing
    assert summary["epochs"] == 1 and summary["best_val_top1"] is not None
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["steps_per_epoch"] == (config["train_samples"] // 2) // 4 > 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    table = student_of(VEHICLES)
    from pld_pipeline.data import expand_shards, iter_shard
    in_map = sum(1 for u in expand_shards(tiny_data["val"].pattern) for s in iter_shard(u) if int(s["cls"]) in table)
    assert len(rows) == 1 and rows[0]["val_samples"] == in_map
