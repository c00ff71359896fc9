"""Every loss against a brute-force reference (values and gradients) plus the properties the paper states."""
import math

import pytest
import torch
import torch.nn.functional as F

from pld_pipeline import losses
from pld_pipeline.teacher_order import teacher_order
from pld_pipeline.losses import (
    PLDLoss, TeacherTargets, create_loss, dist_loss, kd_loss, pld_loss, pld_loss_from_ranking,
)


def ranking(teacher_row: torch.Tensor, label: int) -> list[int]:
    """True label first, then the other classes by descending teacher logit, ties by lower index."""
    rest = sorted((c for c in range(len(teacher_row)) if c != label), key=lambda c: (-float(teacher_row[c]), c))
    return [label] + rest


def plackett_luce_terms(s_row, weights, order) -> list[float]:
    """The literal sequential Plackett-Luce NLL: step k picks order[k] from the classes not yet chosen."""
    terms = []
    for k, cls in enumerate(order):
        remaining = order[k:]
        lse = math.log(sum(math.exp(float(s_row[c])) for c in remaining)) if max(
            abs(float(s_row[c])) for c in remaining) < 700 else float(torch.logsumexp(s_row[remaining].double(), 0))
        terms.append(float(weights[cls]) * (lse - float(s_row[cls])))
    return terms


def brute_pld(s, t, y, temperature=1.0, steps=None) -> torch.Tensor:
    out = []
    for b in range(s.shape[0]):
        p = torch.softmax(t[b].double() / temperature, 0)
        terms = plackett_luce_terms(s[b].double(), p, ranking(t[b], int(y[b])))
        out.append(sum(terms[:steps] if steps is not None else terms))
    return torch.tensor(out, dtype=torch.float64)


def make(batch, classes, scale=3.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    t = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    y = torch.randint(0, classes, (batch,), generator=g)
    return s, t, y


@pytest.mark.parametrize("classes", [2, 3, 10, 100])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_pld_matches_the_sequential_plackett_luce_likelihood(classes, temperature):
    s, t, y = make(6, classes, seed=classes)
    got = pld_loss(s, t, y, temperature, reduction="none")
    torch.testing.assert_close(got, brute_pld(s, t, y, temperature), atol=1e-6, rtol=0)


@pytest.mark.parametrize("classes", [2, 3, 10, 37])
def test_pld_gradients_pass_gradcheck(classes):
    s, t, y = make(4, classes, seed=1)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pld_loss(x, t, y, 1.5, reduction="none"), (s,))
    tg = TeacherTargets.from_logits(t, y, k=min(classes, 5), temperature=2.0)
    assert torch.autograd.gradcheck(lambda x: pld_loss_from_ranking(x, y, tg, reduction="none"), (s,))


def test_pld_gradient_matches_autograd_through_the_brute_force_formula():
    s, t, y = make(5, 12, seed=3)
    s1 = s.clone().requires_grad_(True)
    pld_loss(s1, t, y, reduction="sum").backward()
    s2 = s.clone().requires_grad_(True)
    total = 0
    for b in range(5):
        p = torch.softmax(t[b] / 1.0, 0)
        order = ranking(t[b], int(y[b]))
        for k, cls in enumerate(order):
            total = total + p[cls] * (torch.logsumexp(s2[b, order[k:]], 0) - s2[b, cls])
    total.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-10, rtol=0)


def test_pld_with_ties_orders_tied_classes_by_lower_index():
    s, _, y = make(4, 8, seed=4)
    t = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 0.0, -1.0, 2.0]] * 4, dtype=torch.float64)
    torch.testing.assert_close(pld_loss(s, t, y, reduction="none"), brute_pld(s, t, y), atol=1e-6, rtol=0)
    tg = TeacherTargets.from_logits(t, y, k=3)
    assert tg.topk_idx[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("scale", [60.0, 400.0])
def test_pld_is_stable_and_exact_for_extreme_logits(scale):
    """std 400 spreads wider than exp space allows and takes the log-space path; both must stay exact."""
    s, t, y = make(5, 50, scale=scale, seed=5)
    torch.testing.assert_close(pld_loss(s, t, y, reduction="none"), brute_pld(s, t, y), atol=1e-6, rtol=1e-9)
    s32 = s.float().requires_grad_(True)
    loss = pld_loss(s32, t.float(), y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s32.grad).all()
    s64 = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pld_loss(x, t, y, reduction="none"), (s64,))


@pytest.mark.parametrize("k", [None, 7])
def test_float32_rows_of_every_spread_in_one_batch_match_the_float64_reference(k):
    """float32 runs exp-space sums only for rows spread under 60 (exp stays a normal number); wider rows in the
    same batch take logcumsumexp. Loss and gradient match float64 per row, whichever path a row took."""
    s, t, y = make(6, 40, seed=21)
    s = s * torch.tensor([0.2, 1.0, 2.0, 5.0, 40.0, 300.0], dtype=torch.float64)[:, None]  # spreads ~4 .. ~5000
    tg64 = TeacherTargets.from_logits(t, y, k=k)
    tg32 = TeacherTargets.from_logits(t.float(), y, k=k)
    for fn, a, b in ((lambda x, tg: pld_loss_from_ranking(x, y, tg, reduction="none"), tg64, tg32),
                     (lambda x, tg: pld_loss(x, t.to(x.dtype), y, reduction="none"), None, None)):
        x64, x32 = s.clone().requires_grad_(True), s.float().requires_grad_(True)
        l64, l32 = fn(x64, a), fn(x32, b)
        l64.sum().backward()
        l32.sum().backward()
        torch.testing.assert_close(l32.double(), l64, rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    if k is None:
        torch.testing.assert_close(l64, brute_pld(s, t, y), atol=1e-6, rtol=1e-9)


def test_a_label_the_teacher_ranks_last_on_a_wide_float32_row_matches_float64():
    """The label's slot of the whole-ranking suffix holds 1, so only the entries before it say whether exp left
    float32's range: with the label ranked last and one earlier class 200 below the rest, a check of the last
    entry alone kept exp space and gave -inf and a NaN gradient (outside audit)."""
    t = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.5, 2.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([3, 1])
    s = torch.tensor([[0.0, 0.0, -200.0, 0.0], [0.3, -0.2, 0.1, 0.0]], dtype=torch.float64)
    x64, x32 = s.clone().requires_grad_(True), s.float().requires_grad_(True)
    l64, l32 = pld_loss(x64, t, y, reduction="none"), pld_loss(x32, t.float(), y, reduction="none")
    l64.sum().backward()
    l32.sum().backward()
    assert torch.isfinite(l32).all() and torch.isfinite(x32.grad).all()
    torch.testing.assert_close(l32.double(), l64, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(l64, brute_pld(s, t, y), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("k", [4, None])
def test_a_student_sure_of_its_label_matches_float64_where_float32_exp_space_fails(k):
    """Every class but the label 150 below it: in float32 each later suffix sum (the rest's too) leaves exp's normal
    range, so the head and the whole-ranking kernels must take their exact branch; float64 (limit 600) need not."""
    s, t, y = make(6, 12, seed=44)
    for b in range(3):  # rows 3-5 stay ordinary
        s[b] = torch.where(torch.arange(12) == y[b], 0.0, s[b] - 150)
    tg64, tg32 = TeacherTargets.from_logits(t, y, k=k), TeacherTargets.from_logits(t.float(), y, k=k)
    x64, x32 = s.clone().requires_grad_(True), s.float().requires_grad_(True)
    l64, l32 = (pld_loss_from_ranking(x, y, tg, reduction="none") for x, tg in ((x64, tg64), (x32, tg32)))
    l64.sum().backward()
    l32.sum().backward()
    torch.testing.assert_close(l32.double(), l64, rtol=2e-5, atol=2e-4)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    steps = None if k is None else [k if int(y[b]) in tg64.topk_idx[b].tolist() else k + 1 for b in range(6)]
    want = torch.cat([brute_pld(s[b:b + 1], t[b:b + 1], y[b:b + 1], steps=None if steps is None else steps[b])
                      for b in range(6)])
    torch.testing.assert_close(l64.detach(), want, atol=1e-6, rtol=1e-9)


def test_pld_is_translation_invariant_in_student_and_teacher():
    s, t, y = make(8, 20, seed=6)
    base = pld_loss(s, t, y, reduction="none")
    shift = torch.randn(8, 1, dtype=torch.float64) * 50
    torch.testing.assert_close(pld_loss(s + shift, t, y, reduction="none"), base)
    torch.testing.assert_close(pld_loss(s, t - shift, y, reduction="none"), base)


def test_one_hot_weights_give_cross_entropy_and_uniform_weights_give_listmle():
    s, t, y = make(6, 10, seed=7)
    head_idx = torch.stack([torch.tensor(ranking(t[b], int(y[b]))) for b in range(6)])
    valid = torch.ones_like(head_idx, dtype=torch.bool)
    one_hot = torch.zeros(6, 10, dtype=torch.float64)
    one_hot[:, 0] = 1.0
    got_ce = losses._PlackettLuceHead.apply(s, head_idx, valid, one_hot)
    torch.testing.assert_close(got_ce, F.cross_entropy(s, y, reduction="none"))
    uniform = torch.full((6, 10), 0.1, dtype=torch.float64)
    got_listmle = losses._PlackettLuceHead.apply(s, head_idx, valid, uniform)
    listmle = torch.tensor([
        sum(plackett_luce_terms(s[b], torch.ones(10), head_idx[b].tolist())) / 10 for b in range(6)],
        dtype=torch.float64)
    torch.testing.assert_close(got_listmle, listmle)


@pytest.mark.parametrize("k", [1, 3, 9, 10])
def test_topk_head_equals_the_first_steps_of_the_full_loss(k):
    s, t, y = make(16, 10, seed=8)
    tg = TeacherTargets.from_logits(t, y, k=k, temperature=2.0)
    got = pld_loss_from_ranking(s, y, tg, reduction="none")
    for b in range(16):
        steps = k if int(y[b]) in tg.topk_idx[b].tolist() else k + 1
        want = brute_pld(s[b:b + 1], t[b:b + 1], y[b:b + 1], 2.0, steps=steps)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-9, rtol=0)


def test_full_ranking_equals_pld_loss():
    s, t, y = make(32, 100, seed=9, dtype=torch.float32)
    tg = TeacherTargets.from_logits(t, y, temperature=1.0)
    torch.testing.assert_close(pld_loss_from_ranking(s, y, tg), pld_loss(s, t, y), atol=1e-5, rtol=1e-6)


def test_dropped_tail_gradient_is_bounded_by_twice_the_tail_mass():
    s, t, y = make(32, 50, seed=10)
    for k in (2, 5, 20):
        tg = TeacherTargets.from_logits(t, y, k=k)
        s_full = s.clone().requires_grad_(True)
        pld_loss(s_full, t, y, reduction="sum").backward()
        s_head = s.clone().requires_grad_(True)
        pld_loss_from_ranking(s_head, y, tg, reduction="sum").backward()
        tail_grad_l1 = (s_full.grad - s_head.grad).abs().sum(1)
        # The tail mass excludes the label's weight whether or not the label made the top-k.
        alpha_head = torch.stack([
            torch.softmax(t[b], 0)[list({int(y[b]), *tg.topk_idx[b].tolist()})].sum() for b in range(32)])
        tail_mass = 1.0 - alpha_head
        assert (tail_grad_l1 <= 2 * tail_mass + 1e-9).all()
        assert (tail_grad_l1 > 0).any()


def test_pld_module_is_a_drop_in_and_float32_accumulates_under_bf16():
    s, t, y = make(8, 10, seed=11, dtype=torch.float32)
    assert torch.allclose(PLDLoss(2.0)(s, t, y), pld_loss(s, t, y, 2.0))
    got = pld_loss(s.bfloat16(), t.bfloat16(), y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, pld_loss(s.bfloat16().float(), t.bfloat16().float(), y))


def standard_kd(s, t, y, temperature, alpha):
    kl = F.kl_div(torch.log_softmax(s / temperature, 1), torch.softmax(t / temperature, 1), reduction="batchmean")
    return alpha * F.cross_entropy(s, y) + (1 - alpha) * temperature ** 2 * kl


def test_kd_with_k_equal_c_is_standard_kd():
    s, t, y = make(8, 10, seed=12)
    tg = TeacherTargets.from_logits(t, y, temperature=2.0)
    torch.testing.assert_close(kd_loss(s, y, tg, alpha=0.3), standard_kd(s, t, y, 2.0, 0.3))
    s_req = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, y, tg, reduction="none"), (s_req,))


def test_topk_kd_is_the_exact_kl_over_k_plus_one_bins():
    s, t, y = make(8, 10, seed=13)
    k, temperature = 3, 2.0
    tg = TeacherTargets.from_logits(t, y, k=k, temperature=temperature)
    want = []
    for b in range(8):
        p = torch.softmax(t[b] / temperature, 0)
        q = torch.softmax(s[b] / temperature, 0)
        top = tg.topk_idx[b].tolist()
        rest = [c for c in range(10) if c not in top]
        p_bins = torch.cat([p[top], p[rest].sum()[None]])
        q_bins = torch.cat([q[top], q[rest].sum()[None]])
        kl = (p_bins * (p_bins / q_bins).log()).sum()
        want.append(0.1 * F.cross_entropy(s[b:b + 1], y[b:b + 1]) + 0.9 * temperature ** 2 * kl)
    torch.testing.assert_close(kd_loss(s, y, tg, reduction="none"), torch.stack(want))
    s_req = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, y, tg, reduction="none"), (s_req,))


def test_topk_kd_differs_from_the_biased_softmax_over_the_topk_alone():
    s, t, y = make(8, 10, seed=14)
    tg = TeacherTargets.from_logits(t, y, k=3)
    biased_p = torch.softmax(t.gather(1, tg.topk_idx), 1)
    biased = (biased_p * (biased_p.log() - torch.log_softmax(s.gather(1, tg.topk_idx), 1))).sum(1)
    assert not torch.allclose(kd_loss(s, y, tg, alpha=0.0, reduction="none"), biased)


def direct_dist(s, t, y, temperature=1.0, alpha=0.1, beta=0.45, gamma=0.45):
    return direct_dist_from_probs(s, torch.softmax(t / temperature, 1), y, temperature, alpha, beta, gamma)


def direct_dist_from_probs(s, yt, y, temperature=1.0, alpha=0.1, beta=0.45, gamma=0.45):
    """DIST from its formula with explicit means and standard deviations, given the teacher's probabilities."""
    ys = torch.softmax(s / temperature, 1)

    def corr(a, b):  # Pearson per row
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())

    inter = 1 - corr(ys, yt).mean()
    intra = 1 - corr(ys.T, yt.T).mean()
    return alpha * F.cross_entropy(s, y) + temperature ** 2 * (beta * inter + gamma * intra)


def test_dist_matches_its_formula():
    s, t, y = make(16, 10, seed=15)
    tg = TeacherTargets.from_logits(t, y, temperature=2.0)
    torch.testing.assert_close(dist_loss(s, y, tg), direct_dist(s, t, y, 2.0))
    s_req = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dist_loss(x, y, tg), (s_req,))


def test_topk_dist_spreads_the_tail_mass_evenly():
    s, t, y = make(4, 10, seed=16)
    tg = TeacherTargets.from_logits(t, y, k=4)
    dense = tg.dense_probs()
    torch.testing.assert_close(dense.sum(1), torch.ones(4, dtype=torch.float64))
    exact = torch.softmax(t, 1)
    torch.testing.assert_close(dense.gather(1, tg.topk_idx), exact.gather(1, tg.topk_idx))
    outside = torch.ones_like(dense, dtype=torch.bool).scatter(1, tg.topk_idx, False)
    tail = (1 - exact.gather(1, tg.topk_idx).sum(1, keepdim=True)) / 6  # 10 classes - k=4: evenly over the other 6
    torch.testing.assert_close(dense[outside].view(4, 6), tail.expand(4, 6))
    # and DIST itself sees exactly that vector
    torch.testing.assert_close(dist_loss(s, y, tg), direct_dist_from_probs(s, dense, y))


def test_losses_are_picked_by_name_with_checked_parameters():
    s, t, y = make(4, 10, seed=17, dtype=torch.float32)
    tg = TeacherTargets.from_logits(t, y, temperature=2.0)
    assert torch.allclose(create_loss("pld")(s, y, tg), pld_loss(s, t, y, 2.0))
    assert torch.allclose(create_loss("kd", alpha=0.5)(s, y, tg), kd_loss(s, y, tg, alpha=0.5))
    assert torch.allclose(create_loss("ce")(s, y, None), F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="Unsupported loss 'mse'"):
        create_loss("mse")
    with pytest.raises(ValueError, match="takes no parameter"):
        create_loss("pld", alpha=0.1)
    with pytest.raises(ValueError, match="needs teacher targets"):
        create_loss("kd")(s, y, None)


@pytest.mark.parametrize("case, match", [
    (lambda s, t, y: pld_loss(s[:, :5], t, y), "same shape"),
    (lambda s, t, y: pld_loss(s, t, y + 10), r"labels must lie in \[0, 10\)"),
    (lambda s, t, y: pld_loss(s, t, torch.full_like(y, 10)), r"labels must lie in \[0, 10\), got min 10 max 10"),
    (lambda s, t, y: pld_loss(s, t, y[:2]), "labels must be"),
    (lambda s, t, y: pld_loss(s, t.index_fill(1, torch.tensor([0]), float("nan")), y), "NaN or Inf"),
    (lambda s, t, y: pld_loss(s, t, y, temperature=0.0), "temperature must be"),
    (lambda s, t, y: TeacherTargets.from_logits(t, y, k=11), r"k must lie in \[1, num_classes=10\]"),
    (lambda s, t, y: pld_loss_from_ranking(s[:, :9], y.clamp(max=8), TeacherTargets.from_logits(t, y)),
     "student has 9 classes"),
    (lambda s, t, y: pld_loss(s, t, y.float()), "integer tensor"),
    (lambda s, t, y: TeacherTargets.from_logits(t.index_fill(1, torch.tensor([3]), -math.inf), y), "NaN or Inf"),
    (lambda s, t, y: pld_loss_from_ranking(s, y.index_fill(0, torch.tensor([1]), -1), TeacherTargets.from_logits(
        t, y, k=3)), r"labels must lie in \[0, 10\), got min -1"),
])
def test_bad_input_gets_a_clear_value_error(case, match):
    s, t, y = make(4, 10, seed=18)
    with pytest.raises(ValueError, match=match):
        case(s, t, y)


def test_an_ensemble_of_full_rankings_is_exactly_the_averaged_teacher():
    s, t1, y = make(6, 12, seed=31)
    t2 = torch.randn(6, 12, dtype=torch.float64) * 2
    members = [TeacherTargets.from_logits(t, y, temperature=2.0) for t in (t1, t2)]
    ens = TeacherTargets.ensemble(members)
    p = (torch.softmax(t1 / 2.0, 1) + torch.softmax(t2 / 2.0, 1)) / 2
    torch.testing.assert_close(ens.topk_log_probs().exp(), p.gather(1, ens.topk_idx))
    assert torch.equal(ens.topk_idx, torch.sort(p, dim=1, descending=True, stable=True).indices)
    torch.testing.assert_close(ens.label_log_prob().exp(), p.gather(1, y[:, None]).squeeze(1))
    # PLD from the ensemble is PLD against the averaged teacher (logits T * log p at temperature T)
    torch.testing.assert_close(pld_loss_from_ranking(s, y, ens, reduction="none"),
                               pld_loss(s, 2.0 * p.log(), y, 2.0, reduction="none"))
    torch.testing.assert_close(kd_loss(s, y, ens), kd_loss(s, y, TeacherTargets.from_logits(2.0 * p.log(), y, temperature=2.0)))


def test_an_ensemble_of_topk_members_is_bounded_by_their_tail_masses():
    s, t1, y = make(64, 50, seed=32)
    t2 = t1 + torch.randn(64, 50, dtype=torch.float64) * 2  # related teachers: top-k sets overlap, not equal
    members = [TeacherTargets.from_logits(t, y, k=6) for t in (t1, t2)]
    ens = TeacherTargets.ensemble(members)
    p = (torch.softmax(t1, 1) + torch.softmax(t2, 1)) / 2
    got, want = ens.topk_log_probs().exp(), p.gather(1, ens.topk_idx)
    bound = torch.stack([m.tail_mass() for m in members]).mean(0)[:, None]
    assert (got <= want + 1e-12).all() and (want - got <= bound + 1e-12).all()  # lower bounds, short by <= the bound
    assert ((want - got) > 1e-6).any()  # the bound is needed: some members did not rank some classes
    torch.testing.assert_close(ens.label_log_prob().exp(), p.gather(1, y[:, None]).squeeze(1))  # the label: exact


@pytest.mark.parametrize("k", [5, 10])
def test_bf16_student_logits_get_bf16_gradients_equal_to_the_float32_ones(k):
    """The kernels accumulate in float32 but hand the gradient back in the student's own dtype (what autocast
    training needs), and its values are the float32 gradient rounded once."""
    s, t, y = make(8, 10, seed=12, dtype=torch.float32)
    targets = TeacherTargets.from_logits(t, y, k=k)
    s16 = s.bfloat16().requires_grad_()
    pld_loss_from_ranking(s16, y, targets).backward()
    s32 = s16.detach().float().requires_grad_()
    pld_loss_from_ranking(s32, y, targets).backward()
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad, s32.grad.bfloat16())


def _all_kernels(x, t, y):
    """The three PLD kernels in one function of student logits, teacher logits and labels: the top-k head, the
    whole ranking (both from TeacherTargets built inside, sort included) and pld_loss."""
    head, whole = TeacherTargets.from_logits(t, y, k=3), TeacherTargets.from_logits(t, y)
    return pld_loss_from_ranking(x, y, head) + 2 * pld_loss_from_ranking(x, y, whole) + 3 * pld_loss(x, t, y)


def test_the_kernels_compile_as_one_graph_match_eager_on_rows_of_every_spread_and_still_refuse_bad_input():
    """No host read (.item(), bool(tensor)) or branch on a value is left to break torch.compile's graph (fullgraph
    refuses any break: the check of ``torch._dynamo.explain(...).graph_break_count == 0`` with one trace instead of
    two). torch.cond takes the exact branch for the wide rows inside the graph; the value checks become device-side
    asserts, a RuntimeError naming the problem, instead of host reads."""
    from torch._dynamo.testing import CompileCounter
    s, t, y = make(4, 10, seed=41, dtype=torch.float32)
    s = s * torch.tensor([0.3, 1.0, 40.0, 300.0])[:, None]  # the last two rows spread past exp space
    s[0] = torch.where(torch.arange(10) == y[0], 0.0, s[0] - 150)  # sure of its label: the head's exact branch too
    graphs = CompileCounter()
    compiled = torch.compile(_all_kernels, backend=graphs, fullgraph=True)
    want, want_grad = value_and_grad(lambda x: _all_kernels(x, t, y), s)
    got, got_grad = value_and_grad(lambda x: compiled(x, t, y), s)
    assert graphs.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    x = s.clone().requires_grad_(True)  # as traced: no second trace
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 10\)"):
        compiled(x, t, y + 10)
    with pytest.raises(RuntimeError, match="teacher_logits be finite"):
        compiled(x, t.index_fill(1, torch.tensor([2]), math.nan), y)
    assert graphs.frame_count == 1  # the bad inputs ran the same graph
    torch._dynamo.reset()


def value_and_grad(fn, s):
    x = s.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def test_a_head_covering_every_class_has_exact_gradients():
    """k = C - 1 with the label outside the top-k: nothing is left outside the head (R = -inf, an empty rest)."""
    s, t, y = make(4, 6, seed=42)
    y = t.argmin(1)  # the label is the teacher's last class: outside its top-5
    tg = TeacherTargets.from_logits(t, y, k=5)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pld_loss_from_ranking(x, y, tg, reduction="none"), (s,))
    torch.testing.assert_close(pld_loss_from_ranking(s, y, tg, reduction="none"), brute_pld(s.detach(), t, y))


def test_teacher_order_is_torchs_stable_descending_sort():
    """The CPU float32 path sorts int64 keys in numpy: ties (lower index first), -0.0 against 0.0, infinities and
    wide magnitudes come out exactly as torch's stable sort; other dtypes take torch's sort itself."""
    g = torch.Generator().manual_seed(43)
    t = torch.randint(-3, 4, (16, 40), generator=g).float() * 0.5  # many ties
    t[0, :6] = torch.tensor([0.0, -0.0, math.inf, -math.inf, 0.0, -0.0])
    t[1] = torch.randn(40, generator=g) * 1e30
    t[2] = -torch.rand(40, generator=g) * 1e-40  # subnormal negatives
    for x in (t, t.double()):
        assert torch.equal(teacher_order(x), torch.sort(x, dim=1, descending=True, stable=True).indices)
    nan = t.clone()
    nan[3, 5], nan[4, 7] = math.nan, -math.nan
    ends = nan.gather(1, teacher_order(nan))[:, [0, -1]]
    assert (~torch.isfinite(ends).all(1)).nonzero().flatten().tolist() == [0, 3, 4]  # row 0 holds inf, 3 and 4 NaN
