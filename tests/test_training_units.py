"""The run's parts one by one, on tiny in-memory data: the training step, views asked for in pieces with another
transform, the in-memory feature extractor and the cluster monitor, each against a hand computation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from twist_hf import TwistConfig, TwistForPreTraining
from twist_hf.data import DecodedImageDataset, SkippedImageCounter, collate_skipping_bad_images
from twist_hf.evaluation import cluster_metrics, image_features
from twist_hf.training import TrainingDivergedError, TrainingStep
from twist_hf.training import step as training_step
from twist_hf.training.data import BatchedViews, LabelledImages, SeededSamples, rank_epoch_stream
from twist_hf.training.monitors import ClusterMonitor
from twist_hf.training.optim import TrainingSchedule, build_optimizer
from twist_hf.training.step import mixed_precision, rank_step_seed
from twist_hf.transforms import BatchedMultiCrop, batched_eval_transform

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0) -> TwistForPreTraining:
    torch.manual_seed(seed)
    return TwistForPreTraining(TwistConfig.from_preset("tiny-resnet", bunch_size=8))


def schedule(**overrides) -> TrainingSchedule:
    values = {
        "total_steps": 10,
        "self_label_steps": 0,
        "warmup_steps": 4,
        "self_label_warmup_steps": 0,
        "learning_rate": 0.4,
        "self_label_learning_rate": 0.1,
        "min_lr_ratio": 0.0,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "teacher_momentum": 0.9,
        "self_label_quantile": (0.5, 0.5),
    }
    return TrainingSchedule(**{**values, **overrides})


def crops(global_size: int) -> BatchedMultiCrop:
    return BatchedMultiCrop(
        global_size=global_size,
        local_size=8,
        num_local_crops=0,
        mean=(0.5,),
        std=(0.5,),
        global_scale=(0.4, 1.0),
        local_scale=(0.1, 0.4),
        seed=0,
    )


def tiny_split(count: int = 40, seed: int = 0) -> LabelledImages:
    generator = np.random.default_rng(seed)
    images = generator.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    return LabelledImages(images, np.arange(count) % 4)


def test_training_step_sets_the_schedule_and_moves_the_teacher_by_its_momentum():
    model = tiny_model()
    teacher = tiny_model()
    teacher.requires_grad_(False)
    before = {name: value.clone() for name, value in teacher.named_parameters()}
    optimizer = build_optimizer(model, "sgd", 0.0, 1e-4)
    step = TrainingStep(model, optimizer, schedule(), Accelerator(cpu=True), teacher=teacher)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    output = step(1, views)
    assert torch.isfinite(output.loss)
    assert [group["lr"] for group in optimizer.param_groups] == [0.4 * 1 / 4] * 2  # warm-up from 0: step 1 of 4
    for name, student_value in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * student_value.detach()  # momentum at step 1 of 10 rounds to 0.9
        torch.testing.assert_close(dict(teacher.named_parameters())[name], expected, atol=1e-3, rtol=0)


def test_both_networks_train_and_the_teacher_keeps_its_own_batch_norm_statistics():
    """Left in eval mode (as `from_pretrained` returns them), student and teacher still train with batch statistics;
    the teacher's running statistics move by its own forward passes and are not the student's (the authors' EMA
    covers parameters only)."""
    model, teacher = tiny_model(0).eval(), tiny_model(1).eval()
    teacher.requires_grad_(False)
    running = [name for name, _ in model.named_buffers() if name.endswith("running_mean")]
    student_before, teacher_before = (dict(net.named_buffers()) for net in (model, teacher))
    student_before, teacher_before = ({n: v.clone() for n, v in b.items()} for b in (student_before, teacher_before))
    step = TrainingStep(model, build_optimizer(model, "sgd", 0.0, 0.0), schedule(), Accelerator(cpu=True), teacher)
    step(1, [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])
    assert model.training and teacher.training
    student_after, teacher_after = dict(model.named_buffers()), dict(teacher.named_buffers())
    assert running and all(not torch.equal(student_after[n], student_before[n]) for n in running)
    assert all(not torch.equal(teacher_after[n], teacher_before[n]) for n in running)
    assert all(not torch.equal(teacher_after[n], student_after[n]) for n in running)


def test_ranks_draw_different_random_streams_that_a_rerun_draws_again():
    """Drop path draws from torch's generator, seeded each step by (seed, rank, step)."""

    def draws(rank: int, step: int) -> torch.Tensor:
        torch.manual_seed(rank_step_seed(7, rank, step))
        return torch.rand(16)

    assert not torch.equal(draws(0, 3), draws(1, 3)) and not torch.equal(draws(0, 3), draws(0, 4))
    assert torch.equal(draws(1, 3), draws(1, 3))


def seeded_samples(rank: int, start: int = 0) -> SeededSamples:
    """Eight copies of one image, per-image multi-crop, this rank's stream of epoch 2."""
    import datasets
    from PIL import Image

    from twist_hf.transforms import MultiCropTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    features = datasets.Features({"image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image": [image] * 8}, features=features)
    transform = MultiCropTransform(global_size=16, local_size=8, num_local_crops=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    return SeededSamples(DecodedImageDataset(dataset, transform), start, 8, rank_epoch_stream(3, rank, 2))


def test_per_image_views_differ_by_rank_repeat_in_workers_and_skip_by_index():
    rank0, rank1 = seeded_samples(0), seeded_samples(1)
    views0 = [rank0[index]["pixel_values"] for index in range(8)]
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(views0, (rank1[i]["pixel_values"] for i in range(8))))
    assert not torch.equal(views0[0][0], views0[1][0])  # each sample its own draws
    loader = torch.utils.data.DataLoader(rank0, batch_size=4, num_workers=2, collate_fn=collate_skipping_bad_images)
    in_workers = [view for batch in loader for view in batch["pixel_values"][0]]
    assert all(torch.equal(a, b[0]) for a, b in zip(in_workers, views0))
    resumed = seeded_samples(0, start=4)
    assert len(resumed) == 4 and all(torch.equal(resumed[i]["pixel_values"][0], views0[4 + i][0]) for i in range(4))


def test_training_step_stops_before_touching_the_weights_on_a_non_finite_loss():
    model = tiny_model()
    weights = {name: value.clone() for name, value in model.named_parameters()}
    step = TrainingStep(model, build_optimizer(model, "sgd", 0.1, 0.0), schedule(), Accelerator(cpu=True))
    with pytest.raises(TrainingDivergedError, match="The loss became nan at step 3"):
        step(3, [torch.full((8, 3, 16, 16), float("nan"))] * 2)
    assert all(torch.equal(value, weights[name]) for name, value in model.named_parameters())


def test_an_epoch_asked_in_two_pieces_with_another_transform_for_the_second():
    split = tiny_split()
    views = BatchedViews(split, crops(16), 8, 0, 1, 0, SkippedImageCounter())
    whole = list(views.epoch(1))
    first = list(views.epoch(1, stop_step=2))
    second = list(views.epoch(1, skip_steps=2, transform=crops(12)))
    assert len(whole) == views.steps_per_epoch == 5 and len(first) == 2 and len(second) == 3
    assert all(torch.equal(a, b) for a, b in zip(whole[0] + whole[1], first[0] + first[1]))
    assert [view.shape[-1] for step in second for view in step] == [12] * 6
    assert list(views.epoch(1, stop_step=1))[0][0].shape[-1] == 16  # the views keep their own transform


def test_image_features_match_a_batched_forward_in_order_whatever_the_batch_size():
    model = tiny_model().twist.eval()
    split = tiny_split(10)
    small = image_features(model, split.images, split.labels, with_logits=True, batch_size=3)
    large = image_features(model, split.images, split.labels, with_logits=True, batch_size=64)
    config = model.config
    with torch.no_grad():
        expected = model(
            pixel_values=batched_eval_transform(
                torch.from_numpy(split.images), config.image_size, config.image_mean, config.image_std
            )
        )
    torch.testing.assert_close(small.features, expected.pooler_output)
    torch.testing.assert_close(large.logits, expected.logits)
    assert torch.equal(small.labels, torch.as_tensor(split.labels)) and model.training is False


def test_cluster_monitor_scores_the_heads_argmax_on_the_eval_split():
    model = tiny_model().twist
    queries = tiny_split(30, seed=1)
    metrics = ClusterMonitor(queries, model.config.num_classes).evaluate(model, Accelerator(cpu=True))
    outputs = image_features(model, queries.images, queries.labels, with_logits=True)
    expected = cluster_metrics(outputs.logits, outputs.labels, num_labels=4)
    assert metrics == {name: expected[name] for name in ("cluster_nmi", "cluster_acc", "cluster_ami", "cluster_ari")}
    with pytest.raises(ValueError, match="num_classes >= 4"):
        ClusterMonitor(queries, num_classes=3)


def test_gpu_benchmark_step_and_pretraining_run_without_ray_or_datasets():
    """benchmarks/gpu.py, the library step it times (here on the smoke workload) and its Fashion-MNIST pretraining
    run, in a process where `ray` and `datasets` cannot be imported (the GPU machine has neither)."""
    script = (
        "import sys; sys.modules.update(ray=None, datasets=None); sys.path.insert(0, 'benchmarks')\n"
        "import gpu, train_step, torch\n"
        "[workload] = train_step.workloads('smoke')\n"
        "variant = train_step.Variant('bf16', channels_last=True, bf16=True)\n"
        "train_step.make_step(workload, variant, torch.device('cpu'))()\n"
        "args = gpu.parse_args(['--device', 'cpu', '--tiny'])\n"
        "assert 0 < gpu.fashion_mnist_run(args, torch.device('cpu'))['knn_top1'] <= 1\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_falls_back_to_fp32_only_on_a_cpu_that_emulates_it(monkeypatch, caplog, native):
    monkeypatch.setattr(training_step, "cpu_runs_bf16_natively", lambda: native)
    assert mixed_precision(bf16=True, fp16=False, on_gpu=False) == ("bf16" if native else "no")
    assert ("neither AMX nor AVX512-BF16" in caplog.text) is not native
    assert mixed_precision(bf16=True, fp16=False, on_gpu=True) == "bf16"
    assert mixed_precision(bf16=False, fp16=True, on_gpu=False) == "fp16"
    assert mixed_precision(bf16=False, fp16=False, on_gpu=False) == "no"
