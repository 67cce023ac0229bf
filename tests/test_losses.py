"""TWIST loss terms against hand computations (docs/method.md §3 and §4), written as plain loops."""

import math

import pytest
import torch

from twist_hf.losses import (
    confidence_threshold,
    momentum_twist_loss,
    self_label_loss,
    sparse_view_pairs,
    twist_loss,
)

EPS = 1e-5


def softmax_rows(rows):
    out = []
    for row in rows:
        exps = [math.exp(v) for v in row]
        total = sum(exps)
        out.append([e / total for e in exps])
    return out


def kl(pa, pb):
    return sum(
        sum(a * (math.log(a + EPS) - math.log(b + EPS)) for a, b in zip(ra, rb)) for ra, rb in zip(pa, pb)
    ) / len(pa)


def mean_entropy(q):
    return sum(-sum(v * math.log(v + EPS) for v in row) for row in q) / len(q)


def entropy_of_mean(q):
    m = [sum(col) / len(q) for col in zip(*q)]
    return -sum(v * math.log(v + EPS) for v in m)


def reference_pair(za, zb, tau, lam1, lam2):
    pa, pb = softmax_rows(za), softmax_rows(zb)
    qa = softmax_rows([[v / tau for v in r] for r in za])
    qb = softmax_rows([[v / tau for v in r] for r in zb])
    k = (kl(pa, pb) + kl(pb, pa)) / 2
    eh = (mean_entropy(qa) + mean_entropy(qb)) / 2
    he = (entropy_of_mean(qa) + entropy_of_mean(qb)) / 2
    return k + (1 + lam1) * eh - lam2 * he, k, eh, he


LOGITS = torch.tensor(
    [
        [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]],
        [[0.8, 0.1, -0.5], [0.0, 1.5, 0.3]],
        [[-0.2, 0.4, 0.9], [1.1, -0.7, 0.2]],
        [[0.3, 0.3, 0.1], [2.0, 0.0, -2.0]],
    ]
)


def test_uniform_logits_give_zero_loss():
    """p uniform: KL = 0 and EH = HE = log K (up to eps), so L = 0 with lam1 = 0, lam2 = 1."""
    terms = twist_loss(torch.zeros(2, 4, 5))
    assert terms.kl.item() == pytest.approx(0.0, abs=1e-7)
    assert terms.eh.item() == pytest.approx(math.log(5), abs=1e-4)
    assert terms.he.item() == pytest.approx(math.log(5), abs=1e-4)
    assert terms.loss.item() == pytest.approx(0.0, abs=1e-6)


def test_confident_but_collapsed_batch_has_low_diversity():
    """Every sample sure of class 0: EH ~ 0 and HE ~ 0, so L ~ 0 while a diverse batch reaches -log K."""
    collapsed = torch.zeros(2, 4, 4)
    collapsed[..., 0] = 30.0
    diverse = torch.full((2, 4, 4), -30.0)
    for i in range(4):
        diverse[:, i, i] = 30.0
    assert twist_loss(collapsed).loss.item() == pytest.approx(0.0, abs=1e-3)
    assert twist_loss(diverse).loss.item() == pytest.approx(-math.log(4), abs=1e-3)


@pytest.mark.parametrize("tau,lam1,lam2", [(1.0, 0.0, 1.0), (0.5, -0.6, 1.0), (2.0, 0.3, 0.7)])
def test_two_view_loss_matches_hand_computation(tau, lam1, lam2):
    expected = reference_pair(LOGITS[0].tolist(), LOGITS[1].tolist(), tau, lam1, lam2)
    terms = twist_loss(LOGITS[:2], tau=tau, lam1=lam1, lam2=lam2)
    got = (terms.loss, terms.kl, terms.eh, terms.he)
    for value, reference in zip(got, expected):
        assert value.item() == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_multi_crop_pairs_are_sparse():
    assert sparse_view_pairs(2) == [(0, 1)]
    assert sparse_view_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]


def test_multi_crop_loss_is_mean_over_sparse_pairs():
    pairs = sparse_view_pairs(4)
    per_pair = [reference_pair(LOGITS[a].tolist(), LOGITS[b].tolist(), 1.0, 0.0, 1.0) for a, b in pairs]
    expected = [sum(values) / len(pairs) for values in zip(*per_pair)]
    terms = twist_loss(LOGITS)
    for value, reference in zip((terms.loss, terms.kl, terms.eh, terms.he), expected):
        assert value.item() == pytest.approx(reference, rel=1e-5, abs=1e-6)


def test_momentum_loss_matches_hand_computation():
    tau, lam1, lam2 = 0.5, -0.6, 1.0
    student, teacher = LOGITS[:3], LOGITS[1:3] * 1.5
    q_s = [softmax_rows([[v / tau for v in row] for row in view.tolist()]) for view in student]
    q_t = [softmax_rows([[v / tau for v in row] for row in view.tolist()]) for view in teacher]
    kls = [kl(q_t[i], q_s[j]) for i in range(2) for j in range(3) if i != j]
    k = sum(kls) / len(kls)
    eh = sum(mean_entropy(q) for q in q_s) / 3
    he = sum(entropy_of_mean(q) for q in q_s) / 3
    terms = momentum_twist_loss(student, teacher, tau=tau, lam1=lam1, lam2=lam2)
    assert terms.kl.item() == pytest.approx(k, rel=1e-5)
    assert terms.eh.item() == pytest.approx(eh, rel=1e-5)
    assert terms.he.item() == pytest.approx(he, rel=1e-5)
    assert terms.loss.item() == pytest.approx(k + (1 + lam1) * eh - lam2 * he, rel=1e-5)


def test_momentum_loss_sends_no_gradient_to_the_teacher():
    student = LOGITS[:3].clone().requires_grad_()
    teacher = LOGITS[:2].clone().requires_grad_()
    momentum_twist_loss(student, teacher).loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_confidence_threshold_takes_the_quantile_position_sorted_descending():
    confidence = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    assert confidence_threshold(confidence, 0.0).item() == pytest.approx(0.9)
    assert confidence_threshold(confidence, 0.5).item() == pytest.approx(0.5)  # sorted: .9 .7 .5 .3 .1
    assert confidence_threshold(confidence, 1.0).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="quantile"):
        confidence_threshold(confidence, 1.5)


def test_self_label_loss_matches_hand_computation():
    logits = LOGITS[:, :2].clone()  # 4 views, 2 samples, 3 classes
    logits[0, 1] = torch.tensor([0.0, 0.0, 5.0])  # sample 1: view 0 far more confident, label 2
    probs = [softmax_rows(view.tolist()) for view in logits]
    expected_total, used = 0.0, 0
    confidences = []
    for i in range(2):
        maxes = [max(probs[v][i]) for v in (0, 1)]
        anchor = 0 if maxes[0] >= maxes[1] else 1
        confidences.append((max(maxes), anchor, probs[anchor][i].index(max(maxes))))
    threshold = sorted((c for c, _, _ in confidences), reverse=True)[1]  # quantile 0.5 of 2 samples
    for i, (confidence, anchor, label) in enumerate(confidences):
        if confidence < threshold:
            continue
        others = [1 - anchor, 2, 3]
        expected_total += sum(-math.log(probs[v][i][label]) for v in others) / 3
        used += 1
    loss, fraction = self_label_loss(logits, quantile=0.5)
    assert fraction.item() == pytest.approx(used / 2)
    assert loss.item() == pytest.approx(expected_total / used, rel=1e-5)


def test_self_label_loss_with_quantile_zero_uses_only_the_most_confident_sample():
    logits = torch.zeros(2, 3, 4)
    logits[0, 2, 1] = 4.0
    loss, fraction = self_label_loss(logits, quantile=0.0)
    assert fraction.item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(-math.log(math.exp(0) / 4), rel=1e-5)


@pytest.mark.parametrize("shape,message", [((1, 4, 3), "at least 2 views"), ((4, 3), "num_views, batch")])
def test_bad_logits_shape_is_rejected(shape, message):
    with pytest.raises(ValueError, match=message):
        twist_loss(torch.zeros(shape))
