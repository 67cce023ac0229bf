"""Global-batch math across real processes: N gloo workers with B/N samples each == 1 process with B."""

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_in_processes
from torch.nn.parallel import DistributedDataParallel

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.distributed import (
    BunchBatchNorm,
    BunchLayout,
    DistributedBatchNorm2d,
    all_reduce_sum,
    bunch_layout,
)
from twist_hf.losses import self_label_loss, twist_loss

pytestmark = pytest.mark.slow

BATCH = 8


def make_views(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sizes = [16, 16, 8, 8]
    return [torch.randn(BATCH, 3, s, s, generator=generator) for s in sizes]


def make_model(**overrides) -> TwistForPreTraining:
    torch.manual_seed(0)
    return TwistForPreTraining(TwistConfig.from_preset("tiny-resnet", **overrides)).train()


def single_process_step(overrides: dict):
    model = make_model(**overrides)
    out = model(make_views())
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.loss.detach(), out.kl_loss.detach(), out.he_loss.detach(), grads


MODEL_CASES = [
    {"bunch_size": 8},  # the last norm's bunch spans both ranks
    {"bunch_size": 4},  # one bunch per rank; the single process normalises two chunks of 4
    {"last_norm": "global", "tau": 0.7, "lam1": -0.3},
    {"last_norm": "none", "head_norm": "layer_norm"},
]


def ddp_step(rank: int, world_size: int, overrides: dict):
    model = DistributedDataParallel(make_model(**overrides))
    share = BATCH // world_size
    views = [view[rank * share : (rank + 1) * share] for view in make_views()]
    out = model(views)
    out.loss.backward()
    grads = {name.removeprefix("module."): p.grad.clone() for name, p in model.named_parameters()}
    return out.loss.detach(), out.kl_loss.detach(), out.he_loss.detach(), grads


def two_rank_checks(rank: int, world_size: int):
    """Every 2-rank measurement of this file, in one process group (spawning costs seconds)."""
    x = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(4))
    logits = torch.randn(3, BATCH, 6, generator=torch.Generator().manual_seed(1))
    return {
        "models": [ddp_step(rank, world_size, overrides) for overrides in MODEL_CASES],
        "loss_grad": loss_and_input_grad(rank, world_size, logits),
        "bunch_grad": bunch_grad_step(rank, world_size, x),
        "sync_bn": sync_bn_step(rank, world_size, torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(5))),
        "bad_bunch": model_with_bad_bunch(rank, world_size),
        "self_label": self_label_step(rank, world_size, self_label_logits()),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_in_processes(two_rank_checks, 2)


@pytest.mark.parametrize("case", range(len(MODEL_CASES)), ids=[str(c) for c in MODEL_CASES])
def test_two_workers_match_one_process_through_the_whole_model(two_ranks, case):
    loss, kl, he, grads = single_process_step(MODEL_CASES[case])
    for result in two_ranks:
        rank_loss, rank_kl, rank_he, rank_grads = result["models"][case]
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_kl, kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_he, he, rtol=1e-5, atol=1e-6)
        assert rank_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_per_worker_batch_mean_would_be_a_different_loss():
    """Guard that the equivalence test can fail: a per-worker HE differs from the global one."""
    logits = torch.randn(2, BATCH, 5, generator=torch.Generator().manual_seed(3)) * 3
    global_he = twist_loss(logits).he
    local_he = (twist_loss(logits[:, :4]).he + twist_loss(logits[:, 4:]).he) / 2
    assert not torch.allclose(global_he, local_he, atol=1e-3)


def loss_and_input_grad(rank: int, world_size: int, logits: torch.Tensor):
    share = logits.shape[1] // world_size
    local = logits[:, rank * share : (rank + 1) * share].clone().requires_grad_()
    terms = twist_loss(local, tau=0.5)
    terms.loss.backward()
    return terms.loss.detach(), local.grad / world_size


def test_loss_gradient_reaches_every_worker_samples(two_ranks):
    full = torch.randn(3, BATCH, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    terms = twist_loss(full, tau=0.5)
    terms.loss.backward()
    grads = [result["loss_grad"][1] for result in two_ranks]
    torch.testing.assert_close(torch.cat(grads, dim=1), full.grad, rtol=1e-5, atol=1e-7)
    for result in two_ranks:
        torch.testing.assert_close(result["loss_grad"][0], terms.loss.detach())


def self_label_logits() -> torch.Tensor:
    """Two views of 8 samples: rank 0's half far more confident than rank 1's."""
    logits = torch.randn(3, BATCH, 5, generator=torch.Generator().manual_seed(6))
    logits[:2, : BATCH // 2, 0] += 6.0
    return logits


def self_label_step(rank: int, world_size: int, logits: torch.Tensor):
    share = logits.shape[1] // world_size
    loss, fraction = self_label_loss(logits[:, rank * share : (rank + 1) * share], quantile=0.5)
    return loss, fraction


def test_self_label_threshold_is_a_quantile_of_the_global_batch(two_ranks):
    """docs/method.md §4.2: every rank uses the threshold of the whole batch, so N ranks == 1 process,
    where the authors' per-rank threshold would keep half of each rank's samples."""
    logits = self_label_logits()
    loss, fraction = self_label_loss(logits, quantile=0.5)
    assert fraction.item() == pytest.approx(5 / 8)  # position 4 of 8 sorted descending, inclusive
    for result in two_ranks:
        torch.testing.assert_close(result["self_label"][0], loss)
        torch.testing.assert_close(result["self_label"][1], fraction)
    per_rank = [self_label_loss(logits[:, half], quantile=0.5)[1] for half in (slice(0, 4), slice(4, 8))]
    assert [f.item() for f in per_rank] == [pytest.approx(3 / 4)] * 2


def bunch_norm_step(rank: int, world_size: int, x: torch.Tensor, bunch_size: int):
    share = x.shape[1] // world_size
    local = x[:, rank * share : (rank + 1) * share].clone().requires_grad_()
    norm = BunchBatchNorm(x.shape[-1], mode="bunch", bunch_size=bunch_size)
    out = norm(local.reshape(-1, x.shape[-1]), num_views=x.shape[0])
    (out.reshape(local.shape) * torch.arange(x.shape[-1])).pow(2).sum().backward()
    return out.detach().reshape(local.shape), norm.running_mean.clone()


def test_bunch_norm_over_a_group_equals_batch_norm_over_the_group_batch():
    """4 ranks x 2 samples, bunch 4: ranks {0,1} and {2,3} each equal plain BN over their 4 samples."""
    x = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(2)) * 2 + 1
    results = run_in_processes(bunch_norm_step, 4, x, 4)
    for group in (0, 1):
        group_x = x[:, group * 4 : (group + 1) * 4].reshape(-1, 5)
        expected = F.batch_norm(group_x, None, None, training=True, eps=1e-5).reshape(2, 4, 5)
        got = torch.cat([results[2 * group][0], results[2 * group + 1][0]], dim=1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[2 * group][1], 0.1 * group_x.mean(0), rtol=1e-5, atol=1e-6)


def bunch_grad_step(rank, world_size, x):
    local = x[:, rank * 4 : (rank + 1) * 4].clone().requires_grad_()
    out = BunchBatchNorm(5, bunch_size=8)(local.reshape(-1, 5), num_views=2)
    loss = all_reduce_sum((out.reshape(2, 4, 5) * torch.arange(5)).pow(2).sum())
    loss.backward()
    return local.grad / world_size


def test_bunch_norm_gradient_matches_autograd_of_plain_batch_norm(two_ranks):
    x = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(4)).requires_grad_()
    expected = F.batch_norm(x.reshape(-1, 5), None, None, training=True, eps=1e-5)
    (expected.reshape(2, 8, 5) * torch.arange(5)).pow(2).sum().backward()
    grads = [result["bunch_grad"] for result in two_ranks]
    torch.testing.assert_close(torch.cat(grads, dim=1), x.grad, rtol=1e-4, atol=1e-5)


def test_single_process_bunch_norm_normalises_each_bunch_separately():
    x = torch.randn(2, 8, 3)
    out = BunchBatchNorm(3, bunch_size=4)(x.reshape(-1, 3), num_views=2).reshape(2, 8, 3)
    for chunk in (slice(0, 4), slice(4, 8)):
        expected = F.batch_norm(x[:, chunk].reshape(-1, 3), None, None, training=True, eps=1e-5)
        torch.testing.assert_close(out[:, chunk].reshape(-1, 3), expected, rtol=1e-5, atol=1e-5)


def sync_bn_step(rank, world_size, x):
    norm = DistributedBatchNorm2d(3)
    local = x[rank * 2 : (rank + 1) * 2].clone().requires_grad_()
    out = norm(local)
    all_reduce_sum((out * out.detach().sign()).sum()).backward()
    return out.detach(), local.grad / world_size, norm.running_var.clone()


def test_distributed_batch_norm_equals_batch_norm_over_all_ranks(two_ranks):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    reference = torch.nn.BatchNorm2d(3)
    x_ref = x.clone().requires_grad_()
    expected = reference(x_ref)
    (expected * expected.detach().sign()).sum().backward()
    results = [result["sync_bn"] for result in two_ranks]
    torch.testing.assert_close(torch.cat([r[0] for r in results]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][2], reference.running_var, rtol=1e-5, atol=1e-6)


def test_bunch_layout_of_several_bunches_per_rank():
    assert bunch_layout(8, 4, 1) == BunchLayout(chunk=4, ranks=1)
    assert bunch_layout(12, 4, 2) == BunchLayout(chunk=4, ranks=1)
    assert bunch_layout(4, 4, 8) == BunchLayout(chunk=4, ranks=1)


def test_bunch_layout_of_a_bunch_spanning_several_ranks():
    assert bunch_layout(2, 8, 4) == BunchLayout(chunk=2, ranks=4)
    assert bunch_layout(2, 8, 8) == BunchLayout(chunk=2, ranks=4)
    assert bunch_layout(32, 64, 6) == BunchLayout(chunk=32, ranks=2)


def test_bunch_layout_in_one_process_shrinks_a_multi_rank_bunch_to_the_local_batch():
    assert bunch_layout(2, 8, 1) == BunchLayout(chunk=2, ranks=1)


@pytest.mark.parametrize(
    ("batch", "bunch", "world", "message"),
    [
        (6, 4, 1, "per-device batch size 6 is not a multiple of bunch_size 4"),
        (3, 8, 2, "bunch_size 8 is not a multiple of the per-device batch size 3"),
        (2, 8, 2, "spans 4 ranks, which does not divide the 2 ranks"),
        (32, 128, 6, "spans 4 ranks, which does not divide the 6 ranks"),
    ],
)
def test_bunch_layout_that_does_not_fit_is_a_clear_error(batch, bunch, world, message):
    with pytest.raises(ValueError, match=message):
        bunch_layout(batch, bunch, world)


def model_with_bad_bunch(rank, world_size):
    model = make_model(bunch_size=8)
    views = [view[:2] for view in make_views()]  # 2 per rank: a bunch of 8 spans 4 ranks, only 2 exist
    try:
        model(views)
    except ValueError as error:
        return str(error)
    return "no error"


def test_bunch_that_does_not_divide_the_world_is_a_clear_error(two_ranks):
    messages = [result["bad_bunch"] for result in two_ranks]
    assert all("does not divide the 2 ranks" in message for message in messages)
