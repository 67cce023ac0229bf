"""LARS and the training schedules against hand computations (docs/method.md §6)."""

import math

import pytest
import torch

from twist_hf.training.optim import LARS, TrainingSchedule, lars_trust_ratio

ETA, DECAY, MOMENTUM = 0.01, 0.1, 0.9


def norm(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def hand_lars(weights: list[float], grads: list[list[float]], lrs: list[float], adapt: bool = True) -> list[float]:
    """The authors' LARS in plain floats: buf = m * buf + lr * trust * (g + wd * w); w -= buf."""
    decay = DECAY if adapt else 0.0
    buffer = [0.0] * len(weights)
    for grad, lr in zip(grads, lrs):
        trust = ETA * norm(weights) / (norm(grad) + decay * norm(weights)) if adapt else 1.0
        update = [lr * trust * (g + decay * w) for g, w in zip(grad, weights)]
        buffer = [MOMENTUM * b + u for b, u in zip(buffer, update)]
        weights = [w - b for w, b in zip(weights, buffer)]
    return weights


def run_lars(weights: list[float], grads: list[list[float]], lrs: list[float], adapt: bool = True) -> list[float]:
    param = torch.nn.Parameter(torch.tensor(weights, dtype=torch.float64))
    group = {"params": [param], "weight_decay": DECAY if adapt else 0.0, "lars_adaptation": adapt}
    optimizer = LARS([group], lr=0.0, momentum=MOMENTUM, eta=ETA)
    for grad, lr in zip(grads, lrs):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
    return param.detach().tolist()


def test_first_lars_step_by_hand():
    # ||w|| = 5, ||g|| = 1: trust = 0.01 * 5 / (1 + 0.1 * 5) = 1/30; step = (g + 0.1 w) / 30 = [0.01, 0.14/3]
    assert run_lars([3.0, 4.0], [[0.0, 1.0]], [1.0]) == pytest.approx([2.99, 4.0 - 0.14 / 3])


@pytest.mark.parametrize("adapt", [True, False], ids=["adapted", "excluded"])
def test_lars_matches_the_authors_update_over_steps_with_a_changing_lr(adapt):
    grads = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-1.0, 1.0, 0.75]]
    lrs = [0.2, 1.0, 0.4]  # warm-up then decay: lr lives inside the momentum buffer
    start = [1.0, -2.0, 0.5]
    assert run_lars(start, grads, lrs, adapt) == pytest.approx(hand_lars(start, grads, lrs, adapt))


def test_lars_keeps_moving_on_momentum_when_the_lr_drops_to_zero():
    """lr inside the buffer: a step with lr 0 still applies 0.9 x the previous step (lr outside would not)."""
    first = run_lars([3.0, 4.0], [[0.0, 1.0]], [1.0])
    second = run_lars([3.0, 4.0], [[0.0, 1.0], [5.0, 5.0]], [1.0, 0.0])
    step = [a - b for a, b in zip([3.0, 4.0], first)]
    assert second == pytest.approx([f - MOMENTUM * s for f, s in zip(first, step)])


def test_lars_zero_norms():
    zero = torch.zeros(3)
    assert lars_trust_ratio(zero, torch.ones(3), DECAY, ETA).item() == 0.0  # a zero weight stays put
    assert run_lars([0.0, 0.0], [[1.0, 2.0]], [1.0]) == [0.0, 0.0]
    ratio = lars_trust_ratio(torch.ones(3), torch.zeros(3), 0.0, ETA)  # the authors' code divides by zero here
    assert ratio.item() == 1.0
    param = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = LARS([{"params": [param], "weight_decay": 0.0}], lr=1.0, eta=ETA)
    param.grad = torch.zeros(2)
    optimizer.step()
    assert param.tolist() == [1.0, 2.0]


def schedule(**overrides) -> TrainingSchedule:
    values = {
        "total_steps": 10,
        "self_label_steps": 4,
        "warmup_steps": 2,
        "self_label_warmup_steps": 2,
        "learning_rate": 1.0,
        "self_label_learning_rate": 0.5,
        "min_lr_ratio": 0.001,
        "weight_decay": 0.1,
        "weight_decay_end": 0.2,
        "teacher_momentum": 0.996,
        "self_label_quantile": (0.5, 0.6),
    }
    return TrainingSchedule(**{**values, **overrides})


def test_learning_rate_warms_up_from_zero_in_both_phases():
    lrs = [schedule().lr(step) for step in range(10)]
    # phase 1 (6 steps): 0, 1/2, then cosine from 1 to 0.001 over 4 steps; phase 2 restarts at 0 with peak 0.5
    expected = [0.0, 0.5, 1.0, 0.001 + 0.999 * (1 + math.cos(math.pi / 4)) / 2, 0.5005]
    expected += [0.001 + 0.999 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.25, 0.5, 0.5 * 0.5005]
    assert lrs == pytest.approx(expected)


def test_weight_decay_cosine_spans_every_epoch_including_self_labeling():
    values = schedule()
    assert values.weight_decay_at(0) == pytest.approx(0.1)
    assert values.weight_decay_at(5) == pytest.approx(0.15)  # half of the 10 steps, not of phase 1's 6
    assert values.weight_decay_at(8) == pytest.approx(0.2 - 0.1 * (1 + math.cos(0.8 * math.pi)) / 2)


def test_teacher_momentum_and_quantile_follow_their_phase():
    values = schedule()
    assert values.teacher_momentum_at(3) == pytest.approx(0.998)  # half of phase 1
    assert values.self_label_quantile_at(5) is None
    assert values.self_label_quantile_at(8) == pytest.approx(0.55)  # half of phase 2
