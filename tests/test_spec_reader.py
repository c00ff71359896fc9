"""tests/spec_reader.py (written from docs/cache-format.md alone, no listing) held against real caches: it reads
what pld_pipeline reads, and refuses what pld_pipeline refuses."""
import json
import os
import shutil

import numpy as np
import pytest

from pld_pipeline.cache import Cache, CacheError
from spec_reader import Refused, SpecReader
from conftest import stored_object, swap_objects, swap_views_in_object
from test_cache import SHARD_SIZES, filled, request, teacher_record, write_shard


def assert_reads_alike(url, tids):
    spec, ours = SpecReader(url), Cache(url)
    assert spec.digest() == ours.digest()  # "Cache digest": the page alone gives the same string
    for tid in tids:
        for tau in ours.teacher(tid).temperatures:
            for s in range(len(ours.shards)):
                got, want = spec.shard(s, tid, tau), ours.read(s, tid, tau)
                assert got["keys"] == want.keys
                for field in ("labels", "status", "digests", "params", "topk_idx"):
                    np.testing.assert_array_equal(got[field], getattr(want, field))
                p = np.exp(want.topk_logp.astype(np.float64) / tau - want.logz[..., None])
                np.testing.assert_allclose(got["topk_p"], p, rtol=1e-6, atol=1e-12)
                np.testing.assert_allclose(got["label_p"], np.exp(want.label_logp / tau - want.logz), rtol=1e-6)
                assert (got["tail"][got["status"] == 1] >= 0).all()
    if ours.key_index_state() == "current":
        for key, (shard, row) in ours.key_index().items():
            assert spec.find(key) == shard * ours.meta.rows_per_shard + row
        assert spec.find("no-such-key") is None


def test_the_spec_reader_reads_a_real_cache_teacher_cache(cache):
    """cifar recipe, top-k, padded last shard, key index."""
    assert Cache(cache).key_index_state() == "current"
    assert_reads_alike(cache, ["r14"])


def test_the_spec_reader_reads_extended_full_and_two_teacher_caches(tmp_path):
    url = str(tmp_path / "c.zarr")
    w = filled(url, teachers=(teacher_record("t1"), teacher_record("t2", k=10, temps=(0.5, 1.0, 4.0))))  # t2: full
    w = Cache.create_or_extend(url, request(4, (teacher_record("t1"), teacher_record("t2", k=10, temps=(0.5, 1.0, 4.0)))))
    for s in range(len(SHARD_SIZES)):  # views 2-3 added later: their units sit beside the first ones
        write_shard(w, s, views=(2, 4), teachers=("t1", "t2"))
    assert_reads_alike(url, ["t1", "t2"])


def test_the_spec_reader_reads_a_mixed_cache_with_a_skipped_sample(teacher_ckpt, tmp_path):
    """Format v3 (CutMix/Mixup: 17 integers per view), full logits, and an undecodable sample stored as skipped."""
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    from pld_pipeline.shards import encode_png, write_split
    from pld_pipeline.views import MixRecipe
    from conftest import NUM_CLASSES, make_images
    images, labels = make_images(24, seed=3)
    data = write_split(((f"m{i:03d}", b"not a png" if i == 5 else encode_png(images[i]), "png", int(labels[i]))
                        for i in range(24)), str(tmp_path / "d"), "train", 12).pattern
    url = str(tmp_path / "m.zarr")
    cache_teacher(CacheTeacherConfig(
        data=data, out=url, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")], views=3, size=16, k=None,
        temperatures=(1.0, 2.0), batch_size=16, workers=0, num_classes=NUM_CLASSES, device="cpu",
        on_bad_sample="skip", recipe_overrides={"pad": 2, "mix": MixRecipe("both", prob=0.8).to_dict()}))
    spec = SpecReader(url)
    assert spec.meta["version"] == 3 and spec.shard(0, "r8")["params"].shape[-1] == 17
    assert (spec.shard(0, "r8")["status"] == 2).sum() == 1
    assert_reads_alike(url, ["r8"])


DAMAGE = {
    "object swapped between shards": lambda u: swap_objects(u, "teachers/r14/topk_dlogp", 0, 1),
    "chunks swapped between views": lambda u: swap_views_in_object(u, "teachers/r14/label_logp", 0, 0, 1),
    "deleted object": lambda u: os.remove(stored_object(u, "teachers/r14/top1_logp", 0)),
    "temperature grid reordered": lambda u: _edit_root(u, lambda m: m["teachers"]["r14"].update(temperatures=[2.0, 1.0])),
}


def _edit_root(url, edit):
    path = os.path.join(url, "zarr.json")
    doc = json.load(open(path))
    edit(doc["attributes"]["pld_cache"])
    json.dump(doc, open(path, "w"))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_the_spec_reader_refuses_what_pld_pipeline_refuses(cache, tmp_path, case):
    url = str(tmp_path / "c.zarr")
    shutil.copytree(cache, url)
    DAMAGE[case](url)
    with pytest.raises(CacheError, match="s000000.teacher.r14.0-4 is damaged"):
        Cache(url).read(0, "r14")
    with pytest.raises(Refused, match="s000000.teacher.r14.0-4"):
        SpecReader(url).shard(0, "r14")
