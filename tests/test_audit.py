"""`pld verify --audit`: the teacher re-run on cached views agrees with an honest cache and exposes forged ones
(targets from another checkpoint, from bf16 while fp32 is recorded, from another normalisation, or edited and
re-signed with valid checksums), naming the keys."""
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pld_pipeline.cache_teacher as CT
from pld_pipeline.audit import TOLERANCE, audit_cache
from pld_pipeline.cache import Cache, CacheError, SampleStatus, TeacherBlock, verify_cache
from pld_pipeline.cache import schema
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
from pld_pipeline.models import file_sha256, load_state_dict
from pld_pipeline.views import normalize
from pld_pipeline_cli.app import app

from conftest import NUM_CLASSES

ALL = 10_000  # more than the session cache's 40 samples x 4 views: every view is audited


def _build(tiny_data, ckpt, url, source="cifar_resnet14", tid="r14", **kw):
    """The session `cache` fixture's settings (conftest.py), so an honest build would be identical to it."""
    cache_teacher(CacheTeacherConfig(
        data=tiny_data["train"].pattern, out=url, teachers=[TeacherSpec(source, ckpt, tid)], views=4, size=16, k=5,
        temperatures=(1.0, 2.0), batch_size=16, workers=0, device="cpu", num_classes=NUM_CLASSES,
        recipe_overrides={"pad": 2, **kw}))
    return url


def _audit(url, tiny_data, ckpt, source="cifar_resnet14", n=ALL):
    return audit_cache(url, tiny_data["train"].pattern, source, checkpoint=ckpt, n=n, seed=0, device="cpu")


def test_an_honest_cache_passes_every_view(cache, tiny_data, teacher_run):
    report = _audit(cache, tiny_data, teacher_run)
    s = report.summary()
    assert report.ok and s["views"] == 40 * 4 and s["failed"] == 0 and s["top1_agreement"] == 1.0
    assert report.weights == {"recorded_sha256": file_sha256(teacher_run), "given_sha256": file_sha256(teacher_run),
                              "match": True}
    assert max(s["max_logp_diff"], s["max_label_logp_diff"], s["max_logz_diff"]) < 1e-4
    assert report.preprocessing["mean"] == Cache(cache).teacher("r14").preprocessing["mean"]
    # seeded: the same draw twice, another seed another draw
    keys = lambda r: [(v.key, v.view) for v in r.views]  # noqa: E731
    a, b, c = (audit_cache(cache, tiny_data["train"].pattern, "cifar_resnet14", checkpoint=teacher_run, n=12,
                           seed=seed, device="cpu") for seed in (3, 3, 4))
    assert keys(a) == keys(b) != keys(c) and len(keys(a)) == 12


def test_mixed_views_are_audited_too(tiny_data, teacher_ckpt, tmp_path):
    from test_mix import MIX
    url = _build(tiny_data, teacher_ckpt, str(tmp_path / "m.zarr"), "cifar_resnet8", "r8", mix=MIX.to_dict())
    report = _audit(url, tiny_data, teacher_ckpt, "cifar_resnet8")
    assert report.ok and report.summary()["mixed"] > 40, report.summary()


def _other_checkpoint(teacher_run, tmp_path):
    """The same architecture with other weights (as the non-EMA weights or another epoch would be)."""
    from safetensors.torch import save_file
    state = load_state_dict(teacher_run)
    torch.manual_seed(0)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    path = str(tmp_path / "other.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("forgery", ["other checkpoint", "bf16 recorded as fp32", "another normalisation"])
def test_a_forged_cache_fails_naming_keys(forgery, cache, tiny_data, teacher_run, tmp_path, monkeypatch):
    ckpt = teacher_run
    if forgery == "other checkpoint":  # ... while the record claims the honest weights' sha256
        ckpt = _other_checkpoint(teacher_run, tmp_path)
        monkeypatch.setattr(CT, "file_sha256", lambda path: file_sha256(teacher_run))
    elif forgery == "bf16 recorded as fp32":
        monkeypatch.setattr(CT, "nullcontext", lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    else:
        monkeypatch.setattr(CT, "normalize", lambda x, mean, std: normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    url = _build(tiny_data, ckpt, str(tmp_path / "forged.zarr"))
    monkeypatch.undo()
    assert verify_cache(url).ok  # every checksum and binding is fine: only the audit can tell
    assert Cache(url).teacher("r14").identity() == Cache(cache).teacher("r14").identity()  # the same record
    report = _audit(url, tiny_data, teacher_run, n=40)
    failed = {v.key for v in report.views if not v.ok}
    assert not report.ok and len(failed) >= 10, report.summary()
    assert report.weights["match"] is True  # the record's claim: the outputs expose it
    assert failed <= set(schema.decode_keys(Cache(url).samples(0)[schema.KEY.path()])) | {
        k for s in (1, 2) for k in schema.decode_keys(Cache(url).samples(s)[schema.KEY.path()])}
    if forgery == "bf16 recorded as fp32":  # within the tolerance a bf16 record would have had
        assert report.summary()["max_logp_diff"] < TOLERANCE["bf16"] < 1 and report.summary()["max_logp_diff"] > TOLERANCE["fp32"]


def _resign(url, shard, edit):
    """Edit one teacher unit's arrays and write it back through the cache's own writer: new checksums, new
    marker, a cache that verifies (what a dishonest or buggy writer produces)."""
    c = Cache(url, mode="r+")
    unit = next(u for u in c.units(shard, "teacher", "r14"))
    arrays = schema.decode_teacher(c.read_unit(unit), "r14")
    n = c.meta.shards[shard].nsamples
    arrays = {k: v[:n].copy() for k, v in arrays.items()}
    edit(arrays, c.samples(shard)[schema.LABEL.path()])
    marker = c.marker(unit)
    samples = c.samples(shard)
    ok = samples[schema.STATUS.path()] == SampleStatus.OK
    correct = int((arrays["topk_idx"][ok][..., 0] == samples[schema.LABEL.path()][ok][:, None]).sum())  # as written
    c.write_teacher(shard, "r14", unit.views, TeacherBlock(arrays["topk_idx"], arrays["topk_logp"],
                                                           arrays["label_logp"], arrays["logz"],
                                                           correct, marker["count"]))
    return schema.decode_keys(c.samples(shard)[schema.KEY.path()])


def test_an_edited_and_resigned_cache_fails_on_exactly_the_edited_views(cache, tiny_data, teacher_run, tmp_path):
    url = str(tmp_path / "edited.zarr")
    shutil.copytree(cache, url)

    def edit(a, labels):  # each edit keeps the unit's values consistent: `pld verify` cannot see it
        idx, logp = a["topk_idx"], a["topk_logp"]
        idx[0:4, 0, [0, 1]] = idx[0:4, 0, [1, 0]]  # rows 0-3, view 0: the top-2 classes swapped
        logp[4:7, 1] -= 0.05  # rows 4-6, view 1: every cached class made less likely
        for r in range(7):  # the label's log-prob follows its top-k entry, as verify requires
            for v in (0, 1):
                hit = np.flatnonzero(idx[r, v] == labels[r])
                if hit.size:
                    a["label_logp"][r, v] = logp[r, v, hit[0]]
        a["logz"][7:9, 2, 1] -= 0.05  # rows 7-8, view 2: the T=2 log-partition
    keys = _resign(url, 0, edit)
    assert verify_cache(url).ok
    report = _audit(url, tiny_data, teacher_run)
    failed = {(v.key, v.view) for v in report.views if not v.ok}
    assert failed == {(keys[r], 0) for r in range(4)} | {(keys[r], 1) for r in (4, 5, 6)} | {(keys[r], 2) for r in (7, 8)}
    assert {v.key for v in report.worst(9)} == {keys[r] for r in range(9)}


def _teacher_log_probs(url, tiny_data, ckpt, rows, view):
    """[len(rows), C] float64: the teacher's log-probs on ``view`` of each of shard 0's ``rows``, replayed from the
    shard with the cache's stored view parameters (the inputs cache-teacher fed it)."""
    from pld_pipeline.data import iter_shard, pick_field
    from pld_pipeline.models import load_model
    from pld_pipeline.views import ViewRecipe, decode_image, replay_mixed
    reader = Cache(url)
    recipe, rec = ViewRecipe.from_dict(reader.meta.recipe), reader.teacher("r14")
    params = reader.read(0, "r14").params
    images = [decode_image(pick_field(s, recipe.image_field)) for s in iter_shard(tiny_data["train"].shards[0])]
    x = torch.stack([replay_mixed(images[r], None, params[r, view], recipe) for r in rows])
    model = load_model("cifar_resnet14", num_classes=NUM_CLASSES, checkpoint=ckpt).eval()
    with torch.no_grad():
        logits = model(normalize(x, rec.preprocessing["mean"], rec.preprocessing["std"])).double()
    return torch.log_softmax(logits, dim=1).numpy()


def test_a_resigned_top_k_that_leaves_out_one_of_the_teachers_top_classes_fails(cache, tiny_data, teacher_run,
                                                                                 tmp_path):
    """Rows 0-3, view 0: the teacher's 2nd class dropped and its 6th moved in, every stored log-prob the
    teacher's own for its class, still descending, the label's log-prob untouched: each value agrees with the
    teacher, only the ranking does not (a writer that mis-sorts, or hides a class)."""
    url = str(tmp_path / "hidden.zarr")
    shutil.copytree(cache, url)
    rows = [0, 1, 2, 3]
    logp = _teacher_log_probs(url, tiny_data, teacher_run, rows, 0)
    order = np.argsort(-logp, axis=1, kind="stable")

    def hide_second(a, labels):
        for i, r in enumerate(rows):
            kept = np.delete(order[i, :6], 1)  # ranks 1, 3, 4, 5, 6
            a["topk_idx"][r, 0] = kept
            a["topk_logp"][r, 0] = logp[i, kept]
    keys = _resign(url, 0, hide_second)
    assert verify_cache(url).ok  # every value is consistent: only the teacher can tell
    report = _audit(url, tiny_data, teacher_run)
    failed = {(v.key, v.view) for v in report.views if not v.ok}
    assert failed == {(keys[r], 0) for r in rows}, report.summary()
    assert all(v.rank_mismatches >= 1 and v.max_logp_diff < TOLERANCE["fp32"] for v in report.views if not v.ok)


def test_cli_audit_table_json_and_exit_codes(cache, tiny_data, teacher_run, teacher_ckpt, tmp_path):
    runner = CliRunner()
    base = ["verify", cache, "--audit", "6", "--data", tiny_data["train"].pattern, "--teacher", "cifar_resnet14",
            "--device", "cpu"]
    ok = runner.invoke(app, base + ["--teacher-checkpoint", teacher_run])
    assert ok.exit_code == 0, ok.output
    assert "match the recorded ones" in ok.output and "worst views" in ok.output
    assert ok.output.strip().splitlines()[-1].startswith(  # ends with a verdict
        "audit passed: all 6 view(s) re-run by the teacher match the cache within tolerance")
    other = _other_checkpoint(teacher_run, tmp_path)
    bad = runner.invoke(app, base + ["--teacher-checkpoint", other, "--json"])
    assert bad.exit_code == 1, bad.output
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["weights"]["match"] is False and doc["summary"]["failed"] == 6
    assert doc["weights"]["given_sha256"] == file_sha256(other) != doc["weights"]["recorded_sha256"]
    missing = runner.invoke(app, ["verify", cache, "--audit", "6", "--teacher", "cifar_resnet14"])
    assert missing.exit_code == 2 and "--audit needs --data" in missing.output
    val = runner.invoke(app, ["verify", cache, "--audit", "6", "--data", tiny_data["val"].pattern, "--teacher",
                              "cifar_resnet14", "--teacher-checkpoint", teacher_run, "--device", "cpu"])
    assert val.exit_code == 2 and "is not one of the shards" in val.output and "Traceback" not in val.output


def test_a_cache_that_does_not_record_the_normalisation_is_refused_not_guessed(cache, tiny_data, teacher_run, tmp_path):
    url = str(tmp_path / "no_mean.zarr")
    shutil.copytree(cache, url)
    doc = json.loads((tmp_path / "no_mean.zarr" / "zarr.json").read_text())
    doc["attributes"]["pld_cache"]["teachers"]["r14"]["preprocessing"]["mean"] = None
    (tmp_path / "no_mean.zarr" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="does not record teacher 'r14''s normalisation"):
        _audit(url, tiny_data, teacher_run, n=4)


@pytest.fixture(scope="module")
def shifted_bf16(cache, tmp_path_factory):
    """The session cache with logz shifted by 0.14 nats in every view, re-signed, and relabelled "bf16": its top-k
    still agree with the teacher to fp32 precision."""
    from test_hostile_cache import edit_meta, resign
    url = str(tmp_path_factory.mktemp("shifted") / "c.zarr")
    shutil.copytree(cache, url)
    for shard in range(len(Cache(url).meta.shards)):
        _resign(url, shard, lambda a, labels: a["logz"].__iadd__(0.14))
    edit_meta(url, lambda m: [t.update(precision="bf16") for t in m["teachers"].values()])
    resign(url)
    assert verify_cache(url).ok and Cache(url).teacher("r14").precision == "bf16"
    return url


def test_the_audit_tolerance_is_the_auditors_not_the_caches(shifted_bf16, tiny_data, teacher_run):
    """A re-signed cache relabelled "bf16" used to get bf16's tolerance and pass; the default is strict."""
    report = _audit(shifted_bf16, tiny_data, teacher_run, n=40)
    assert report.tolerance == TOLERANCE["fp32"] and not report.ok
    assert all(v.logz_diff > 0.13 for v in report.views) and report.summary()["max_logp_diff"] < 1e-3


def test_a_precision_record_the_agreement_contradicts_fails_even_at_a_wide_tolerance(shifted_bf16, tiny_data,
                                                                                      teacher_run):
    report = audit_cache(shifted_bf16, tiny_data["train"].pattern, "cifar_resnet14", checkpoint=teacher_run, n=40,
                         device="cpu", tolerance="bf16")
    assert report.tolerance == TOLERANCE["bf16"] and all(v.ok for v in report.views)  # within bf16's tolerance...
    assert not report.ok and "records precision bf16" in report.contradiction()  # ... but no precision explains it
    code = CliRunner().invoke(app, ["verify", shifted_bf16, "--audit", "40", "--data", tiny_data["train"].pattern,
                                    "--teacher", "cifar_resnet14", "--teacher-checkpoint", teacher_run,
                                    "--device", "cpu", "--tolerance", "0.2"]).exit_code
    assert code == 1


def test_an_honest_cache_passes_at_any_tolerance_the_auditor_picks(cache, tiny_data, teacher_run):
    for tolerance in (None, "bf16", 0.01):
        report = audit_cache(cache, tiny_data["train"].pattern, "cifar_resnet14", checkpoint=teacher_run, n=40,
                             device="cpu", tolerance=tolerance)
        assert report.ok and report.contradiction() is None, (tolerance, report.summary())
    with pytest.raises(ValueError, match="--tolerance 'loose' must be a positive number or one of fp32, bf16"):
        audit_cache(cache, tiny_data["train"].pattern, "cifar_resnet14", checkpoint=teacher_run, tolerance="loose")
