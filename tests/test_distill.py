"""Stage 2 end to end on tiny generated shards: it learns, writes its files, resumes exactly, refuses bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pld_pipeline.cache import CacheError
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.student_data import rebatch
from pld_pipeline.student_data import TrainSamples, TrainShard, choose_view
from pld_pipeline.views import ViewRecipe, decode_image, replay_view

from conftest import NUM_CLASSES


def cfg(tiny_data, cache_url, out, **kw):
    base = dict(data=tiny_data["train"].pattern, out=str(out), student="cifar_resnet8", loss="pld", cache=cache_url,
                val_data=tiny_data["val"].pattern, epochs=3, batch_size=8, lr=3e-3, workers=0, device="cpu")
    base.update(kw)
    return DistillConfig(**base)


def label_fit(model, tiny_data, recipe):
    """Cross-entropy of ``model`` on the true labels of every training image (clean view, batch statistics):
    independent of the loss that trained it, so a broken loss (no gradient, the wrong sign) cannot lower it."""
    from pld_pipeline.data import expand_shards
    from pld_pipeline.models import student_preprocessing
    from pld_pipeline.student_data import EvalSamples
    from pld_pipeline.views import normalize
    items = list(EvalSamples(expand_shards(tiny_data["train"].pattern), recipe=recipe, rank=0, world=1,
                             num_classes=NUM_CLASSES))
    x, y = torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])
    prep = student_preprocessing(model)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.train()(normalize(x, prep["mean"], prep["std"])), y))


@pytest.mark.parametrize("loss", ["pld", "kd", "dist", "ce"])
def test_every_loss_trains_from_the_cache_and_writes_its_files(tiny_data, cache, tmp_path, loss):
    """Two epochs of each loss fit the training labels clearly better than the initial weights (measured: the
    cross-entropy fell from 2.84 to 2.18-2.46 when written; a loss with no gradient left it at 2.84, a sign
    flip raised it above 3.2), and the run writes its files."""
    from pld_pipeline.cache import Cache
    from pld_pipeline.models import load_model
    summary = distill(cfg(tiny_data, cache, tmp_path / loss, loss=loss, epochs=2))
    run = tmp_path / loss
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "metrics.jsonl", "metrics.csv",
                 "config.json", "last_state.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= 100 for r in rows)
    config = json.load(open(run / "config.json"))
    assert config["cache"]["shards"][0]["sha256"] and config["config"]["loss"] == loss
    if loss != "ce":
        assert config["cache"]["teacher"]["id"] == "r14" and config["temperature"] == (2.0 if loss == "kd" else 1.0)
    assert summary["best_val_top1"] is not None
    recipe = ViewRecipe.from_dict(Cache(cache).meta.recipe)
    torch.manual_seed(0)  # the run's seed: its initial student
    student = load_model("cifar_resnet8", num_classes=NUM_CLASSES)
    before = label_fit(student, tiny_data, recipe)
    student.load_state_dict(load_file(str(run / "last.safetensors")))
    after = label_fit(student, tiny_data, recipe)
    assert after < before - 0.25, (before, after)


def test_pld_training_loss_decreases(tiny_data, cache, tmp_path):
    distill(cfg(tiny_data, cache, tmp_path / "run", epochs=4))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


class CrashAfterEpoch(Exception):
    pass


def test_resume_after_a_crash_gives_the_same_final_weights(tiny_data, cache, tmp_path):
    distill(cfg(tiny_data, cache, tmp_path / "whole", workers=2, ema_decay=0.9))

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 1:
            raise CrashAfterEpoch

    with pytest.raises(CrashAfterEpoch):
        distill(cfg(tiny_data, cache, tmp_path / "crashed", workers=2, ema_decay=0.9), crash)
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        distill(cfg(tiny_data, cache, tmp_path / "crashed", workers=2, ema_decay=0.9))
    with pytest.raises(ValueError, match=r"different settings \(lr\)"):
        distill(cfg(tiny_data, cache, tmp_path / "crashed", workers=2, ema_decay=0.9, lr=1.0, resume=True))
    try:  # --deterministic may change on resume (it changes kernels, not results on a CPU)
        distill(cfg(tiny_data, cache, tmp_path / "crashed", workers=2, ema_decay=0.9, resume=True, deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    a = load_file(str(tmp_path / "whole" / "last.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "last.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    whole = open(tmp_path / "whole" / "metrics.csv").read().splitlines()
    resumed = open(tmp_path / "crashed" / "metrics.csv").read().splitlines()
    assert len(whole) == len(resumed) == 4
    assert [r.split(",")[1] for r in whole] == [r.split(",")[1] for r in resumed]  # same train losses


def plain(tiny_data, out, **kw):
    """A --loss ce run without a cache on the smallest train shard (8 samples: one step per epoch)."""
    base = dict(data=tiny_data["train"].shards[-1], out=str(out), student="cifar_resnet8", loss="ce",
                val_data=tiny_data["val"].pattern, epochs=3, batch_size=8, lr=3e-3, workers=0, device="cpu",
                num_classes=NUM_CLASSES, recipe={"name": "cifar", "size": 16, "pad": 2})
    base.update(kw)
    return DistillConfig(**base)


class Ranked(torch.nn.Module):
    """A fixed classifier: sample i (its index in pixel [0, 0, 0]) gets row i of ``table`` as logits."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].round().long()]


def test_evaluation_counts_top1_and_top5_hits_apart():
    """A fixed model whose true label sits at known ranks: top-1 = rank 0 only (30%), top-5 = ranks 0-4 (70%)."""
    from contextlib import nullcontext

    from pld_pipeline.distill import evaluate
    from pld_pipeline.distributed import DistInfo
    ranks = [0, 0, 0, 1, 2, 4, 5, 7, 9, 3]
    g = torch.Generator().manual_seed(0)
    table = torch.empty(10, NUM_CLASSES)
    labels = torch.empty(10, dtype=torch.long)
    for i, r in enumerate(ranks):
        order = torch.randperm(NUM_CLASSES, generator=g)  # order[j]: the class ranked j-th
        table[i, order] = torch.linspace(3.0, -3.0, NUM_CLASSES)
        labels[i] = order[r]
    images = torch.zeros(10, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8)
    loader = [{"image": images[:6], "label": labels[:6]}, {"image": images[6:], "label": labels[6:]}]
    prep = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}  # normalize() leaves the pixel values as they are
    got = evaluate(Ranked(table), loader, prep, torch.device("cpu"), DistInfo(), False, nullcontext())
    assert got["val_top1"] == pytest.approx(30.0) and got["val_top5"] == pytest.approx(70.0)
    assert got["val_samples"] == 10
    assert got["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(table, labels)), rel=1e-6)


def test_eval_every_n_evaluates_after_epochs_n_2n_and_the_last(tiny_data, tmp_path):
    summary = distill(plain(tiny_data, tmp_path / "run", epochs=5, eval_every=2))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evaluated = [r["epoch"] for r in rows if np.isfinite(r["val_top1"])]
    assert evaluated == [1, 3, 4]  # epochs are 0-based: after the 2nd, the 4th and the last
    assert all(r["val_samples"] == 12 for r in rows if r["epoch"] in evaluated)
    best = max(evaluated, key=lambda e: (rows[e]["val_top1"], -e))  # the first epoch reaching the best top-1
    assert summary["best_epoch"] == best and summary["best_val_top1"] == rows[best]["val_top1"]


def test_ema_val_metrics_are_the_ema_weights_not_the_live_models(tiny_data, tmp_path):
    """With decay 1 the EMA keeps the weights it copied on its first updates (timm copies the model there) and never
    moves again, so the last epoch's ema_val_* are an earlier epoch's live val_*, and not the last epoch's."""
    distill(plain(tiny_data, tmp_path / "run", epochs=3, ema_decay=1.0))  # one step per epoch
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = rows[-1]
    assert last["ema_val_loss"] != pytest.approx(last["val_loss"], rel=1e-4)
    assert any(last["ema_val_loss"] == pytest.approx(r["val_loss"], rel=1e-5) for r in rows[:-1]), rows
    assert any(last["ema_val_top1"] == r["val_top1"] for r in rows[:-1])


def test_the_learning_rate_warms_up_once_then_follows_one_cosine_over_the_whole_run(tiny_data, tmp_path):
    """--warmup-epochs 1 of a 3-epoch run of 5 steps each: a linear warm-up over the first 5 steps from lr/1000,
    then one cosine from there to --min-lr at step 15 (timm's CosineLRScheduler, t counted over the whole run),
    not a warm-up and cosine restarted every epoch."""
    lr, min_lr, steps, total = 3e-3, 1e-6, 5, 15
    seen = {}

    def record(event):
        if event["event"] == "step":  # the lr after the step's scheduler update: global step t = 5 e + s + 1
            seen[event["epoch"] * steps + event["step"] + 1] = event["lr"]
    distill(plain(tiny_data, tmp_path / "run", data=tiny_data["train"].pattern, epochs=3, lr=lr, min_lr=min_lr,
                  warmup_epochs=1.0, val_data=None), record)

    def want(t):
        if t < steps:
            return lr / 1000 + t * (lr - lr / 1000) / steps
        return min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * t / total))
    assert sorted(seen) == [1, 5, 6, 10, 11, 15]  # steps 0 and 4 of each epoch report their lr
    assert [seen[t] for t in sorted(seen)] == pytest.approx([want(t) for t in sorted(seen)], rel=1e-9)
    assert seen[1] < seen[5] and seen[5] > seen[6] > seen[10] > seen[11] > seen[15] == pytest.approx(min_lr)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["lr"] for r in rows] == pytest.approx([want(5), want(10), want(15)], rel=1e-9)


def test_a_resumed_run_keeps_its_saved_best(tiny_data, tmp_path):
    """A run crashes after epoch 1 with its best at epoch 0; the resumed epoch 2 must beat that best to replace
    best.safetensors, not "nothing yet" (a run that forgets its best ships a worse checkpoint)."""
    out = tmp_path / "run"

    def crash(event):
        if event["event"] == "epoch_end" and event["epoch"] == 1:
            raise CrashAfterEpoch
    with pytest.raises(CrashAfterEpoch):
        distill(plain(tiny_data, out), crash)
    state = torch.load(out / "last_state.pt", weights_only=True)
    state["best"] = {"val_top1": 100.0, "epoch": 0}  # a best no later epoch can beat (ties do not replace it)
    torch.save(state, out / "last_state.pt")
    best_bytes = (out / "best.safetensors").read_bytes()
    summary = distill(plain(tiny_data, out, resume=True))
    assert summary["resumed_from_epoch"] == 2
    assert summary["best_epoch"] == 0 and summary["best_val_top1"] == 100.0
    assert (out / "best.safetensors").read_bytes() == best_bytes
    assert torch.load(out / "last_state.pt", weights_only=True)["best"] == {"val_top1": 100.0, "epoch": 0}


def test_a_run_folder_named_after_a_checkpoint_gets_its_files(tiny_data, tmp_path):
    """A sweep over --init-checkpoint names its runs after the files (`init_checkpoint=..._a.safetensors`): the
    run's best.json and last.json go inside that folder, not to a path with its name rewritten."""
    out = tmp_path / "init_checkpoint=_ckpt_a.safetensors"
    distill(plain(tiny_data, out, epochs=1))
    assert {"best.json", "best.safetensors", "last.json", "last.safetensors"} <= set(os.listdir(out))
    assert json.load(open(out / "best.json"))["epoch"] == 0


@pytest.mark.slow
def test_the_student_trains_on_exactly_the_views_the_teacher_saw(tiny_data, cache):
    from pld_pipeline.cache import Cache
    reader = Cache(cache)
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    shards = [TrainShard(u, n, i) for i, (u, n) in enumerate(zip(tiny_data["train"].shards, (16, 16, 8)))]
    ds = TrainSamples(shards, recipe=recipe, seed=0, rank=0, world=1, cache_url=cache, teachers=["r14"], k=5,
                      num_views=4, shuffle_buffer=1)
    ds.set_epoch(2)
    from pld_pipeline.data import iter_shard
    images = {s["__key__"]: decode_image(s["png"]) for u in tiny_data["train"].shards for s in iter_shard(u)}
    index = reader.key_index()
    blocks = {shard: reader.read(shard, "r14") for shard in {shard for shard, _ in index.values()}}
    cached_view = {}  # each sample's view for epoch 2, replayed from its cached parameters
    for key, image in images.items():
        shard, row = index[key]
        cached_view[key] = replay_view(image, blocks[shard].params[row, choose_view("rotate", 0, key, 2, 4)], recipe)
    matched = []
    for item in ds:
        # the item's tensor is, bit for bit, the cached view of exactly one sample
        matches = [key for key, view in cached_view.items() if torch.equal(view, item["image"])]
        assert len(matches) == 1, matches
        matched += matches
    assert sorted(matched) == sorted(images)  # each sample once in the epoch, with its own view


@pytest.mark.parametrize("epoch", [0, 3])
def test_every_student_input_is_paired_with_the_teachers_targets_for_that_exact_tensor(tiny_data, cache, teacher_run,
                                                                                      epoch):
    """Run the cached teacher again on exactly the tensor the student receives: its top-k and log-probs must be
    the targets the item carries (a view/target mismatch, e.g. view v with view v+1's targets, fails here)."""
    from pld_pipeline.cache import Cache
    from pld_pipeline.losses import TeacherTargets
    from pld_pipeline.models import load_model
    from pld_pipeline.views import normalize
    reader = Cache(cache)
    prep = reader.teacher("r14").preprocessing
    teacher = load_model("cifar_resnet14", checkpoint=teacher_run).eval()
    shards = [TrainShard(u, n, i) for i, (u, n) in enumerate(zip(tiny_data["train"].shards, (16, 16, 8)))]
    ds = TrainSamples(shards, recipe=ViewRecipe.from_dict(reader.meta.recipe), seed=0, rank=0, world=1,
                      cache_url=cache, teachers=["r14"], k=5, temperature=1.0, num_views=4, shuffle_buffer=8)
    ds.set_epoch(epoch)
    items = list(ds)
    assert len(items) == 40
    x = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        logits = teacher(normalize(x, prep["mean"], prep["std"]))
    want = TeacherTargets.from_logits(logits, torch.tensor([it["label"] for it in items]), k=5)
    got_idx = torch.stack([torch.as_tensor(it["topk_idx"][0]) for it in items])  # [teachers, k] per item
    got_logp = torch.stack([torch.as_tensor(it["topk_logp"][0]) for it in items])
    assert torch.equal(got_idx, want.topk_idx)
    torch.testing.assert_close(got_logp, want.topk_logp, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(np.array([it["label_logp"][0] for it in items])), want.label_logp,
                               atol=2e-3, rtol=1e-3)


def test_views_rotate_through_all_cached_views():
    views = [choose_view("rotate", 0, "some_key", epoch, 4) for epoch in range(8)]
    assert sorted(views[:4]) == [0, 1, 2, 3] and views[:4] == views[4:]
    assert len({choose_view("rotate", 0, f"k{i}", 0, 4) for i in range(50)}) == 4  # per-sample offsets


def test_random_view_policy_draws_a_new_view_each_epoch_deterministically():
    """--view-policy random: a stable draw per (seed, sample, epoch), so a run uses the cached views (not one view
    for the whole run) and a resumed or repeated run draws the same ones."""
    keys = [f"k{i}" for i in range(20)]
    draws = {key: [choose_view("random", 7, key, epoch, 4) for epoch in range(8)] for key in keys}
    assert all(len(set(views)) >= 2 for views in draws.values()), draws  # never one view for a whole run
    assert len({v for views in draws.values() for v in views}) == 4
    assert draws == {key: [choose_view("random", 7, key, epoch, 4) for epoch in range(8)] for key in keys}
    other_seed = {key: [choose_view("random", 8, key, epoch, 4) for epoch in range(8)] for key in keys}
    assert other_seed != draws


def test_rebatch_gives_exact_batches_across_partial_worker_batches():
    parts = [{"label": torch.arange(n), "image": torch.zeros(n, 2)} for n in (5, 3, 7, 2)]
    out = list(rebatch(iter(parts), 4))
    assert [len(b["label"]) for b in out] == [4, 4, 4, 4]
    assert torch.cat([b["label"] for b in out]).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 0]


def test_no_teacher_is_loaded_the_teachers_code_and_weights_can_be_gone(tiny_data, tmp_path):
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "vanishing_teacher.py").write_text(textwrap.dedent("""
        from pld_pipeline.models import load_model
        def build(num_classes=10, **kw):
            return load_model("cifar_resnet8", num_classes=num_classes)
    """))
    url = str(tmp_path / "c.zarr")
    sys.path.insert(0, str(module_dir))
    try:
        cache_teacher(CacheTeacherConfig(data=tiny_data["train"].pattern, out=url, views=2, size=16, k=3, workers=0,
                                         teachers=[TeacherSpec("vanishing_teacher:build", name="gone")],
                                         num_classes=NUM_CLASSES, device="cpu"))
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("vanishing_teacher", None)
    shutil.rmtree(module_dir)
    code = textwrap.dedent(f"""
        import sys, builtins
        real_import = builtins.__import__
        def guard(name, *a, **k):
            assert "vanishing_teacher" not in name, "distill tried to load the teacher"
            return real_import(name, *a, **k)
        builtins.__import__ = guard
        from pld_pipeline.distill import DistillConfig, distill
        distill(DistillConfig(data={tiny_data['train'].pattern!r}, out={str(tmp_path / 'run')!r},
                              student="cifar_resnet8", cache={url!r}, epochs=1, batch_size=8, workers=0, device="cpu"))
        print("trained")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "trained" in run.stdout, run.stderr[-2000:]


def test_a_subset_of_the_cached_shards_is_fine(tiny_data, cache, tmp_path, monkeypatch):
    """Training on one of the three cached shards reads that shard's samples, each once per epoch, as the views
    the teacher saw: nothing from the other shards, nothing missing."""
    import pld_pipeline.distill
    from pld_pipeline.cache import Cache
    from pld_pipeline.data import iter_shard
    from pld_pipeline.student_data import StudentData
    trained = []

    class Recording(StudentData):
        def epoch(self, epoch):
            for batch in super().epoch(epoch):
                trained.extend(zip(batch.images, batch.labels.tolist()))
                yield batch
    monkeypatch.setattr(pld_pipeline.distill, "StudentData", Recording)
    shard = tiny_data["train"].shards[1]
    summary = distill(cfg(tiny_data, cache, tmp_path / "sub", data=shard, epochs=1))
    config = json.load(open(tmp_path / "sub" / "config.json"))
    assert config["train_shards"] == [{"url": shard, "nsamples": 16}] and config["steps_per_epoch"] == 2
    assert summary["epochs"] == 1
    reader = Cache(cache)
    recipe, index = ViewRecipe.from_dict(reader.meta.recipe), reader.key_index()
    expected = []
    for sample in iter_shard(shard):
        cache_shard, row = index[sample["__key__"]]
        assert cache_shard == 1
        v = choose_view("rotate", 0, sample["__key__"], 0, 4)
        image = replay_view(decode_image(sample["png"]), reader.read(cache_shard, "r14").params[row, v], recipe)
        expected.append((image.numpy().tobytes(), int(sample["cls"])))
    got = [(image.numpy().tobytes(), label) for image, label in trained]
    assert len(got) == 16 and sorted(got) == sorted(expected)


@pytest.mark.parametrize("change, error, match", [
    (dict(student="cifar_resnet8", init_checkpoint="WRONG_CLASSES"), ValueError, "does not fit model"),
    (dict(data="VAL"), CacheError, "is not one the cache .* covers"),
    (dict(teacher="nope"), CacheError, "'nope' is not in"),
    (dict(temperature=4.0), CacheError, r"Temperature 4 is not in teacher 'r14''s cached grid \(1, 2\)"),
    (dict(loss="kd", alpha=0.2, beta=0.3), ValueError, "takes no parameter"),
    (dict(cache=None), ValueError, "--loss pld needs --cache"),
    (dict(view_policy="sideways"), ValueError, "Unsupported view policy"),
    (dict(batch_size=1000), ValueError, "exceeds the 40 samples each of the 1 process\\(es\\) sees per epoch"),
    (dict(num_classes=5), ValueError, "differs from the cache's 10 classes"),
])
def test_bad_distill_input_is_refused_clearly(tiny_data, cache, tmp_path, change, error, match):
    change = dict(change)
    if change.get("init_checkpoint") == "WRONG_CLASSES":
        path = tmp_path / "wrong.pth"
        from pld_pipeline.models import load_model
        torch.save(load_model("cifar_resnet8", num_classes=3).state_dict(), str(path))
        change["init_checkpoint"] = str(path)
    if change.get("data") == "VAL":
        change["data"] = tiny_data["val"].pattern
    with pytest.raises(error, match=match):
        distill(cfg(tiny_data, cache, tmp_path / "run", **change))


def test_an_incomplete_cache_is_refused(tiny_data, cache, tmp_path):
    partial = str(tmp_path / "partial.zarr")
    shutil.copytree(cache, partial)
    os.remove(os.path.join(partial, "units", "s000001.teacher.r14.0-4", "zarr.json"))
    with pytest.raises(CacheError, match="is incomplete: 1 unit.*Rerun the same `pld cache-teacher`"):
        distill(cfg(tiny_data, partial, tmp_path / "run"))
