"""Stage 1 on tiny generated shards: exactness against a direct forward, replay, extension, faults, torchrun."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pld_pipeline.cache import CacheError, Cache, SampleStatus, inspect_cache, verify_cache
from pld_pipeline.cache import schema
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.data import DataError, iter_shard
from pld_pipeline.losses import TeacherTargets
from pld_pipeline.models import load_model, preprocessing_of
from pld_pipeline.shards import write_split
from pld_pipeline.views import ViewError, ViewRecipe, decode_image, eval_params, normalize, replay_view, view_params

import forked
from conftest import NUM_CLASSES, make_images


def config(tiny_data, out, teacher_ckpt=None, **kw):
    teachers = kw.pop("teachers", None) or [TeacherSpec("cifar_resnet8", checkpoint=teacher_ckpt, name="r8")]
    base = dict(data=tiny_data["train"].pattern, out=str(out), teachers=teachers, views=3, size=16, k=4,
                batch_size=10, workers=0, num_classes=NUM_CLASSES, device="cpu")
    base.update(kw)
    return CacheTeacherConfig(**base)


def arrays(url, tid="r8"):
    r = Cache(url)
    names = [schema.KEY.path(), schema.LABEL.path(), schema.STATUS.path(), schema.PARAMS.path()] + [
        spec.path(tid) for spec in schema.BY_KIND["teacher"]]
    return {n: np.asarray(r.array(n)[:]) for n in names}


def assert_same_cache(a, b, tid="r8"):
    """Keys, labels, status, view parameters and top-k indices equal exactly; the teacher's floats to fp32
    round-off (1e-5 of their scale, or two steps of a float16 array): CPU kernels are chosen by batch size, so a view
    in a partial batch in one run and a full one in the other (more views later, a resumed or split run) goes through
    other kernels (seen: 4.9e-7 in a log-prob of 0.18 with one torch thread). A wrong view or teacher is off by far more."""
    x, y = arrays(a, tid), arrays(b, tid)
    for name in x:
        if np.issubdtype(x[name].dtype, np.floating):
            scale = max(1.0, float(np.abs(y[name]).max(initial=0.0)))
            atol = max(1e-5, 2 * float(np.finfo(x[name].dtype).eps)) * scale
            np.testing.assert_allclose(x[name], y[name], rtol=0, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_cached_values_equal_a_direct_teacher_forward_on_replayed_views(tiny_data, teacher_ckpt, tmp_path):
    cfg = config(tiny_data, tmp_path / "c.zarr", teacher_ckpt)
    summary = cache_teacher(cfg)
    assert summary["items"] == 40 * 3 and summary["shards_written"] == 3
    hits = 0
    reader = Cache(cfg.out)
    teacher = load_model("cifar_resnet8", checkpoint=teacher_ckpt).eval()
    prep = preprocessing_of(teacher)
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    for shard, url in enumerate(tiny_data["train"].shards):
        block = reader.read(shard, "r8", temperature=2.0)
        samples = list(iter_shard(url))
        assert block.keys == [s["__key__"] for s in samples]
        for i, sample in enumerate(samples):
            image = decode_image(sample["png"])
            for v in range(3):
                want_params = view_params(recipe, 0, sample["__key__"], v, *image.shape[1:])
                np.testing.assert_array_equal(block.params[i, v], want_params)
            x = torch.stack([replay_view(image, block.params[i, v], recipe) for v in range(3)])
            with torch.no_grad():
                logits = teacher(normalize(x, prep["mean"], prep["std"]))
            want = TeacherTargets.from_logits(logits, torch.full((3,), int(block.labels[i])), k=4, temperature=2.0)
            np.testing.assert_array_equal(block.topk_idx[i], want.topk_idx.numpy())
            np.testing.assert_allclose(block.topk_logp[i].astype(np.float32), want.topk_logp.numpy(), atol=2e-3, rtol=1e-3)
            np.testing.assert_allclose(block.label_logp[i].astype(np.float32), want.label_logp.numpy(), atol=2e-3, rtol=1e-3)
            np.testing.assert_allclose(block.logz[i], want.logz.numpy(), atol=1e-4, rtol=1e-5)
            hits += int((logits.argmax(1) == int(block.labels[i])).sum())
    # The teacher's accuracy on its cached views, as the summary, inspect and verify report it.
    assert 0 < hits < 120 and summary["teacher_accuracy"]["r8"] == hits / 120
    assert inspect_cache(cfg.out)["teachers"]["r8"]["accuracy_on_cached_views"] == hits / 120
    assert verify_cache(cfg.out).ok


def test_the_view_draw_depends_on_the_global_seed_key_and_view():
    recipe = ViewRecipe("imagenet", size=24, scale=(0.2, 1.0))
    draws = {(seed, key, v): tuple(view_params(recipe, seed, key, v, 40, 50))
             for seed in (0, 1) for key in ("a", "b") for v in (0, 1)}
    assert len(set(draws.values())) == len(draws)  # any change of seed, key or view gives another view
    assert tuple(view_params(recipe, 1, "a", 0, 40, 50)) == draws[(1, "a", 0)]


def test_view_params_come_from_a_stable_hash_and_replay_bit_for_bit():
    recipe = ViewRecipe("imagenet", size=24, scale=(0.2, 1.0))
    code = ("from pld_pipeline.views import ViewRecipe, view_params; "
            "print(view_params(ViewRecipe('imagenet', size=24, scale=(0.2, 1.0)), 7, 'key_1', 3, 40, 40).tolist())")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    params = view_params(recipe, 7, "key_1", 3, 40, 40)
    assert other_process.strip() == str(params.tolist())
    assert not np.array_equal(params, view_params(recipe, 7, "key_1", 4, 40, 40))
    image = torch.from_numpy(make_images(1, size=40)[0][0]).permute(2, 0, 1).contiguous()
    a, b = replay_view(image, params, recipe), replay_view(image.clone(), params.copy(), recipe)
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24) and torch.equal(a, b)


def _png(pixels: np.ndarray) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_replayed_views_keep_the_bytes_every_earlier_cache_was_made_with():
    # a cache's recipe fixes its views' pixels: students replay views cached by earlier versions, so the decode +
    # crop + resize + flip path must give these exact bytes (sha256 taken with the code before it was optimised)
    import hashlib
    image = decode_image(_png(np.random.default_rng(5).integers(0, 256, (37, 53, 3), dtype=np.uint8)))
    views = []
    for interpolation in ("bilinear", "bicubic", "nearest"):
        recipe = ViewRecipe("imagenet", size=24, interpolation=interpolation)
        views += [replay_view(image, view_params(recipe, 0, "k", v, 37, 53), recipe) for v in range(6)]
        views.append(replay_view(image, eval_params(recipe, 37, 53), recipe))
    cifar = ViewRecipe("cifar", size=32, pad=4)
    views += [replay_view(image, view_params(cifar, 0, "k", v, 37, 53), cifar) for v in range(6)]
    assert all(v.is_contiguous() for v in views)
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in views)).hexdigest()
    assert digest == "610bf60a24e16052a0a72e1c571e55d56fd94e6c5e5476168a94ce80ab4b429b"


def test_a_decoded_image_is_its_rgb_pixels_and_replays_as_a_contiguous_copy_of_them():
    # decode_image hands out a channels-last view (no whole-image layout copy); every view of it is byte-for-byte
    # the view of the same pixels laid out [3, H, W], for every interpolation and for boxes padded past the edge
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    for pixels, want in ((rgb, rgb), (grey, np.repeat(grey[..., None], 3, 2))):
        image = decode_image(_png(pixels))
        assert image.shape == (3, 29, 41) and torch.equal(image.permute(1, 2, 0), torch.from_numpy(want))
        flat = image.contiguous()
        for interpolation in ("bilinear", "bicubic", "nearest"):
            recipe = ViewRecipe("imagenet", size=16, interpolation=interpolation)
            for v in range(8):
                params = view_params(recipe, 1, "k", v, 29, 41)
                assert torch.equal(replay_view(image, params, recipe), replay_view(flat, params, recipe))
        cifar = ViewRecipe("cifar", size=32, pad=4)
        for params in ([-4, -3, 32, 32, 1], [1, 13, 32, 32, 0]):
            assert torch.equal(replay_view(image, params, cifar), replay_view(flat, params, cifar))
    # views.crop is torchvision's crop (zero padding) for boxes inside and across the edges of the image (a box
    # wholly outside is one box_problem refuses and no draw makes)
    from torchvision.transforms.v2 import functional as TF
    from pld_pipeline.views import crop
    image = decode_image(_png(rgb))
    for box in ((0, 0, 29, 41), (3, 5, 10, 7), (-4, -3, 32, 32), (20, 30, 16, 16), (-4, 2, 5, 50), (25, -6, 8, 8)):
        assert torch.equal(crop(image, *box), TF.crop(image.contiguous(), *box)), box


def test_cifar_views_pad_with_zeros_and_flip():
    recipe = ViewRecipe("cifar", size=8, pad=2)
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    out = replay_view(image, [-2, 1, 8, 8, 1], recipe)
    want = torch.zeros(3, 8, 8, dtype=torch.uint8)
    want[:, 2:, :7] = image[:, :6, 1:]
    assert torch.equal(out, want.flip(-1))
    clean = ViewRecipe("cifar", size=8, clean_view=True)
    assert view_params(clean, 0, "k", 0, 8, 8).tolist() == [0, 0, 8, 8, 0]
    # the eval view of an image smaller than the crop pads past `pad`: a box an honest cache can store, replayed;
    # one step further is refused
    small = image[:, :3, :3]
    box = eval_params(recipe, 3, 3)
    assert box.tolist() == [-3, -3, 8, 8, 0] and replay_view(small, box, recipe).shape == (3, 8, 8)
    with pytest.raises(ViewError, match=r"a 8x8 box at \(-4, -3\) outside the 3x3 image padded by 2"):
        replay_view(small, [-4, -3, 8, 8, 0], recipe)
    with pytest.raises(ViewError, match="a 8x9 box where the cifar recipe crops 8x8"):
        replay_view(image, [0, 0, 8, 9, 0], recipe)


def test_several_teachers_in_one_pass_and_a_teacher_added_later(tiny_data, teacher_ckpt, tmp_path):
    both = [TeacherSpec("cifar_resnet8", checkpoint=teacher_ckpt, name="r8"), TeacherSpec("cifar_resnet14", name="r14")]
    cfg = config(tiny_data, tmp_path / "both.zarr", teachers=both)
    cache_teacher(cfg)
    reader = Cache(cfg.out)
    assert set(reader.meta.teachers) == {"r8", "r14"}
    assert reader.meta.teachers["r14"].checkpoint_sha256 is None
    later = config(tiny_data, tmp_path / "later.zarr", teacher_ckpt)
    cache_teacher(later)
    summary = cache_teacher(config(tiny_data, later.out, teachers=[TeacherSpec("cifar_resnet14", name="r14")]))
    assert summary["items"] == 120  # only the new teacher's units were computed
    assert_same_cache(cfg.out, later.out, "r8")
    assert_same_cache(cfg.out, later.out, "r14")
    assert verify_cache(later.out).ok


def test_more_views_later_equals_all_views_at_once(tiny_data, teacher_ckpt, tmp_path):
    at_once = config(tiny_data, tmp_path / "once.zarr", teacher_ckpt, views=4)
    cache_teacher(at_once)
    grown = config(tiny_data, tmp_path / "grown.zarr", teacher_ckpt, views=2)
    cache_teacher(grown)
    summary = cache_teacher(config(tiny_data, grown.out, teacher_ckpt, views=4))
    assert summary["items"] == 40 * 2
    assert_same_cache(at_once.out, grown.out)
    assert "s000000.teacher.r8.2-4" in {u.name for u in Cache(grown.out).done}


def test_rerun_resumes_and_refuses_a_changed_teacher_or_recipe(tiny_data, teacher_ckpt, tmp_path):
    cfg = config(tiny_data, tmp_path / "c.zarr", teacher_ckpt)
    cache_teacher(cfg)
    assert cache_teacher(cfg)["items"] == 0
    other_ckpt = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    torch.manual_seed(9)
    save_file(load_model("cifar_resnet8", num_classes=NUM_CLASSES).state_dict(), str(other_ckpt))
    with pytest.raises(CacheError, match="Teacher 'r8' already in .* differs in checkpoint_sha256.*--teacher-name"):
        cache_teacher(config(tiny_data, cfg.out, str(other_ckpt)))
    with pytest.raises(CacheError, match="different view recipe"):
        cache_teacher(config(tiny_data, cfg.out, teacher_ckpt, recipe_overrides={"pad": 2}))
    with pytest.raises(CacheError, match="different dataset"):
        cache_teacher(config(tiny_data, cfg.out, teacher_ckpt, data=tiny_data["train"].shards[0]))
    summary = cache_teacher(config(tiny_data, cfg.out, str(other_ckpt), overwrite=True))
    assert summary["items"] == 120


def _cli_here(*args):
    """The same `pld cache-teacher` line run in this process (for the runs no signal is sent to): a fresh
    interpreter costs ~6 s of CPU."""
    from typer.testing import CliRunner

    from pld_pipeline_cli.app import app
    result = CliRunner().invoke(app, ["cache-teacher", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, teacher_ckpt):
    images, labels = make_images(160, seed=5)
    split = write_split(((f"k{i:04d}", __import__("pld_pipeline.shards", fromlist=["x"]).encode_png(images[i]), "png",
                          int(labels[i])) for i in range(160)), str(tmp_path / "d"), "train", 16)
    args = ["--data", split.pattern, "--teacher", "cifar_resnet14", "--teacher-name", "r14", "--views", "3",
            "--size", "16", "--num-classes", "10", "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--top-k", "5", "--quiet"]
    ref = str(tmp_path / "ref.zarr")
    _cli_here("--out", ref, *args)
    killed = str(tmp_path / "killed.zarr")
    proc = forked.Forked(["cache-teacher", "--out", killed, *args], stdout=forked.DEVNULL)  # a process to kill
    units = os.path.join(killed, "units")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(units) and any(".teacher." in n and os.path.isfile(os.path.join(units, n, "zarr.json"))
                                        for n in os.listdir(units)):
            break  # a teacher unit's marker is written (its folder appears a moment before the marker's rename)
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the test data larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Cache(killed)
    assert 0 < len(partial.units(kind="teacher")) < 10
    assert not verify_cache(killed).ok  # the reader knows the cache is incomplete
    done = _cli_here("--out", killed, *args[:-1], "--json")
    assert '"skipped_samples": 0' in done
    assert verify_cache(killed).ok
    assert_same_cache(ref, killed, "r14")


def bad_shards(tmp_path, samples):
    return write_split(iter(samples), str(tmp_path / "bad"), "bad", 100).pattern


def png(i):
    from pld_pipeline.shards import encode_png
    return encode_png(make_images(1, seed=i)[0][0])


def test_an_undecodable_image_fails_naming_shard_and_key_or_is_skipped_and_recorded(tiny_data, tmp_path, teacher_ckpt):
    data = bad_shards(tmp_path, [("a0", png(0), "png", 1), ("broken", b"not an image", "png", 2), ("a2", png(2), "png", 3)])
    cfg = config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, data=data)
    with pytest.raises(DataError, match=r"Cannot decode image of sample 'broken' in shard .*bad-000000.tar.*--on-bad-sample skip"):
        cache_teacher(cfg)
    cfg = config(tiny_data, tmp_path / "c2.zarr", teacher_ckpt, data=data, on_bad_sample="skip")
    summary = cache_teacher(cfg)
    assert summary["skipped_samples"] == 1
    block = Cache(cfg.out).read(0, "r8")
    assert block.keys == ["a0", "broken", "a2"]
    assert block.status.tolist() == [SampleStatus.OK, SampleStatus.SKIPPED, SampleStatus.OK]
    assert (block.topk_idx[1] == -1).all() and (block.topk_idx[0] >= 0).all()
    assert verify_cache(cfg.out).ok


@pytest.mark.parametrize("samples, match", [
    ([("a", None, "png", 1), ("a", None, "png", 2)], "Duplicate key 'a'"),
    ([("a", None, "png", 1), ("b", None, "png", 12)], r"Label 12 of sample 'b' .* outside \[0, 10\)"),
])
def test_bad_keys_and_labels_fail_naming_the_sample(tiny_data, tmp_path, teacher_ckpt, samples, match):
    if "Duplicate" in match:  # a TarWriter happily writes duplicates; webdataset would merge them silently
        import webdataset as wds
        path = tmp_path / "dup-000000.tar"
        with wds.TarWriter(str(path)) as w:
            w.write({"__key__": "x", "png": png(0), "cls": b"1"})
            w.write({"__key__": "y", "png": png(1), "cls": b"1"})
        path2 = tmp_path / "dup-000001.tar"
        with wds.TarWriter(str(path2)) as w:
            w.write({"__key__": "x", "png": png(0), "cls": b"1"})
        data, match = str(tmp_path / "dup-{000000..000001}.tar"), "Duplicate key 'x' in shards"
    else:
        data = bad_shards(tmp_path, [(k, png(i), e, lab) for i, (k, _, e, lab) in enumerate(samples)])
    with pytest.raises(DataError, match=match):
        cache_teacher(config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, data=data))


def test_a_missing_label_fails_naming_the_fix(tiny_data, tmp_path, teacher_ckpt):
    import webdataset as wds
    path = tmp_path / "nolabel-000000.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "x", "png": png(0)})
    with pytest.raises(DataError, match=r"No 'cls' label in sample 'x' .*--label-field"):
        cache_teacher(config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, data=str(path)))


def test_non_finite_teacher_outputs_fail_naming_the_key(tiny_data, tmp_path):
    cfg = config(tiny_data, tmp_path / "c.zarr", teachers=[TeacherSpec("fake_models:nan_model", name="nan", mean=(0.5,) * 3, std=(0.5,) * 3)])
    with pytest.raises(DataError, match=r"Teacher 'nan' produced NaN/Inf logits for sample '\w+' view 0"):
        cache_teacher(cfg)


def test_missing_data_and_unknown_teacher_are_clear_errors(tiny_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cache_teacher(config(tiny_data, tmp_path / "c.zarr", data=str(tmp_path / "none-000000.tar")))
    with pytest.raises(ValueError, match="Unknown model 'no_such_net'"):
        cache_teacher(config(tiny_data, tmp_path / "c.zarr", teachers=[TeacherSpec("no_such_net")]))


def test_pipe_sources_are_read_and_fingerprinted_by_their_full_hash(tiny_data, teacher_ckpt, tmp_path):
    data = "::".join(f"pipe:cat {u}" for u in tiny_data["train"].shards)
    cfg = config(tiny_data, tmp_path / "pipe.zarr", teacher_ckpt, data=data)
    assert cache_teacher(cfg)["items"] == 120
    reader = Cache(cfg.out)
    assert [s.name for s in reader.shards] == [os.path.basename(u) for u in tiny_data["train"].shards]
    assert all(s.quick_hash == s.sha256 for s in reader.shards)  # no seeking through a pipe
    plain = config(tiny_data, tmp_path / "plain.zarr", teacher_ckpt)
    cache_teacher(plain)
    assert [s.sha256 for s in Cache(plain.out).shards] == [s.sha256 for s in reader.shards]
    assert_same_cache(cfg.out, plain.out)


def test_the_teacher_runs_in_fp32_unless_bf16_is_asked_for_and_recorded(tiny_data, teacher_ckpt, tmp_path):
    """bf16 logits reorder near-ties and move log-probs: a GPU cache must not silently differ from a CPU one.
    fp32 is the default (the direct-forward test above checks its values); bf16 is an opt-in, recorded and bound."""
    fp32 = config(tiny_data, tmp_path / "a.zarr", teacher_ckpt, views=1)
    bf16 = config(tiny_data, tmp_path / "b.zarr", teacher_ckpt, views=1, precision="bf16")
    cache_teacher(fp32)
    cache_teacher(bf16)  # on CPU: CPU bf16 autocast, the same rounding policy as on a GPU
    ra, rb = Cache(fp32.out), Cache(bf16.out)
    assert ra.teacher("r8").precision == "fp32" and rb.teacher("r8").precision == "bf16"
    a, b = ra.read(0, "r8"), rb.read(0, "r8")
    assert np.abs(a.topk_logp - b.topk_logp).max() > 1e-3  # rounded...
    np.testing.assert_allclose(a.topk_logp, b.topk_logp, atol=0.25)  # ...but the same teacher
    with pytest.raises(CacheError, match="differs in precision"):
        cache_teacher(config(tiny_data, tmp_path / "b.zarr", teacher_ckpt, views=1))
    with pytest.raises(ValueError, match="--teacher-precision must be fp32 or bf16"):
        cache_teacher(config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, precision="fp16"))


def test_a_torchvision_builder_is_a_teacher_and_its_width_comes_from_its_checkpoint(tiny_data, tmp_path):
    """The documented example (docs/quickstart.md): `--teacher torchvision.models:resnet18` with a checkpoint and
    its normalisation. No --num-classes: the builder receives the checkpoint's width (10)."""
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=10).eval()
    ckpt = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = config(tiny_data, tmp_path / "c.zarr", views=1, num_classes=None, k=3, teachers=[
        TeacherSpec("torchvision.models:resnet18", str(ckpt), "r18", mean=mean, std=std)])
    summary = cache_teacher(cfg)
    assert summary["num_classes"] == 10
    block = Cache(cfg.out).read(2, "r18")
    recipe = ViewRecipe.from_dict(Cache(cfg.out).meta.recipe)
    samples = list(iter_shard(tiny_data["train"].shards[2]))
    x = torch.stack([replay_view(decode_image(s["png"]), block.params[i, 0], recipe) for i, s in enumerate(samples)])
    with torch.no_grad():
        want = TeacherTargets.from_logits(net(normalize(x, mean, std)), torch.as_tensor(block.labels).long(), k=3)
    np.testing.assert_array_equal(block.topk_idx[:, 0], want.topk_idx.numpy())


def test_a_plain_module_takes_its_width_from_its_weights(tiny_data, tmp_path):
    """A factory with no num_classes argument and a model with no num_classes attribute: width 7 from the weights."""
    cfg = config(tiny_data, tmp_path / "c.zarr", views=1, num_classes=None, k=3, teachers=[
        TeacherSpec("fake_models:plain_cnn", name="cnn", mean=(0.5,) * 3, std=(0.5,) * 3)])
    with pytest.raises(DataError, match="outside \\[0, 7\\)"):  # the tiny data has 10 classes: refused, by key
        cache_teacher(cfg)


def test_the_key_index_is_built_by_the_worker_that_completes_the_shards(tiny_data, teacher_ckpt, tmp_path):
    cfg = config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, part=(0, 2))
    cache_teacher(cfg)  # shards 0 and 2: not every shard's samples yet, so no index
    assert inspect_cache(cfg.out)["key_index"] == "absent"
    cache_teacher(config(tiny_data, cfg.out, teacher_ckpt, part=(1, 2)))
    reader = Cache(cfg.out)
    assert inspect_cache(cfg.out)["key_index"] == "current"
    scanned = reader.key_index()
    assert len(scanned) == 40 and all(reader.find(k) == where for k, where in scanned.items())
    assert reader.find("not-a-key") is None and verify_cache(cfg.out).ok
    from typer.testing import CliRunner

    from pld_pipeline_cli.app import app
    key, (shard, row) = next(iter(scanned.items()))
    shown = CliRunner().invoke(app, ["inspect", cfg.out, "--key", key])
    assert shown.exit_code == 0 and f"shard={shard}" in shown.output and f"row={row}" in shown.output
    assert "current" in CliRunner().invoke(app, ["inspect", cfg.out]).output
    missing = CliRunner().invoke(app, ["inspect", cfg.out, "--key", "nope"])
    assert missing.exit_code == 2 and "no sample with key 'nope'" in missing.output


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_a_part_above_zero_with_overwrite_is_refused_and_deletes_nothing(tiny_data, teacher_ckpt, tmp_path):
    """Only part 0 may start a cache over: `--part 1/2 --overwrite` would delete part 0's finished units while
    part 0 writes."""
    cfg = config(tiny_data, tmp_path / "c.zarr", teacher_ckpt, views=1, part=(0, 2))
    assert cache_teacher(cfg)["shards_written"] == 2
    before = _tree(cfg.out)
    with pytest.raises(ValueError, match=r"--part 1/2 with --overwrite would delete the other parts' work"):
        cache_teacher(config(tiny_data, cfg.out, teacher_ckpt, views=1, part=(1, 2), overwrite=True, part_wait=1.0))
    assert _tree(cfg.out) == before


def test_the_image_field_is_recorded_and_the_student_reads_the_image_its_teacher_saw(tmp_path, teacher_ckpt):
    """Samples holding two images (a jpg, and a png of another picture): a cache made from the png records
    it, and the student replays the png, not the jpg its default list would pick first."""
    import io

    import webdataset as wds
    from PIL import Image

    from pld_pipeline.student_data import ShardRange, StudentData
    images, labels = make_images(8, seed=5)
    shard = str(tmp_path / "two-000000.tar")

    def encoded(arr, fmt):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()
    with wds.TarWriter(shard) as sink:
        for i, (img, c) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"{i:04d}", "jpg": encoded(255 - img, "JPEG"), "png": encoded(img, "PNG"),
                        "cls": str(int(c)).encode()})
    url = str(tmp_path / "png.zarr")
    cache_teacher(CacheTeacherConfig(data=shard, out=url, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                                     views=2, size=16, k=4, batch_size=8, workers=0, num_classes=NUM_CLASSES,
                                     device="cpu", image_field="png"))
    recipe = Cache(url).meta.recipe
    assert recipe["image_field"] == "png"
    assert "image_field" not in ViewRecipe().to_dict()  # the default is left out: earlier caches still match

    data = StudentData(shard, cache=url, teacher="r8", batch_size=4, workers=0)
    assert data.image_field == "png"
    block = Cache(url).read(0, "r8")
    items = list(data.dataset._samples(ShardRange(data.shards[0], 0, 8)))
    assert len(items) == 8
    for item in items:
        row, view = int(item["__key__"]), int(item["source"][1])
        want = replay_view(torch.from_numpy(images[row]).permute(2, 0, 1).contiguous(), block.params[row, view],
                           ViewRecipe.from_dict(recipe))
        assert torch.equal(item["image"], want), item["__key__"]
    with pytest.raises(ValueError, match=r"--image-field 'jpg' differs from the field.* drawn from \('png'\)"):
        StudentData(shard, cache=url, teacher="r8", batch_size=4, workers=0, image_field="jpg")
    with pytest.raises(CacheError, match="different view recipe"):  # extending with the default field
        cache_teacher(CacheTeacherConfig(data=shard, out=url, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                                         views=3, size=16, k=4, batch_size=8, workers=0, num_classes=NUM_CLASSES,
                                         device="cpu"))
    with pytest.raises(ValueError, match="not a ;-separated list of sample field names"):
        ViewRecipe(image_field="png;../x")
