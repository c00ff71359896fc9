"""What only a GPU can show: run by benchmarks/gpu_check.sh on a GPU machine (`pytest -m cuda`); skipped here."""
import os

import numpy as np
import pytest
import torch

from pld_pipeline.losses import TeacherTargets, dist_loss, kd_loss, pld_loss, pld_loss_from_ranking

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]


@pytest.mark.parametrize("classes", [10, 1000])
def test_losses_under_bf16_autocast_match_float64_on_the_cpu(classes):
    """Student logits come out of a bf16 forward; the losses accumulate in float32 and must agree with a float64
    CPU reference on the same (bf16-rounded) logits, gradients included."""
    g = torch.Generator().manual_seed(classes)
    s = (torch.randn(256, classes, generator=g) * 3).bfloat16()
    t = torch.randn(256, classes, generator=g) * 3
    y = torch.randint(0, classes, (256,), generator=g)
    for k in (None, min(32, classes)):
        tg = TeacherTargets.from_logits(t.double(), y, k=k, temperature=2.0)
        for fn in (lambda x, tg: pld_loss_from_ranking(x, y.to(x.device), tg),
                   lambda x, tg: kd_loss(x, y.to(x.device), tg), lambda x, tg: dist_loss(x, y.to(x.device), tg)):
            ref_x = s.double().requires_grad_(True)
            ref = fn(ref_x, tg)
            ref.backward()
            gpu_x = s.cuda().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                got = fn(gpu_x, tg.to("cuda"))
            got.backward()
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gpu_x.grad.double().cpu(), ref_x.grad, rtol=1e-2, atol=1e-4)
    ref = pld_loss(s.double(), t.double(), y)
    torch.testing.assert_close(pld_loss(s.cuda().float(), t.cuda(), y.cuda()).double().cpu(), ref, rtol=1e-4, atol=1e-4)


def test_rebatched_batches_are_pinned_and_copy_without_blocking():
    from pld_pipeline.student_data import rebatch
    parts = [{"image": torch.zeros(n, 3, 4, 4, dtype=torch.uint8).pin_memory(), "label": torch.arange(n)}
             for n in (3, 5, 4)]
    out = list(rebatch(iter(parts), 4, pin=True))
    assert len(out) == 3 and all(b[k].is_pinned() for b in out for k in b)
    x = out[0]["image"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert x.is_cuda


def _cache(tiny_data, teacher_ckpt, out, device):
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    return cache_teacher(CacheTeacherConfig(data=tiny_data["train"].pattern, out=str(out), views=2, size=16, k=4,
                                            teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                                            num_classes=10, workers=0, device=device))


def test_a_gpu_built_cache_equals_the_cpu_one_in_fp32(tiny_data, teacher_ckpt, tmp_path):
    from pld_pipeline.cache import Cache, verify_cache
    _cache(tiny_data, teacher_ckpt, tmp_path / "gpu.zarr", "cuda")
    _cache(tiny_data, teacher_ckpt, tmp_path / "cpu.zarr", "cpu")
    assert verify_cache(str(tmp_path / "gpu.zarr")).ok
    a, b = Cache(str(tmp_path / "gpu.zarr")), Cache(str(tmp_path / "cpu.zarr"))
    for shard in range(3):
        x, y = a.read(shard, "r8"), b.read(shard, "r8")
        assert (x.topk_idx == y.topk_idx).mean() > 0.99  # only exact near-ties may differ
        np.testing.assert_allclose(x.topk_logp, y.topk_logp, atol=1e-4)


@pytest.mark.parametrize("device", ["auto", "cuda", "cuda:0"])
def test_distill_runs_on_the_gpu_with_every_device_spelling(tiny_data, cache, tmp_path, device):
    from pld_pipeline.distill import DistillConfig, distill
    cfg = dict(data=tiny_data["train"].pattern, val_data=tiny_data["val"].pattern, out=str(tmp_path / "run"),
               student="cifar_resnet8", loss="pld", cache=cache, epochs=2, batch_size=8, workers=2)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        summary = distill(DistillConfig(**cfg, device=device))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["best_val_top1"] is not None
    resumed = distill(DistillConfig(**cfg, device="cpu", resume=True))  # the GPU's checkpoint loads on a CPU
    assert resumed["best_val_top1"] == summary["best_val_top1"]


def test_a_deterministic_gpu_run_resumes_bit_for_bit(tiny_data, cache, tmp_path):
    """cuDNN conv/pool backward and scatter_add_ are nondeterministic on CUDA: with --deterministic a crashed and
    resumed run equals the uninterrupted one exactly, as on a CPU."""
    from safetensors.torch import load_file

    from pld_pipeline.distill import DistillConfig, distill

    class Crash(Exception):
        pass

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 0:
            raise Crash

    cfg = dict(data=tiny_data["train"].pattern, student="cifar_resnet8", loss="pld", cache=cache, epochs=2,
               batch_size=8, workers=2, device="cuda", deterministic=True)
    try:
        distill(DistillConfig(**cfg, out=str(tmp_path / "whole")))
        with pytest.raises(Crash):
            distill(DistillConfig(**cfg, out=str(tmp_path / "crashed")), crash)
        distill(DistillConfig(**cfg, out=str(tmp_path / "crashed"), resume=True))
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = load_file(str(tmp_path / "whole" / "last.safetensors")), load_file(str(tmp_path / "crashed" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_one_rank_nccl_group(monkeypatch):
    import torch.distributed as dist

    from pld_pipeline import distributed as D
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        info = D.DistInfo(0, 2, 0)  # `enabled` paths, on a real one-rank group
        assert D.all_reduce_sum([1.5, 2.0], info, torch.device("cuda", 0)) == [1.5, 2.0]
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_loss_guard_stops_within_one_step_on_a_gpu():
    """On a GPU step n's finiteness is read at step n+1 (a copy that does not wait): the NaN of step 1 is raised
    at step 2, or by flush() at the epoch's end."""
    from pld_pipeline.distill import LossGuard, NonFiniteLoss
    device = torch.device("cuda")
    logits = torch.zeros(4, 10, device=device)
    source = torch.tensor([[0, 1], [0, 2], [1, 0], [1, 3]])
    guard = LossGuard(device)
    guard.step(0, 0, torch.tensor(1.0, device=device), logits, None, source)
    guard.step(0, 1, torch.tensor(float("nan"), device=device), logits, None, source)
    with pytest.raises(NonFiniteLoss, match="epoch 0, step 1"):
        guard.step(0, 2, torch.tensor(1.0, device=device), logits, None, source)
    guard = LossGuard(device)
    guard.step(3, 7, torch.tensor(float("inf"), device=device), logits, None, source)
    with pytest.raises(NonFiniteLoss, match="epoch 3, step 7: the loss overflowed; batch from cache s000000 view 1"):
        guard.flush()
