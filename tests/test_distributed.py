"""Device selection, GPU placement of sweep jobs and the DDP data split, on CPU with a mocked device count."""
import json
import os

import pytest
import torch

from pld_pipeline import distributed as D
from pld_pipeline.student_data import TrainShard, ranges_for, samples_per_rank
from pld_pipeline.launch import job_gpus


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has 4 GPUs; record which one each process would bind."""
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    return bound


@pytest.mark.parametrize("device, local_rank, world, want", [
    ("auto", 0, 1, "cuda:0"), ("cuda", 0, 1, "cuda:0"),  # a bare `cuda` has an index (set_device needs one)
    ("cuda", 3, 4, "cuda:3"), ("auto", 2, 4, "cuda:2"),
    ("cuda", 5, 8, "cuda:1"),  # more local ranks than visible GPUs (one visible GPU per process): modulo
    ("cuda:2", 0, 1, "cuda:2"), ("cpu", 3, 4, "cpu"),
])
def test_device_selection(gpus, monkeypatch, device, local_rank, world, want):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dev = D.resolve_device(device, local_rank)
    assert str(dev) == want and (gpus == [dev] if dev.type == "cuda" else gpus == [])


def test_an_explicit_gpu_index_under_torchrun_is_refused(gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:1 names one GPU, but torchrun started 2 processes"):
        D.resolve_device("cuda:1", 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="only 4 GPU"):
        D.resolve_device("cuda:7", 0)
    with pytest.raises(ValueError, match="is not a device"):
        D.resolve_device("gpu0", 0)


def test_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto", 0).type == "cpu"
    with pytest.raises(ValueError, match="no GPU is visible; use --device cpu"):
        D.resolve_device("cuda", 0)


def test_gpu_runs_autotune_cudnn_unless_deterministic(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        D.configure_backends(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        D.configure_backends(torch.device("cuda", 0), deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        D.configure_backends(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    finally:
        D.configure_backends(torch.device("cpu"))


@pytest.mark.parametrize("requested, device, cores, local_world, want", [
    (3, "cuda", 64, 1, 3), (0, "cuda", 64, 1, 0),  # as asked
    (None, "cpu", 64, 1, 2),  # on a CPU the cores train the model
    (None, "cuda", 64, 1, 8), (None, "cuda", 16, 2, 7), (None, "cuda", 16, 8, 1), (None, "cuda", 2, 8, 1),
])
def test_loader_workers_default_to_the_gpu_processes_share_of_cores(monkeypatch, requested, device, cores,
                                                                    local_world, want):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert D.loader_workers(requested, torch.device(device)) == want
    with pytest.raises(ValueError, match="--workers must be >= 0"):
        D.loader_workers(-1, torch.device(device))


def test_sweep_jobs_land_on_the_parents_physical_gpus():
    assert job_gpus(4, 2, "auto", None) == ["0", "1", "0", "1"]
    assert job_gpus(3, 2, "cuda", "2,3") == ["2", "3", "2"]  # not 0 and 1: the parent's list is physical
    assert job_gpus(2, 2, "cuda:1", "2,3") == ["3", "3"]  # an index is relative to the parent's visible GPUs
    assert job_gpus(2, 2, "cuda", "GPU-aa, GPU-bb") == ["GPU-aa", "GPU-bb"]
    with pytest.raises(ValueError, match="only 2 GPU"):
        job_gpus(2, 2, "cuda:2", "2,3")


@pytest.mark.parametrize("sizes, world", [([1000] * 11, 8), ([1000] * 10 + [37], 8), ([5, 900, 3, 1200], 3),
                                          ([16, 16, 8], 1), ([16, 16, 8], 2)])
def test_ddp_ranks_get_equal_samples_and_every_shard_is_read_every_epoch(sizes, world):
    """11 shards on 8 ranks used to give each rank one shard's worth: 3 shards unused every epoch."""
    shards = [TrainShard(f"s{i}.tar", n, i) for i, n in enumerate(sizes)]
    quota = samples_per_rank(shards, world)
    assert quota == sum(sizes) // world
    for epoch in range(3):
        parts = [ranges_for(shards, epoch, 0, rank, world) for rank in range(world)]
        assert all(sum(p.stop - p.start for p in mine) == quota for mine in parts)
        covered = {}
        for mine in parts:
            for p in mine:
                assert 0 <= p.start < p.stop <= p.shard.nsamples
                covered.setdefault(p.shard.url, []).append((p.start, p.stop))
        used = sum(b - a for spans in covered.values() for a, b in spans)
        assert used == quota * world and sum(sizes) - used < world  # at most world - 1 samples left over
        for url, spans in covered.items():  # no sample twice
            spans.sort()
            assert all(a2 >= b1 for (_, b1), (a2, _) in zip(spans, spans[1:]))
    assert ranges_for(shards, 0, 0, 0, world) != ranges_for(shards, 1, 0, 0, world) or len(shards) == 1


def test_resume_on_another_world_size_is_refused(tiny_data, cache, tmp_path):
    from pld_pipeline.distill import DistillConfig, distill
    cfg = dict(data=tiny_data["train"].pattern, out=str(tmp_path / "run"), student="cifar_resnet8", loss="pld",
               cache=cache, epochs=1, batch_size=8, workers=0, device="cpu")
    distill(DistillConfig(**cfg))
    path = tmp_path / "run" / "config.json"
    doc = json.loads(path.read_text())
    doc["world_size"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="--resume on 1 process\\(es\\), but .* was trained on 2"):
        distill(DistillConfig(**cfg, resume=True))
