"""Class maps (teacher classes -> the student's) against a brute-force float64 reference: full logits -> softmax at
T -> group sums -> renormalise -> the loss written out literally; values and gradients, top-k bounds, ensembles,
mixed views, one-line refusals, timm's label maps and a mapped run end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pld_pipeline.class_map import (
    ClassMapError, load_class_map, map_by_names, map_targets, out_of_map_mass, parse_class_map, timm_class_names,
    timm_index_map,
)
from pld_pipeline.losses import MixedLabels, TeacherTargets, create_loss
from pld_pipeline.student_data import batch_targets

C_T = 12
#: student class 0 <- teacher 3; 1 <- {0, 7, 9}; 2 <- 5; 3 <- {10, 1}: teacher classes 2, 4, 6, 8, 11 unmapped
GROUPS = [[3], [0, 7, 9], [5], [10, 1]]


def make(batch=6, seed=0, scale=2.5):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, C_T, generator=g, dtype=torch.float64) * scale
    s = torch.randn(batch, len(GROUPS), generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, len(GROUPS), (batch,), generator=g)
    return s, t, y


def brute_q(t, temperature, groups=GROUPS):
    """Exact student distribution: the teacher's softmax at T summed per group, renormalised over the mapped ones."""
    p = torch.softmax(t.double() / temperature, 1)
    m = torch.stack([p[:, g].sum(1) for g in groups], 1)
    return m / m.sum(1, keepdim=True), 1 - m.sum(1)  # and the out-of-map mass


def brute_head_pld(s, weights, head):
    """Sequential Plackett-Luce over the head (a list of classes, the label first): step k picks head[k] from every
    class not yet picked, weighted by its teacher probability. Differentiable in ``s``."""
    total = 0.0
    for k, c in enumerate(head):
        remaining = [j for j in range(s.shape[0]) if j not in head[:k]]
        total = total + weights[c] * (torch.logsumexp(s[remaining], 0) - s[c])
    return total


def student_ranking(q_row, label, k=None):
    rest = sorted((c for c in range(len(q_row)) if c != label), key=lambda c: (-float(q_row[c]), c))
    head = [label] + rest
    return head if k is None else head[:k + 1] if label not in rest[:k] else head


def brute_pld(s, q, y, k=None):
    out = []
    for b in range(s.shape[0]):
        head = student_ranking(q[b], int(y[b]))
        if k is not None:  # the top-k student classes by q (ties: lower index) after the label
            top = sorted(range(q.shape[1]), key=lambda c: (-float(q[b, c]), c))[:k]
            head = [int(y[b])] + [c for c in top if c != int(y[b])]
        out.append(brute_head_pld(s[b], q[b], head))
    return torch.stack(out)


def brute_kd(s, q, y, temperature, alpha=0.1):
    log_qs = torch.log_softmax(s / temperature, 1)
    kl = (q * (q.log() - log_qs)).sum(1)
    return alpha * F.cross_entropy(s, y, reduction="none") + (1 - alpha) * temperature ** 2 * kl


def brute_dist(s, q, y, temperature, alpha=0.1, beta=0.45, gamma=0.45):
    ys = torch.softmax(s / temperature, 1)

    def corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())

    relation = temperature ** 2 * (beta * (1 - corr(ys, q).mean()) + gamma * (1 - corr(ys.T, q.T).mean()))
    return alpha * F.cross_entropy(s, y) + relation


def value_and_grad(fn, s):
    x = s.clone().requires_grad_(True)
    v = fn(x)
    v.sum().backward()
    return v.detach(), x.grad


CMAP = parse_class_map(GROUPS, C_T)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_full_targets_are_the_renormalised_group_mass(temperature):
    s, t, y = make(seed=1)
    q, out = brute_q(t, temperature)
    tg = map_targets(TeacherTargets.from_logits(t, y, temperature=temperature), CMAP, y)
    assert (tg.num_classes, tg.k) == (4, 4)
    dense = torch.zeros_like(q).scatter(1, tg.topk_idx, tg.topk_log_probs().exp())
    torch.testing.assert_close(dense, q)
    torch.testing.assert_close(tg.label_log_prob().exp(), q.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(tg.tail_mass(), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    # ranked by q, not by the teacher's single best class of each group
    assert tg.topk_idx.tolist() == [sorted(range(4), key=lambda c: (-float(q[b, c]), c)) for b in range(6)]
    known, tail = out_of_map_mass(TeacherTargets.from_logits(t, y, temperature=temperature), CMAP)
    torch.testing.assert_close(known, out)
    assert float(out.min()) > 0.01 and float(tail.abs().max()) == 0.0


@pytest.mark.parametrize("loss", ["pld", "kd", "dist"])
def test_losses_on_mapped_targets_match_brute_force_values_and_gradients(loss):
    temperature = 2.0
    s, t, y = make(seed=2)
    q, _ = brute_q(t, temperature)
    tg = map_targets(TeacherTargets.from_logits(t, y, temperature=temperature), CMAP, y)
    ours = create_loss(loss)
    ref = {"pld": lambda x: brute_pld(x, q, y).mean(), "kd": lambda x: brute_kd(x, q, y, temperature).mean(),
           "dist": lambda x: brute_dist(x, q, y, temperature)}[loss]
    v, g = value_and_grad(lambda x: ours(x, y, tg), s)
    v_ref, g_ref = value_and_grad(ref, s)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(g, g_ref)
    # the label is ranked first: with a label whose group is not the teacher's favourite, PLD differs from the
    # ranking without it (a map that lost the label would not be caught by values that tie)
    assert loss != "pld" or any(int(y[b]) != int(q[b].argmax()) for b in range(6))


def test_float32_mapped_targets_match_float64():
    s, t, y = make(seed=3, scale=6.0)
    q, _ = brute_q(t, 1.0)
    tg = map_targets(TeacherTargets.from_logits(t.float(), y), CMAP, y)
    dense = torch.zeros_like(q).scatter(1, tg.topk_idx, tg.topk_log_probs().double().exp())
    torch.testing.assert_close(dense, q, atol=1e-6, rtol=1e-5)


def test_a_teacher_sure_of_an_unmapped_class_still_gives_the_exact_renormalised_mass():
    """The in-map mass is 1e-40 here: summed in probability space it underflows float32 to 0/0."""
    t = torch.zeros(1, C_T)
    t[0, 2] = 100.0  # unmapped
    t[0, 5] = 8.0  # student class 2
    t[0, 3] = 7.0  # student class 0
    y = torch.tensor([1])
    tg = map_targets(TeacherTargets.from_logits(t, y), CMAP, y)
    q, _ = brute_q(t.double(), 1.0)
    dense = torch.zeros(1, 4, dtype=torch.float64).scatter(1, tg.topk_idx, tg.topk_log_probs().double().exp())
    torch.testing.assert_close(dense, q, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(tg.topk_logp).all()


@pytest.mark.parametrize("k", [2, 3, 6])
def test_topk_mapped_mass_is_a_lower_bound_short_by_at_most_the_mapped_tail(k):
    s, t, y = make(batch=32, seed=4, scale=1.5)
    q, _ = brute_q(t, 1.0)
    topk = TeacherTargets.from_logits(t, y, k=k)
    tg = map_targets(topk, CMAP, y)
    assert tg.k == min(k, 4)
    low = torch.zeros_like(q).scatter(1, tg.topk_idx, tg.topk_log_probs().exp())
    tail = tg.tail_mass()
    ranked = torch.zeros_like(q, dtype=torch.bool).scatter(1, tg.topk_idx, True)
    short = q - low
    assert float(short[ranked].min()) >= -1e-12
    assert bool((short <= tail[:, None] + 1e-12).all())
    assert float(short.max()) > 1e-3  # the bound is not vacuous: some class is really short
    # the tail is t / (M + t): the teacher's tail over the in-map mass it knows plus that tail
    t_tail = topk.tail_mass()
    p = torch.softmax(t, 1)
    in_map = torch.stack([torch.where(torch.isin(topk.topk_idx[b], torch.tensor(sum(GROUPS, []))),
                                      p[b, topk.topk_idx[b]], 0.0).sum() for b in range(32)])
    torch.testing.assert_close(tail, t_tail / (in_map + t_tail))
    # PLD from the bound: the label, then the top student classes by the bound, rest unordered
    v, g = value_and_grad(lambda x: create_loss("pld")(x, y, tg), s)
    lab = low.gather(1, y[:, None]).squeeze(1)
    weights = low.scatter(1, y[:, None], lab[:, None])
    v_ref, g_ref = value_and_grad(lambda x: brute_pld(x, weights, y, k=tg.k).mean(), s)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(g, g_ref)


def test_an_ensemble_is_averaged_then_mapped():
    s, t1, y = make(seed=5)
    _, t2, _ = make(seed=6)
    p = (torch.softmax(t1, 1) + torch.softmax(t2, 1)) / 2
    m = torch.stack([p[:, grp].sum(1) for grp in GROUPS], 1)
    q = m / m.sum(1, keepdim=True)
    members = [TeacherTargets.from_logits(t, y) for t in (t1, t2)]
    batch = {"topk_idx": torch.stack([m.topk_idx for m in members], 1),
             "topk_logp": torch.stack([m.topk_logp for m in members], 1),
             "label_logp": torch.stack([m.label_logp for m in members], 1),
             "logz": torch.stack([m.logz for m in members], 1), "label": y}
    tg = batch_targets(batch, 1.0, C_T, class_map=CMAP)
    dense = torch.zeros_like(q).scatter(1, tg.topk_idx, tg.topk_log_probs().double().exp())
    torch.testing.assert_close(dense, q, atol=1e-6, rtol=1e-5)
    v, g = value_and_grad(lambda x: create_loss("pld")(x, y, tg), s)
    v_ref, g_ref = value_and_grad(lambda x: brute_pld(x, q, y).mean(), s)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_a_mixed_view_batch_ranks_the_dominant_student_label_first():
    s, t, y = make(seed=7)
    other = (y + 1) % 4
    lam = torch.tensor([1.0, 0.3, 0.7, 0.5, 0.2, 1.0], dtype=torch.float64)
    dominant = torch.where(2 * lam >= 1, y, other)
    assert bool((dominant != y).any())
    full = TeacherTargets.from_logits(t, dominant)
    batch = {"topk_idx": full.topk_idx[:, None], "topk_logp": full.topk_logp[:, None],
             "label_logp": full.label_logp[:, None], "logz": full.logz[:, None], "label": y, "label2": other,
             "lam": lam}
    tg = batch_targets(batch, 1.0, C_T, class_map=CMAP)
    q, _ = brute_q(t, 1.0)
    mix = MixedLabels(other, lam)
    v, g = value_and_grad(lambda x: create_loss("pld")(x, y, tg, mix), s)
    v_ref, g_ref = value_and_grad(lambda x: brute_pld(x, q, dominant).mean(), s)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(g, g_ref)
    # KD on the mixed view: the lambda-mixed CE on the two student labels plus the KL to the mapped distribution
    ce = lam * F.cross_entropy(s, y, reduction="none") + (1 - lam) * F.cross_entropy(s, other, reduction="none")
    kl = (q * (q.log() - torch.log_softmax(s, 1))).sum(1)
    torch.testing.assert_close(create_loss("kd")(s, y, tg, mix), (0.1 * ce + 0.9 * kl).mean())


def test_maps_by_index_by_list_and_by_name_agree():
    names = [f"c{i}" for i in range(C_T)]
    a = parse_class_map([3, 5], C_T)
    b = parse_class_map([[3], [5]], C_T)
    c = parse_class_map(["c3", "c5"], C_T, names)
    d = parse_class_map([["c0", 7, "c9"], "c5"], C_T, names)
    assert a == b == c and a.groups == ((3,), (5,)) and d.groups == ((0, 7, 9), (5,))
    assert map_by_names(["c9", "c1"], names) == [9, 1]
    assert a.to_dict()["sha256"] != d.to_dict()["sha256"]
    from pld_pipeline.class_map import ClassMap
    with pytest.raises(ClassMapError, match="disjoint groups"):  # built in code, not parsed: the same checks
        ClassMap(((3,), (5, 3)), C_T)


@pytest.mark.parametrize("doc, match", [
    ([0, 12], "entry 1 names class 12, which the teacher lacks"),
    (["c0", "dog"], "entry 1 names class 'dog', which the teacher lacks"),
    ([[0, 1], [2, 1]], "teacher class 1 is claimed by student classes 0 and 1"),
    ([3, 3], "teacher class 3 is claimed by student classes 0 and 1"),
    ([0, []], "entry 1 is empty"),
    ([0, 1.5], "entry 1 holds 1.5"),
    ([True], "entry 0 holds true"),
    ({"a": 1}, "expected a non-empty JSON list"),
    ([], "expected a non-empty JSON list"),
])
def test_bad_maps_are_refused_in_one_line_naming_the_entry(doc, match):
    with pytest.raises(ClassMapError, match=match) as e:
        parse_class_map(doc, C_T, [f"c{i}" for i in range(C_T)], where="m.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("m.json: ")


def test_names_without_teacher_names_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ClassMapError, match="class names are not known"):
        parse_class_map(["airplane"], C_T)
    bad = tmp_path / "map.json"
    bad.write_text("[0, 1,")
    with pytest.raises(ClassMapError, match=f"{bad}: not valid JSON"):
        load_class_map(str(bad), C_T)
    with pytest.raises(ClassMapError, match="no such file"):
        load_class_map(str(tmp_path / "missing.json"), C_T)


def test_a_map_file_larger_than_a_map_needs_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from pld_pipeline import class_map_spec
    path = tmp_path / "big.json"
    path.write_text(json.dumps(list(range(C_T))))
    assert load_class_map(str(path), C_T).num_classes == C_T
    monkeypatch.setattr(class_map_spec, "MAX_MAP_BYTES", 16)
    monkeypatch.setattr(json, "loads", lambda *_: pytest.fail("read before its size was checked"))
    with pytest.raises(ClassMapError, match=f"{path}: {path.stat().st_size:,} bytes, over the 16 pld reads"):
        load_class_map(str(path), C_T)


def test_a_label_outside_the_map_is_refused():
    s, t, y = make(seed=8)
    two = parse_class_map([3, 5], C_T)
    with pytest.raises(ClassMapError, match=r"label 3 is not a student class of the class map \(2 entries"):
        map_targets(TeacherTargets.from_logits(t, y), two, torch.tensor([0, 1, 3, 0, 0, 0]))


def test_timm_label_maps_agree_with_timm_class_names():
    m = timm_index_map("imagenet22k_to_12k")
    student, teacher = timm_class_names("imagenet-12k"), timm_class_names("imagenet-22k")
    cmap = parse_class_map(m, len(teacher))
    assert cmap.num_classes == len(student) == 11821
    assert [teacher[c] for c in m] == student
    assert parse_class_map(timm_index_map("imagenet_a"), 1000).num_classes == 200
    with pytest.raises(ClassMapError, match="timm ships no label map"):
        timm_index_map("imagenet_zz")


# -- end to end: the tests' own teacher (10 classes) cached once over a 4-class subset, a student distilled in its
# -- own classes through a map by name -------------------------------------------------------------------------
SUBSET = [0, 1, 8, 9]


@pytest.fixture(scope="module")
def subset(tmp_path_factory, teacher_run):
    """Shards of 4 of the teacher's 10 classes, labelled 0..3 (the student's classes), cached by the 10-class
    teacher with its class names recorded."""
    from conftest import make_images
    from pld_pipeline.cache_teacher import CacheTeacherConfig, TeacherSpec, cache_teacher
    from pld_pipeline.shards import split_arrays
    root = tmp_path_factory.mktemp("subset")
    images, labels = make_images(120, seed=3)
    keep = np.isin(labels, SUBSET)
    student_labels = np.searchsorted(SUBSET, labels[keep])
    splits = split_arrays(images[keep], student_labels, [f"class{c}" for c in SUBSET], str(root / "data"),
                          val_fraction=0.25, shard_size=16, seed=0)
    cache_url = str(root / "c.zarr")
    cache_teacher(CacheTeacherConfig(
        data=splits["train"].pattern, out=cache_url, teachers=[TeacherSpec("cifar_resnet14", teacher_run, "r14")],
        views=2, size=16, k=10, temperatures=(1.0, 2.0), batch_size=16, workers=0, device="cpu",
        recipe_overrides={"pad": 2}, class_names=[f"class{i}" for i in range(10)]))
    (root / "map.json").write_text(json.dumps([f"class{c}" for c in SUBSET]))
    return splits, cache_url, str(root / "map.json")


def test_a_mapped_run_trains_and_evaluates_in_the_students_classes(subset, tmp_path):
    from pld_pipeline.distill import DistillConfig, distill
    from pld_pipeline.student_data import StudentData
    from safetensors.torch import load_file
    splits, cache_url, map_path = subset
    data = StudentData(splits["train"].pattern, cache=cache_url, temperature=2.0, batch_size=8, workers=0,
                       class_map=map_path)
    plain = StudentData(splits["train"].pattern, cache=cache_url, temperature=2.0, batch_size=8, workers=0)
    assert (data.num_classes, data.teacher_classes, plain.num_classes) == (4, 10, 10)
    mapped, raw = next(data.epoch(0)), next(plain.epoch(0))
    assert torch.equal(mapped.labels, raw.labels) and int(mapped.labels.max()) <= 3
    want = map_targets(raw.targets, data.class_map, raw.labels)
    torch.testing.assert_close(mapped.targets.topk_logp, want.topk_logp)
    assert mapped.targets.num_classes == 4 and torch.equal(mapped.targets.topk_idx, want.topk_idx)
    # the student's distribution is the teacher's on classes 0, 1, 8, 9 renormalised (a full cache: k = 10)
    p = raw.targets.dense_probs()[:, SUBSET]
    dense = torch.zeros(8, 4).scatter(1, mapped.targets.topk_idx, mapped.targets.topk_log_probs().exp())
    torch.testing.assert_close(dense, p / p.sum(1, keepdim=True))

    out = tmp_path / "run"
    summary = distill(DistillConfig(data=splits["train"].pattern, out=str(out), student="cifar_resnet8", loss="pld",
                                    cache=cache_url, class_map=map_path, val_data=splits["val"].pattern, epochs=2,
                                    batch_size=8, lr=3e-3, workers=0, device="cpu"))
    assert summary["num_classes"] == 4 and summary["class_map"] == data.class_map.to_dict()["sha256"]
    assert 0.0 <= summary["best_val_top1"] <= 100.0
    weights = load_file(str(out / "best.safetensors"))
    assert weights["linear.weight"].shape[0] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 4 and config["config"]["class_map"] == map_path
    assert config["cache"]["class_map"]["groups"] == [[c] for c in SUBSET]


def test_inspect_with_a_map_reports_out_of_map_mass_and_student_accuracy(subset):
    from pld_pipeline.cache import Cache
    from pld_pipeline.cache.format import SampleStatus
    from pld_pipeline.class_map import inspect_class_map
    splits, cache_url, map_path = subset
    info = inspect_class_map(cache_url, map_path, labels="student")  # labels 0..3 fit both spaces: say which
    r14 = info["teachers"]["r14"]
    cache = Cache(cache_url)
    lo, acc, n = [], 0, 0
    for shard in range(len(cache.meta.shards)):
        b = cache.read(shard, "r14", temperature=1.0)
        ok = b.status == SampleStatus.OK
        p = np.exp(b.topk_logp[ok].astype(np.float64))
        idx = b.topk_idx[ok]
        dense = np.zeros(idx.shape[:2] + (10,))
        np.put_along_axis(dense, idx.astype(np.int64), p, axis=2)
        lo.append(np.delete(dense, SUBSET, axis=-1).sum(-1).ravel())
        acc += int((dense[..., SUBSET].argmax(-1) == b.labels[ok][:, None]).sum())
        n += dense.shape[0] * dense.shape[1]
    assert r14["out_of_map_mass"]["mean"] == pytest.approx(np.concatenate(lo).mean(), abs=1e-6)
    assert r14["out_of_map_mass"]["mean"] > 0.01
    assert r14["student_accuracy_on_cached_views"] == pytest.approx(acc / n)
    assert r14["views_with_labels_outside_the_map"] == 0


def test_the_cli_takes_a_map_and_refuses_a_bad_one_in_one_line(subset, tmp_path):
    from typer.testing import CliRunner
    from pld_pipeline_cli.app import app
    splits, cache_url, map_path = subset
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", cache_url, "--class-map", map_path, "--labels", "student"])
    assert result.exit_code == 0 and "student top-1" in result.output and "4 student classes" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["class0", "class1", "class1"]))
    result = runner.invoke(app, ["distill", "--data", splits["train"].pattern, "--cache", cache_url, "--student",
                                 "cifar_resnet8", "--out", str(tmp_path / "r"), "--class-map", str(bad)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{bad}: teacher class 1 is claimed by student classes 1 and 2" in text
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_an_offline_hub_teacher_with_1000_classes_distils_into_a_10_class_student(tiny_data, tmp_path):
    """timm's test_resnet as a 1000-class hub teacher (seeded random weights from a local HF cache, offline), cached
    once over the tests' 10-class shards; the student's 10 classes are the first 10 of timm's own imagenet-a map."""
    from test_hub import hf_cache, pld
    from pld_pipeline.class_map import inspect_class_map
    from pld_pipeline.distill import DistillConfig, distill
    from pld_pipeline.student_data import StudentData
    hf_cache(tmp_path / "hf")
    cache_url = str(tmp_path / "c.zarr")
    made = pld("cache-teacher", "--data", tiny_data["train"].pattern, "--teacher", "test_resnet.r160_in1k",
               "--teacher-name", "hub", "--pretrained", "--views", "1", "--recipe", "imagenet", "--size", "48",
               "--top-k", "50", "--workers", "0", "--device", "cpu", "--quiet", "--out", cache_url,
               hf_home=tmp_path / "hf")
    assert made.returncode == 0, made.stderr
    groups = timm_index_map("imagenet_a")[:10]
    map_path = tmp_path / "map.json"
    map_path.write_text(json.dumps(groups))
    data = StudentData(tiny_data["train"].pattern, cache=cache_url, batch_size=8, workers=0, class_map=str(map_path))
    plain = StudentData(tiny_data["train"].pattern, cache=cache_url, batch_size=8, workers=0)
    mapped, raw = next(data.epoch(0)), next(plain.epoch(0))
    assert (data.num_classes, raw.targets.num_classes, mapped.targets.num_classes, mapped.targets.k) == (10, 1000, 10, 10)
    # every mapped probability is a lower bound of the group's share: at most (known group mass + tail) / (M + tail)
    p = torch.zeros(8, 1000).scatter(1, raw.targets.topk_idx, raw.targets.topk_log_probs().exp())[:, groups]
    t = raw.targets.tail_mass()
    q = torch.zeros(8, 10).scatter(1, mapped.targets.topk_idx, mapped.targets.topk_log_probs().exp())
    torch.testing.assert_close(q, p / (p.sum(1, keepdim=True) + t[:, None]), atol=1e-6, rtol=1e-4)
    info = inspect_class_map(cache_url, str(map_path))["teachers"]["hub"]
    assert info["out_of_map_mass_upper"]["mean"] > 0.9  # a random 1000-class teacher puts little mass on these 10
    summary = distill(DistillConfig(data=tiny_data["train"].pattern, out=str(tmp_path / "run"), student="cifar_resnet8",
                                    loss="pld", cache=cache_url, class_map=str(map_path), epochs=1, batch_size=8,
                                    workers=0, device="cpu", val_data=tiny_data["val"].pattern))
    assert summary["num_classes"] == 10 and summary["best_val_top1"] is not None


def test_a_resume_refuses_a_map_file_edited_since_the_run_started(subset, tmp_path):
    from pld_pipeline.distill import DistillConfig, distill
    splits, cache_url, _ = subset
    map_path = tmp_path / "map.json"
    map_path.write_text(json.dumps([0, 1, 8, 9]))
    run = dict(data=splits["train"].pattern, out=str(tmp_path / "run"), student="cifar_resnet8", loss="kd",
               cache=cache_url, class_map=str(map_path), batch_size=8, workers=0, device="cpu")
    distill(DistillConfig(**run, epochs=1))
    map_path.write_text(json.dumps([0, 1, 9, 8]))  # ship and truck swapped: the same path, other classes
    with pytest.raises(ValueError, match="now maps other classes than"):
        distill(DistillConfig(**run, epochs=1, resume=True))
    map_path.write_text(json.dumps([[0], [1], [8], [9]]))  # spelt differently, the same groups: resumes
    assert distill(DistillConfig(**run, epochs=1, resume=True))["resumed_from_epoch"] == 1


def test_inspect_counts_the_student_accuracy_over_only_the_views_whose_label_is_in_the_map(cache, tmp_path):
    """The session cache's labels are the teacher's 10 classes; under the 4-entry map [0, 1, 8, 9] only views
    labelled 0, 1, 8 or 9 have a student class (0-3). Views labelled 2-7 cannot be right or wrong in the student's
    classes: they are counted apart, not as misses (which would understate the accuracy by a factor of about 10/4)."""
    from pld_pipeline.cache import Cache
    from pld_pipeline.cache.format import SampleStatus
    from pld_pipeline.class_map import inspect_class_map
    info = inspect_class_map(cache, SUBSET)["teachers"]["r14"]
    reader = Cache(cache)
    hits = inside = outside = 0
    for shard in range(len(reader.meta.shards)):
        b = reader.read(shard, "r14", temperature=1.0)
        ok = b.status == SampleStatus.OK
        dense = np.zeros(b.topk_idx[ok].shape[:2] + (10,))
        np.put_along_axis(dense, b.topk_idx[ok].astype(np.int64), np.exp(b.topk_logp[ok].astype(np.float64)), axis=2)
        labels = np.broadcast_to(b.labels[ok][:, None], dense.shape[:2])
        mine = np.isin(labels, SUBSET)
        student = np.select([labels == c for c in SUBSET], list(range(len(SUBSET))), -1)  # its group's class
        hits += int((dense[..., SUBSET].argmax(-1) == student)[mine].sum())
        inside, outside = inside + int(mine.sum()), outside + int((~mine).sum())
    assert inside > 0 and outside > 0  # both kinds of view are there
    assert info["views_with_labels_outside_the_map"] == outside
    assert info["student_accuracy_on_cached_views"] == pytest.approx(hits / inside)
