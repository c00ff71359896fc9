"""Mixed views (CutMix/Mixup): drawn once, cached with the teacher's outputs on the mixed image, replayed exactly."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pld_pipeline.cache import Cache, verify_cache
from pld_pipeline.cache import format as fmt
from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, _ViewItems, cache_teacher
from pld_pipeline.losses import MixedLabels, TeacherTargets, create_loss, kd_loss
from pld_pipeline.models import load_model, preprocessing_of
from pld_pipeline.student_data import ShardRange, TrainSamples, TrainShard, choose_view
from pld_pipeline.views import (
    KIND_CUTMIX, KIND_MIXUP, KIND_PLAIN, LAMBDA_ONE, MixRecipe, ViewRecipe, first_labels, mix_draw,
    ViewError, normalize, replay_mixed,
)

from conftest import NUM_CLASSES

MIX = MixRecipe(mode="both", prob=0.75, window=8)


@pytest.fixture(scope="module")
def mixed_cache(tiny_data, teacher_ckpt, tmp_path_factory):
    """Full logits (k = C) of a random teacher on 4 views per sample, 3/4 of them mixed."""
    url = str(tmp_path_factory.mktemp("mix") / "m.zarr")
    cache_teacher(CacheTeacherConfig(
        data=tiny_data["train"].pattern, out=url, teachers=[TeacherSpec("cifar_resnet8", teacher_ckpt, "r8")],
        views=4, size=16, k=None, temperatures=(1.0, 2.0), batch_size=16, workers=0, num_classes=NUM_CLASSES,
        device="cpu", recipe_overrides={"pad": 2, "mix": MIX.to_dict()}))
    return url


def test_the_mix_draw_follows_timm_and_is_stable():
    draws = [tuple(mix_draw(MIX, 0, f"k{i}", v, row=20, size=16)) for i in range(200) for v in range(2)]
    assert draws == [tuple(mix_draw(MIX, 0, f"k{i}", v, row=20, size=16)) for i in range(200) for v in range(2)]
    kinds = np.array([d[0] for d in draws])
    assert 0.6 < (kinds != KIND_PLAIN).mean() < 0.9 and (kinds == KIND_MIXUP).any() and (kinds == KIND_CUTMIX).any()
    for kind, partner, lam, top, left, h, w in draws:
        if kind == KIND_PLAIN:
            assert (partner, lam) == (-1, LAMBDA_ONE)
            continue
        assert 20 - MIX.window <= partner < 20 and 0 <= lam <= LAMBDA_ONE
        if kind == KIND_CUTMIX:  # lambda is what the pasted box leaves (timm's correct_lam)
            assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 16
            assert lam == round((1 - h * w / 256) * LAMBDA_ONE)
    assert mix_draw(MIX, 0, "k0", 0, row=0, size=16)[0] == KIND_PLAIN  # the first row has no partner
    with pytest.raises(ValueError, match="Unsupported --mix 'cutout'"):
        MixRecipe(mode="cutout")


def test_replay_is_integer_exact_mixup_and_cutmix():
    recipe = ViewRecipe("cifar", size=8, pad=0, flip=False)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2))
    own = [0, 0, 8, 8, 0]
    lam = int(0.3 * LAMBDA_ONE)
    mixup = np.array([*own, KIND_MIXUP, 0, *own, lam, 0, 0, 0, 0], np.int32)
    got = replay_mixed(a, b, mixup, recipe)
    want = a.double() * lam / LAMBDA_ONE + b.double() * (1 - lam / LAMBDA_ONE)
    assert got.dtype == torch.uint8 and (got.double() - want).abs().max() <= 0.5
    cutmix = np.array([*own, KIND_CUTMIX, 0, *own, LAMBDA_ONE - 6 * LAMBDA_ONE // 64, 2, 3, 2, 3], np.int32)
    got = replay_mixed(a, b, cutmix, recipe)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:4, 3:6] = True
    assert torch.equal(got[:, inside], b[:, inside]) and torch.equal(got[:, ~inside], a[:, ~inside])
    with pytest.raises(ValueError, match="needs its partner's decoded image"):
        replay_mixed(a, None, cutmix, recipe)
    # what no writer draws is refused before any pixel is touched (a re-signed cache can store anything)
    hostile = {"lambda 2^31 (the int32 blend would wrap)": (12, 2**31 - 1, "lambda 2147483647 outside"),
               "kind 7": (5, 7, "mixing kind 7"),
               "CutMix box past the view": (15, 9, r"CutMix box 9x3 at \(2, 3\) outside the 8x8 view"),
               "partner box 10^5 wide": (10, 10**5, r"a 8x100000 box where the cifar recipe crops 8x8")}
    for name, (field, value, what) in hostile.items():
        bad = cutmix.copy()
        bad[field] = value
        with pytest.raises(ViewError, match=what):
            replay_mixed(a, b, bad, recipe)


def _teacher_inputs(url, tiny_data):
    """(shard, row, view) -> the uint8 image cache-teacher fed its teacher, from its own dataset."""
    reader = Cache(url)
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    from pld_pipeline.cache_teacher import _Job
    jobs = [_Job(s, u, n, list(range(4)), False, [], {}) for s, (u, n) in
            enumerate(zip(tiny_data["train"].shards, (16, 16, 8)))]
    cfg = CacheTeacherConfig(data="", out="", teachers=[], num_classes=NUM_CLASSES)
    items = _ViewItems(jobs, recipe, 0, cfg, NUM_CLASSES, {})
    return {(s, i, v): (image, first) for s, i, v, _, _, first, _, image, _, _ in items}


def test_student_replay_equals_the_teachers_input_and_targets_equal_a_direct_forward(mixed_cache, tiny_data,
                                                                                     teacher_ckpt):
    reader = Cache(mixed_cache)
    assert reader.meta.version == fmt.MIXED_FORMAT_VERSION and reader.meta.params_width == 17
    assert verify_cache(mixed_cache).ok
    seen = _teacher_inputs(mixed_cache, tiny_data)
    teacher = load_model("cifar_resnet8", checkpoint=teacher_ckpt).eval()
    prep = preprocessing_of(teacher)
    recipe = ViewRecipe.from_dict(reader.meta.recipe)
    shards = [TrainShard(u, n, i) for i, (u, n) in enumerate(zip(tiny_data["train"].shards, (16, 16, 8)))]
    kinds = []
    for epoch in range(4):  # rotate: every sample's every view once
        ds = TrainSamples(shards, recipe=recipe, seed=0, rank=0, world=1, cache_url=mixed_cache, teachers=["r8"],
                          num_views=4, shuffle_buffer=1)
        ds.set_epoch(epoch)
        for shard in shards:
            block = reader.read(shard.cache_shard, "r8")
            firsts = first_labels(block.params, block.labels)
            for row, item in enumerate(ds._samples(ShardRange(shard, 0, shard.nsamples))):
                v = choose_view("rotate", 0, item["__key__"], epoch, 4)
                image, first = seen[(shard.cache_shard, row, v)]
                assert torch.equal(item["image"], image)  # bit for bit, mixed or not
                params = block.params[row, v]
                kinds.append(int(params[5]))
                assert first == firsts[row, v] and item["label"] == block.labels[row]
                if params[5] != KIND_PLAIN:
                    assert item["label2"] == block.labels[params[6]] and item["lam"] == params[12] / LAMBDA_ONE
                with torch.no_grad():
                    logits = teacher(normalize(image[None], prep["mean"], prep["std"]))
                want = TeacherTargets.from_logits(logits, torch.tensor([first]), temperature=1.0)
                np.testing.assert_array_equal(item["topk_idx"][0], want.topk_idx[0].numpy())
                np.testing.assert_allclose(item["topk_logp"][0], want.topk_logp[0].numpy(), atol=2e-3, rtol=1e-3)
                np.testing.assert_allclose(item["label_logp"][0], want.label_logp[0].item(), atol=2e-3, rtol=1e-3)
    kinds = np.array(kinds)
    assert (kinds == KIND_MIXUP).any() and (kinds == KIND_CUTMIX).any() and (kinds == KIND_PLAIN).any()


def test_mixed_labels_in_the_losses():
    torch.manual_seed(0)
    s = torch.randn(6, NUM_CLASSES, requires_grad=True)
    t = torch.randn(6, NUM_CLASSES) * 3
    y, y2 = torch.randint(0, NUM_CLASSES, (6,)), torch.randint(0, NUM_CLASSES, (6,))
    lam = torch.tensor([1.0, 0.7, 0.5, 0.3, 0.0, 0.9])
    mix = MixedLabels(y2, lam)
    ce = create_loss("ce")(s, y, None, mix)
    log_q = torch.log_softmax(s, 1)
    want = -(lam * log_q.gather(1, y[:, None])[:, 0] + (1 - lam) * log_q.gather(1, y2[:, None])[:, 0]).mean()
    torch.testing.assert_close(ce, want)
    first = mix.dominant(y)
    assert first.tolist() == [int(a if w >= 0.5 else b) for a, b, w in zip(y, y2, lam)]
    targets = TeacherTargets.from_logits(t, first)
    kd = kd_loss(s, y, TeacherTargets.from_logits(t, y, temperature=2.0), mix=mix)
    plain_kd = kd_loss(s, y, TeacherTargets.from_logits(t, y, temperature=2.0))
    torch.testing.assert_close(kd - plain_kd, 0.1 * (ce - create_loss("ce")(s, y)))
    pld = create_loss("pld")
    torch.testing.assert_close(pld(s, y, targets, mix), pld(s, first, targets))  # dominant label first
    teacher_first = create_loss("pld", mixed_first="teacher")(s, y, targets, mix)
    top1 = t.argmax(1)
    mixed = lam < 1
    own = TeacherTargets.from_logits(t, torch.where(mixed, top1, y))
    torch.testing.assert_close(teacher_first, pld(s, torch.where(mixed, top1, y), own))
    with pytest.raises(ValueError, match="takes no parameter"):
        create_loss("kd", mixed_first="teacher")


def test_dist_on_mixed_views_gives_the_partner_label_its_share():
    """DIST's CE term on a mixed view is timm's mixed one-hot target: lam on the sample's own label, 1 - lam on
    its partner's; the relation terms do not see labels. Reference written out by hand (alpha 0.1, beta 0.45,
    gamma 0.45, T = 1)."""
    torch.manual_seed(1)
    s = torch.randn(6, NUM_CLASSES, dtype=torch.float64)
    t = torch.randn(6, NUM_CLASSES, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    y2 = torch.tensor([9, 8, 7, 6, 5, 4])  # every partner label differs from the sample's own
    lam = torch.tensor([0.3, 0.3, 0.3, 1.0, 0.3, 1.0], dtype=torch.float64)  # mixed views and plain ones
    got = create_loss("dist")(s, y, TeacherTargets.from_logits(t, y), MixedLabels(y2, lam))

    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    p_s, p_t = torch.softmax(s, 1), torch.softmax(t, 1)
    relation = 0.45 * (1 - pearson(p_s, p_t).mean()) + 0.45 * (1 - pearson(p_s.T, p_t.T).mean())
    log_q = torch.log_softmax(s, 1)
    ce = -(lam * log_q[torch.arange(6), y] + (1 - lam) * log_q[torch.arange(6), y2])
    torch.testing.assert_close(got, 0.1 * ce.mean() + relation)
    own_only = 0.1 * -log_q[torch.arange(6), y].mean() + relation
    assert abs(float(got - own_only)) > 1e-3  # the partner's share is a visible part of the loss


def test_distill_from_mixed_cached_views_equals_online_distillation_on_them(mixed_cache, tiny_data, teacher_ckpt,
                                                                           tmp_path):
    """Same seed, same mixed views: targets from the cache or from the teacher run on each step's replayed mixed
    images train the same student (up to the cache's float16 storage)."""
    from pld_pipeline.distill import DistillConfig, distill
    base = dict(data=tiny_data["train"].pattern, student="cifar_resnet8", loss="pld", cache=mixed_cache, epochs=2,
                batch_size=8, workers=0, device="cpu", opt="sgd", lr=0.05, warmup_epochs=0.0)
    distill(DistillConfig(out=str(tmp_path / "cached"), **base))
    distill(DistillConfig(out=str(tmp_path / "online"), online_teacher="cifar_resnet8",
                                   online_teacher_checkpoint=teacher_ckpt, **base))
    # Control: the same run with another (legitimate) target for the mixed views moves the weights this much.
    distill(DistillConfig(out=str(tmp_path / "control"), mixed_first="teacher", **base))
    a, b, c = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("cached", "online", "control"))
    gap = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    control = max(float((a[k].float() - c[k].float()).abs().max()) for k in a)
    assert gap < 1e-3 and gap < control / 20, (gap, control)
    losses = [[float(line.split(",")[1]) for line in open(tmp_path / run / "metrics.csv").read().splitlines()[1:]]
              for run in ("cached", "online")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


# -- what no honest writer stores in a mixed, full (k = C) cache is refused ------------------------------------
def _edited_copy(mixed_cache, tmp_path, path, edit):
    """A copy of the mixed cache with shard 0's region of the array at ``path`` edited through zarr (valid
    chunks) and every checksum re-signed: only a value check can tell."""
    import shutil
    import zarr
    from test_hostile_cache import resign
    url = str(tmp_path / "m.zarr")
    shutil.copytree(mixed_cache, url)
    arr = zarr.open_group(url, mode="r+")[path]
    region = np.asarray(arr[0:16])
    edit(region)
    arr[0:16] = region
    resign(url, arrays=True)
    return url


def test_a_full_cache_whose_logz_leaves_the_probabilities_short_of_1_is_refused(mixed_cache, tmp_path):
    """With k = C every class is stored, so the probabilities under logz sum to exactly 1: a larger logz (a
    sub-distribution, which a top-k cache may hold) is a forged or broken full cache."""
    def raise_logz(a):
        a[3, 1, 0] += 0.5  # row 3, view 1, T = 1: the ten probabilities now sum to e^-0.5
    url = _edited_copy(mixed_cache, tmp_path, "teachers/r8/logz", raise_logz)
    what = "a logz under which the stored probabilities do not sum to 1"
    assert any(f"{what} (view 1)" in p for p in verify_cache(url).problems)
    with pytest.raises(fmt.CacheError, match=fr"unit s000000.teacher.r8.0-4 is damaged: it holds {what} \(view 1\)"):
        Cache(url).read(0, "r8")


def test_verify_reports_a_mixed_view_whose_partner_is_its_own_row(mixed_cache, tmp_path):
    """A partner is an earlier usable row of the shard (the writer draws it from the window before the sample):
    a view mixed with itself is no view the writer made."""
    params = np.asarray(Cache(mixed_cache).read(0, "r8").params)
    row, view = next((r, v) for r in range(1, 16) for v in range(4) if params[r, v, 5] != KIND_PLAIN)

    def own_partner(a):
        a[row, view, 6] = row
    url = _edited_copy(mixed_cache, tmp_path, "views/params", own_partner)
    problems = verify_cache(url).problems
    assert any(p.startswith("s000000.views") and "1 mixed view(s) with a bad kind, partner" in p for p in problems), \
        problems
