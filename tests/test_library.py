"""docs/library.md's training loop, executed as written (on tiny data), and the API it promises."""
import re
from pathlib import Path

import torch

from pld_pipeline import StudentData
from pld_pipeline.distill import DistillConfig, distill

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def test_the_documented_training_loop_runs_and_learns(tiny_data, cache, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    line = 'CACHE, DATA, EPOCHS = "cache.zarr", "shards/train-{000000..000009}.tar", 10'
    assert line in code
    code = code.replace(line, f"CACHE, DATA, EPOCHS = {cache!r}, {tiny_data['train'].pattern!r}, 4")
    code = code.replace("batch_size=128, workers=2", "batch_size=8, workers=0")
    exec(compile(code, str(DOC), "exec"), {})
    losses = [float(m) for m in re.findall(r"mean loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_the_library_stream_is_the_one_pld_distill_trains_on(tiny_data, cache, tmp_path):
    """The stream is fixed by (seed, epoch), covers every sample once per epoch, changes order between epochs, and
    is what distill is built on: same steps per epoch and the same cache fingerprint in its config.json."""
    data = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=8, workers=0, seed=3)
    again = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=8, workers=0, seed=3)
    assert len(data) == 5 and data.num_classes == 10 and [t.id for t in data.teachers] == ["r14"]
    for a, b in zip(data.epoch(1), again.epoch(1)):  # deterministic in (seed, epoch)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets.topk_idx, b.targets.topk_idx)
    first = [b.labels for b in data.epoch(0)]
    assert sum(len(x) for x in first) == 40 and any(not torch.equal(x, y) for x, y in zip(first, (b.labels for b in data.epoch(1))))
    summary = distill(DistillConfig(data=tiny_data["train"].pattern, out=str(tmp_path / "run"), student="cifar_resnet8",
                                    cache=cache, epochs=1, batch_size=8, workers=0, device="cpu", seed=3))
    cfg = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["steps_per_epoch"] == len(data) and cfg["cache"] == data.fingerprint() and summary["epochs"] == 1


def test_a_student_at_its_own_resolution_sees_the_resized_teacher_views(tiny_data, cache, tmp_path):
    from torchvision.transforms.v2 import functional as TF

    full = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=8, workers=0)
    small = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=8, workers=0, student_size=8)
    a, b = next(full.epoch(2)), next(small.epoch(2))
    assert a.images.shape[-2:] == (16, 16) and b.images.shape[-2:] == (8, 8)
    assert torch.equal(b.images, TF.resize(a.images, [8, 8], antialias=True))  # the same views, resized
    assert torch.equal(a.targets.topk_idx, b.targets.topk_idx)  # with the full-resolution view's targets
    summary = distill(DistillConfig(data=tiny_data["train"].pattern, val_data=tiny_data["val"].pattern, cache=cache,
                                    out=str(tmp_path / "run"), student="cifar_resnet8", epochs=1, batch_size=8,
                                    workers=0, device="cpu", student_size=8))
    assert summary["best_val_top1"] is not None
    from pld_pipeline.student_data import EvalSamples
    evals = EvalSamples([tiny_data["val"].shards[0]], recipe=full.recipe, rank=0, world=1, num_classes=10, student_size=8)
    assert next(iter(evals))["image"].shape == (3, 8, 8)  # evaluation runs at the student's size too
    with __import__("pytest").raises(ValueError, match="--student-size must be >= 1"):
        distill(DistillConfig(data=tiny_data["train"].pattern, cache=cache, out=str(tmp_path / "x"),
                              student="cifar_resnet8", device="cpu", student_size=0))


def test_distill_from_an_ensemble_of_cached_teachers(tiny_data, cache, teacher_ckpt, tmp_path):
    import shutil

    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    from pld_pipeline.losses import TeacherTargets
    url = str(tmp_path / "two.zarr")
    shutil.copytree(cache, url)
    cache_teacher(CacheTeacherConfig(data=tiny_data["train"].pattern, out=url, views=4, size=16, k=5,
                                     temperatures=(1.0, 2.0), teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                                     recipe_overrides={"pad": 2}, workers=0, device="cpu"))
    # at temperature 2 each teacher's logz differs from the other's (at 1 every logz of a log-softmax is 0)
    pair = StudentData(tiny_data["train"].pattern, cache=url, teacher="r14,r8", temperature=2.0, batch_size=8,
                       workers=0, seed=1)
    singles = [StudentData(tiny_data["train"].pattern, cache=url, teacher=t, temperature=2.0, batch_size=8, workers=0,
                           seed=1) for t in ("r14", "r8")]
    got = next(pair.epoch(0)).targets
    members = [next(d.epoch(0)).targets for d in singles]  # same views, same order
    assert not torch.allclose(members[0].logz, members[1].logz)
    want = TeacherTargets.ensemble(members)
    assert torch.equal(got.topk_idx, want.topk_idx) and torch.allclose(got.topk_logp, want.topk_logp)
    assert torch.allclose(got.logz, want.logz) and torch.allclose(got.label_logp, want.label_logp)
    assert [t.id for t in pair.teachers] == ["r14", "r8"] and pair.fingerprint()["ensemble"] is not None
    summary = distill(DistillConfig(data=tiny_data["train"].pattern, cache=url, teacher="r14,r8", out=str(tmp_path / "run"),
                                    student="cifar_resnet8", epochs=1, batch_size=8, workers=0, device="cpu"))
    assert summary["epochs"] == 1


def test_each_sample_carries_the_cached_targets_of_the_view_it_replays_on_one_loader_thread(tiny_data, cache,
                                                                                           monkeypatch):
    """Targets are gathered per cache block, then sliced per sample: each image still comes with its own row's
    targets for the view it shows. In the caller's process (workers=0) decoding and replay run on one torch
    thread, and the caller has its own thread count back whenever it holds a batch."""
    from pld_pipeline import student_data
    from pld_pipeline.cache import Cache
    from pld_pipeline.data import iter_shard
    from pld_pipeline.views import decode_image, replay_view
    threads = []
    monkeypatch.setattr(student_data, "replay_view",
                        lambda *a, **kw: (threads.append(torch.get_num_threads()), replay_view(*a, **kw))[1])
    torch.set_num_threads(2)
    data = StudentData(tiny_data["train"].pattern, cache=cache, batch_size=8, workers=0, seed=5)
    reader = Cache(cache)
    images = {s.cache_shard: [decode_image(x["png"]) for x in iter_shard(s.url)] for s in data.shards}
    blocks = {shard: reader.read(shard, "r14", 1.0) for shard in images}
    seen = 0
    for batch in data.epoch(2):
        assert torch.get_num_threads() == 2
        for i, (shard, view) in enumerate(batch.source.tolist()):
            block = blocks[shard]
            rows = [r for r, image in enumerate(images[shard])
                    if torch.equal(replay_view(image, block.params[r, view], data.recipe), batch.images[i])]
            assert len(rows) == 1
            row = rows[0]
            assert batch.labels[i] == int(block.labels[row])
            assert torch.equal(batch.targets.topk_idx[i], torch.as_tensor(block.topk_idx[row, view]).long())
            assert torch.equal(batch.targets.logz[i], torch.as_tensor(block.logz[row, view]).float())
            seen += 1
    assert seen == 40 and threads and set(threads) == {1}
    assert torch.get_num_threads() == 2
