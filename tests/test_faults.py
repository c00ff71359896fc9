"""Fault injection, CI-sized: real SIGKILLs at named points of both stages; damaged and edited caches against
verify, distill and a repairing rerun; and each bad input a user reported getting silently wrong results from."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pld_pipeline.cache import CacheError, Cache, inspect_cache, verify_cache
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.shards import encode_png, write_split
from pld_pipeline_cli.app import app

import forked
from conftest import NUM_CLASSES, big_shard, make_images, stored_object, swap_objects, swap_views_in_object
from test_cache_teacher import assert_same_cache

pytestmark = pytest.mark.slow


def cli(*args, kill_at=None):
    """`pld ARGS` in a process of its own (forked: no interpreter to start): the runs a fault point kills, and
    errors that start in loader workers."""
    env = {**os.environ, "PLD_KILL_AT": kill_at} if kill_at else {k: v for k, v in os.environ.items() if k != "PLD_KILL_AT"}
    return forked.run(*args, env=env, timeout=300)


def cli_here(*args):
    """`pld ARGS` run by the same command line in this process: the uninterrupted references, resumes and
    reruns, which need the command's behaviour, not a process to kill (a fresh interpreter costs ~6 s of CPU).
    An exception the command lets escape fails the test, as its traceback would in a terminal."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def cache_args(tiny_data, teacher_ckpt, out):
    return ["cache-teacher", "--data", tiny_data["train"].pattern, "--teacher", "cifar_resnet8", "--teacher-checkpoint",
            teacher_ckpt, "--teacher-name", "r8", "--views", "2", "--size", "16", "--top-k", "4", "--num-classes",
            str(NUM_CLASSES), "--batch-size", "10", "--workers", "0", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def reference(tiny_data, teacher_ckpt, tmp_path_factory):
    """A complete cache made by one uninterrupted run (random teacher: near chance on purpose)."""
    out = tmp_path_factory.mktemp("faults") / "ref.zarr"
    run = cli_here(*cache_args(tiny_data, teacher_ckpt, out), "--json")
    assert run.returncode == 0, run.stderr
    return str(out), json.loads(run.stdout)


# -- kill -9 at every kind of point --------------------------------------------------------------------
# Array writes per shard, in order: samples (4 arrays), views (1), teacher (5). 7: inside shard 0's teacher unit
# (its samples and views units complete); 24: inside shard 2's samples unit (two shards already complete).
# unit.marker:2: shard 0's views marker written, its unit index not yet updated (HTTP readers would miss it).
@pytest.mark.parametrize("point", ["create.root", "create.arrays", "unit.array:7", "unit.array:24", "unit.marker:2"])
def test_cache_teacher_killed_anywhere_resumes_to_the_uninterrupted_cache(tiny_data, teacher_ckpt, reference, tmp_path,
                                                                        point):
    out = tmp_path / "killed.zarr"
    killed = cli(*cache_args(tiny_data, teacher_ckpt, out), kill_at=point)
    assert killed.returncode == -9, killed.stderr
    if point.startswith("create"):  # readers refuse a cache whose creation was cut short, naming the fix
        with pytest.raises(CacheError, match="still being created.*rerun the same `pld cache-teacher`"):
            Cache(str(out))
    else:  # a killed writer leaves units missing, never a unit that claims data it does not hold
        report = verify_cache(str(out))
        assert not report.ok and report.damaged == [], report.problems
        assert all(p.startswith("incomplete") for p in report.problems)
    resumed = cli_here(*cache_args(tiny_data, teacher_ckpt, out))
    assert resumed.returncode == 0, resumed.stderr
    report = verify_cache(str(out))
    assert report.ok and not any("unit index" in w for w in report.warnings), report.warnings
    assert_same_cache(reference[0], str(out))


def distill_args(tiny_data, cache, out):
    return ["distill", "--data", tiny_data["train"].pattern, "--val-data", tiny_data["val"].pattern, "--cache", cache,
            "--student", "cifar_resnet8", "--loss", "pld", "--epochs", "3", "--batch-size", "8", "--lr", "3e-3",
            "--ema-decay", "0.9", "--workers", "0", "--device", "cpu", "--quiet", "--out", str(out)]


def test_distill_killed_mid_epoch_resumes_to_the_same_weights_and_ema(tiny_data, cache, tmp_path):
    whole = cli_here(*distill_args(tiny_data, cache, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    # 40 samples / batch 8 = 5 steps an epoch: the 8th step is in the middle of epoch 1
    killed = cli(*distill_args(tiny_data, cache, tmp_path / "killed"), kill_at="distill.step:8")
    assert killed.returncode == -9, killed.stderr
    resumed = cli_here(*distill_args(tiny_data, cache, tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_file(str(tmp_path / d / "last.safetensors")) for d in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a, ema_b = (torch.load(tmp_path / d / "last_state.pt", weights_only=True)["ema"] for d in ("whole", "killed"))
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(not torch.equal(ema_a[f"module.{k}"], a[k]) for k in a if a[k].is_floating_point())  # its own state


# -- damaged data: verify reports it, distill refuses it, a rerun repairs it ---------------------------------
def flip_byte(url, path, shard):
    f = stored_object(url, path, shard)
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x5A
    open(f, "wb").write(bytes(data))


def truncate(url, path, shard):
    f = stored_object(url, path, shard)
    os.truncate(f, os.path.getsize(f) // 2)


DAMAGE = {
    "bit flip in a teacher object": (lambda u: flip_byte(u, "teachers/r8/top1_logp", 1), ["s000001.teacher.r8.0-2"]),
    "bit flip in samples/label": (lambda u: flip_byte(u, "samples/label", 0), ["s000000.samples"]),
    "truncated object": (lambda u: truncate(u, "teachers/r8/topk_idx", 2), ["s000002.teacher.r8.0-2"]),
    "deleted teacher object": (lambda u: os.remove(stored_object(u, "teachers/r8/top1_logp", 0)),
                               ["s000000.teacher.r8.0-2"]),
    "deleted samples/status chunk": (lambda u: os.remove(stored_object(u, "samples/status", 1)), ["s000001.samples"]),
    "object swapped between shards": (lambda u: swap_objects(u, "teachers/r8/topk_dlogp", 0, 1),
                                      ["s000000.teacher.r8.0-2", "s000001.teacher.r8.0-2"]),
    "chunks swapped between views inside an object": (
        lambda u: swap_views_in_object(u, "teachers/r8/label_logp", 2, 0, 1), ["s000002.teacher.r8.0-2"]),
    "view params swapped between shards": (lambda u: swap_objects(u, "views/params", 0, 1),
                                           ["s000000.views.0-2", "s000001.views.0-2"]),
}


def student(tiny_data, cache, out, **kw):
    return DistillConfig(data=tiny_data["train"].pattern, out=str(out), student="cifar_resnet8", loss="pld",
                         cache=cache, epochs=1, batch_size=8, workers=0, device="cpu", **kw)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_data_is_reported_and_refused(tiny_data, reference, tmp_path, case):
    damage, units = DAMAGE[case]
    url = str(tmp_path / "c.zarr")
    shutil.copytree(reference[0], url)
    damage(url)
    report = verify_cache(url)  # reports, never aborts
    assert report.damaged == units and report.problems, report.problems
    assert "rerun the `pld cache-teacher` command" in report.fix
    with pytest.raises(CacheError, match=rf"unit ({'|'.join(units)}) is damaged: .*Nothing was trained on it"):
        distill(student(tiny_data, url, tmp_path / "run"))


def test_a_rerun_repairs_every_kind_of_damage_at_once(tiny_data, teacher_ckpt, reference, tmp_path):
    """All the damage above in one cache (distinct chunk files): one rerun finds and rewrites exactly those units."""
    url = str(tmp_path / "c.zarr")
    shutil.copytree(reference[0], url)
    for damage, _ in DAMAGE.values():
        damage(url)
    units = sorted({u for _, us in DAMAGE.values() for u in us})
    assert verify_cache(url).damaged == units
    rerun = cli_here(*cache_args(tiny_data, teacher_ckpt, url))
    assert rerun.returncode == 0, rerun.stderr
    assert f"repaired {len(units)} damaged unit(s): {', '.join(units)}" in rerun.stdout
    assert verify_cache(url).ok
    assert_same_cache(reference[0], url)


def edit_meta(url, edit):
    path = os.path.join(url, "zarr.json")
    doc = json.load(open(path))
    edit(doc["attributes"]["pld_cache"])
    json.dump(doc, open(path, "w"))


METADATA = {
    "num_classes 10 -> 100": (lambda m: m.update(num_classes=100), {}, 9),
    "temperature grid reordered": (lambda m: m["teachers"]["r8"].update(temperatures=[2.0, 1.0, 4.0]),
                                   {"temperature": 2.0}, 3),
    "a shard's sha256 changed": (lambda m: m["shards"][1].update(sha256="0" * 64), {}, 3),
    "class names edited": (lambda m: m.update(class_names=[f"cat{i}" for i in range(10)]), {}, 9),
}


@pytest.mark.parametrize("case", list(METADATA))
def test_edited_root_metadata_is_caught_by_every_reader_and_never_laundered(tiny_data, teacher_ckpt, reference,
                                                                          tmp_path, case):
    edit, distill_kw, n_units = METADATA[case]
    url = str(tmp_path / "c.zarr")
    shutil.copytree(reference[0], url)
    edit_meta(url, edit)
    report = verify_cache(url)
    assert len(report.damaged) == n_units, report.problems
    assert all("other root metadata" in p for p in report.problems)
    with pytest.raises(CacheError, match="is damaged: its marker was written under other root metadata"):
        distill(student(tiny_data, url, tmp_path / "run", **distill_kw))
    rerun = cli_here(*cache_args(tiny_data, teacher_ckpt, url))
    assert rerun.returncode != 0 and "Traceback" not in rerun.stderr
    assert "edited after writing" in rerun.stderr or "different num_classes" in rerun.stderr, rerun.stderr


# -- a shard edited where the cheap whole-shard check cannot see ---------------------------------------------
def test_a_shard_edited_in_the_middle_is_refused_naming_the_sample(tmp_path, teacher_ckpt):
    """Shards larger than 2 MiB: the quick hash (size, first and last MiB) cannot see a same-size edit in the
    middle; the per-sample content digest does."""
    path = big_shard(tmp_path / "big-000000.tar")
    cache = str(tmp_path / "c.zarr")
    cache_teacher(CacheTeacherConfig(data=str(path), out=cache, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
                                     views=2, size=16, k=4, num_classes=NUM_CLASSES, workers=0, device="cpu"))
    raw = bytearray(path.read_bytes())
    assert len(raw) > 3 * 2**20
    middle = raw.index(b"k3.bin") + 512 + 300_000  # inside sample k3's payload, > 1 MiB from both ends
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="Sample 'k3' of .* is not the sample cached under that key"):
        distill(DistillConfig(data=str(path), out=str(tmp_path / "run"), student="cifar_resnet8", loss="pld",
                              cache=cache, epochs=1, batch_size=2, workers=0, device="cpu"))
    with pytest.raises(Exception, match="Sample 'k3' of .* differs from the one already cached"):
        cache_teacher(CacheTeacherConfig(data=str(path), out=cache, views=3, size=16, k=4, num_classes=NUM_CLASSES,
                                         teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")], workers=0,
                                         device="cpu"))


# -- misconfigured teachers and bad input ----------------------------------------------------------------
def test_a_teacher_that_declares_no_preprocessing_is_refused_naming_the_options(tiny_data, tmp_path):
    base = dict(data=tiny_data["train"].pattern, out=str(tmp_path / "c.zarr"), num_classes=NUM_CLASSES, workers=0,
                device="cpu")
    with pytest.raises(ValueError, match=r"does not declare .*pass --size and --mean and --std"):
        cache_teacher(CacheTeacherConfig(teachers=[TeacherSpec("fake_models:tiny_mlp")], **base))
    with pytest.raises(ValueError, match=r"pass --mean and --std as it was trained"):
        cache_teacher(CacheTeacherConfig(teachers=[TeacherSpec("fake_models:tiny_mlp")], size=16, **base))
    assert not os.path.exists(base["out"])  # refused before anything was written


def test_a_near_chance_teacher_is_flagged_in_the_summary_inspect_and_verify(reference):
    url, summary = reference
    assert summary["teacher_accuracy"]["r8"] < 0.19
    # verify recomputes it from the data it checks; inspect sums the markers' counts: all three agree
    assert verify_cache(url).teacher_accuracy == summary["teacher_accuracy"]
    assert inspect_cache(url)["teachers"]["r8"]["accuracy_on_cached_views"] == summary["teacher_accuracy"]["r8"]
    for warnings in (summary["warnings"], inspect_cache(url)["warnings"], verify_cache(url).warnings):
        assert len(warnings) == 1 and "teacher 'r8' is near chance" in warnings[0] and "--size, --mean, --std" in warnings[0]


def test_near_chance_means_within_a_tenth_of_the_way_from_chance_to_perfect():
    from pld_pipeline.cache.format import near_chance
    assert near_chance(0.1085, 10) and near_chance(0.18, 10) and not near_chance(0.20, 10)
    assert not near_chance(0.8215, 10) and not near_chance(None, 10)  # the misconfigured / right teacher
    assert near_chance(0.05, 1000) and not near_chance(0.2, 1000) and not near_chance(0.6, 2)


def _bad_label_shards(tmp_path):
    images, _ = make_images(4)
    return write_split(((f"b{i}", encode_png(images[i]), "png", 99 if i == 2 else 1) for i in range(4)),
                       str(tmp_path / "bad"), "bad", 100).pattern


def _undecodable_shards(tmp_path):
    images, _ = make_images(4)
    return write_split(((f"b{i}", b"not a jpeg" if i == 1 else encode_png(images[i]), "jpg" if i == 1 else "png", 1)
                        for i in range(4)), str(tmp_path / "bad"), "bad", 100).pattern


@pytest.mark.parametrize("make, message", [
    (_bad_label_shards, r"^error: Label 99 of sample 'b2' of shard .* is outside \[0, 10\); check --num-classes"),
    (_undecodable_shards, r"^error: Cannot decode image of sample 'b1' in shard .*--on-bad-sample skip\.$"),
])
def test_errors_inside_dataloader_workers_reach_the_user_as_one_line(tmp_path, teacher_ckpt, make, message):
    run = cli("cache-teacher", "--data", make(tmp_path), "--teacher", "cifar_resnet8", "--teacher-checkpoint",
              teacher_ckpt, "--size", "16", "--num-classes", "10", "--workers", "1", "--device", "cpu", "--quiet",
              "--out", str(tmp_path / "c.zarr"))
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Caught" not in run.stderr, run.stderr
    assert __import__("re").match(message, lines[0]), lines[0]


def test_out_on_a_regular_file_and_non_positive_temperatures_are_one_line_errors(tiny_data, cache, teacher_ckpt, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is an existing file; a cache is a directory"):
        cache_teacher(CacheTeacherConfig(data=tiny_data["train"].pattern, out=str(f), workers=0, device="cpu",
                                         teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt)], size=16))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.jpg").write_bytes(b"x")
    for overwrite in (False, True):
        with pytest.raises(CacheError, match="is a folder with other files in it, not a cache"):
            cache_teacher(CacheTeacherConfig(data=tiny_data["train"].pattern, out=str(folder), workers=0, device="cpu",
                                             teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt)], size=16,
                                             overwrite=overwrite))
    assert (folder / "keep.jpg").read_bytes() == b"x"
    with pytest.raises(ValueError, match="is an existing file; a run directory is a folder"):
        distill(student(tiny_data, cache, f))
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="--temperature must be positive"):
            distill(student(tiny_data, cache, tmp_path / "run", temperature=t))
    assert f.read_text() == "x"
