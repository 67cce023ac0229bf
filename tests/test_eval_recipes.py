"""Each evaluation protocol's defaults are the authors' for the matching backbone (docs/method.md §7.1),
checked on tiny models through the optimizer's lr, the batches the loaders used and the features' width; and
evaluation survives corrupt images."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.state import AcceleratorState
from test_eval_protocols import one_torch_thread  # noqa: F401 - the autouse fixture: one torch thread here too

from twist_hf import TwistConfig, TwistModel
from twist_hf.accelerator import fresh_accelerator
from twist_hf.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from twist_hf.evaluation import (
    EvalArguments,
    FeatureModel,
    LinearArguments,
    SemiArguments,
    load_feature_model,
    run_evaluation,
    subset_from_file,
)
from twist_hf.evaluation.finetune import linear_probe_recipe, per_process_batch_size

REPO = Path(__file__).resolve().parents[1]
VIT_WIDTH, VIT_DEPTH = 32, 5
SYNSETS = ("n01440764", "n01443537")


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist("test")


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_resnet")
    TwistModel(TwistConfig.from_preset("tiny-resnet")).save_pretrained(folder)
    return folder


def tiny_vit_config(width: int = VIT_WIDTH, depth: int = VIT_DEPTH) -> TwistConfig:
    """A TWIST model on a timm ViT, as the vit-s16 / vit-b16 presets build them, at toy size."""
    model_args = {"embed_dim": width, "depth": depth, "num_heads": 2, "img_size": 16, "patch_size": 8}
    backbone = {"model_type": "timm_wrapper", "architecture": "vit_small_patch16_224", "model_args": model_args}
    return TwistConfig(backbone_config=backbone, image_size=16, head_hidden_size=32, num_classes=16, bunch_size=8)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vit")
    TwistModel(tiny_vit_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, fashion):
    """An imagefolder laid out like ImageNet: train/<synset>/<synset>_<n>.JPEG, 10 per class, and a test split."""
    root = tmp_path_factory.mktemp("imagenet_like")
    for split, offset in (("train", 0), ("test", 100)):
        for label, synset in enumerate(SYNSETS):
            (root / split / synset).mkdir(parents=True)
            for n in range(10):
                image = fashion[offset + 10 * label + n]["image"].convert("RGB")
                image.save(root / split / synset / f"{synset}_{1000 + n}.JPEG")
    return root


def run_args(model: Path, dataset: Path, protocol: str, output_dir: Path) -> EvalArguments:
    return EvalArguments(
        model=str(model),
        dataset=str(dataset),
        protocol=protocol,
        output_dir=str(output_dir),
        batch_size=16,
        num_workers=0,
        update_model_card=False,
    )


def test_resnet_linear_probe_defaults_are_lr_0_2_unscaled_and_global_batch_1024(
    resnet_dir, image_folder, tmp_path, caplog
):
    args = run_args(resnet_dir, image_folder, "linear", tmp_path)
    args.reproduces = "ResNet-50 linear top-1 75.5"
    with caplog.at_level(logging.INFO, logger="twist_hf.evaluation"):
        metrics = run_evaluation(args, linear_args=LinearArguments(linear_mode="paper", linear_epochs=2))
    assert "reproduces: ResNet-50 linear top-1 75.5" in caplog.text
    assert metrics["linear_lr"] == pytest.approx(0.2)  # read off the optimizer: not 0.2 x 1024 / 256
    assert metrics["linear_batch_size"] == 1024 and metrics["linear_batch_size_per_process"] == 1024
    assert metrics["linear_feature_size"] == 16  # the pooled ResNet feature
    assert metrics["linear_best_top1"] >= metrics["linear_top1"] and metrics["linear_best_epoch"] in (1, 2)


def test_an_evaluation_after_a_bf16_run_in_the_same_process_evaluates_in_fp32(resnet_dir, image_folder, tmp_path):
    """A notebook that pretrains in bf16, then evaluates: Accelerate's process-wide state would refuse the
    evaluation's own precision ("AcceleratorState has already been initialized")."""
    fresh_accelerator(cpu=True, mixed_precision="bf16")
    metrics = run_evaluation(run_args(resnet_dir, image_folder, "knn", tmp_path))
    assert 0 <= metrics["knn_top1"] <= 1
    assert AcceleratorState().mixed_precision == "no"


def test_vit_linear_probe_uses_the_last_four_cls_tokens_and_the_vit_s_lr_scaled_by_batch(
    vit_dir, image_folder, tmp_path
):
    linear = LinearArguments(linear_mode="paper", linear_epochs=1, linear_batch_size=512)
    metrics = run_evaluation(run_args(vit_dir, image_folder, "linear", tmp_path), linear_args=linear)
    assert metrics["linear_lr"] == pytest.approx(0.02 * 512 / 256)
    assert metrics["linear_batch_size"] == 512 and metrics["linear_feature_size"] == 4 * VIT_WIDTH
    fast = run_evaluation(
        run_args(vit_dir, image_folder, "linear", tmp_path), linear_args=LinearArguments(linear_epochs=2)
    )
    assert fast["linear_feature_size"] == 4 * VIT_WIDTH


def test_vit_b_width_gets_the_vit_b_lr_and_other_backbones_keep_one_feature(resnet_dir):
    torch.manual_seed(0)
    vit_b = FeatureModel(TwistModel(tiny_vit_config(width=768, depth=4)).eval())
    recipe = linear_probe_recipe(vit_b)
    assert recipe.lr == pytest.approx(0.0015 * 1024 / 256) and recipe.cls_blocks == 4
    resnet, _ = load_feature_model(str(resnet_dir))
    assert linear_probe_recipe(resnet, global_batch_size=256).lr == 0.2 and linear_probe_recipe(resnet).cls_blocks == 1
    with pytest.raises(ValueError, match="needs a timm Vision Transformer"):
        resnet.with_cls_blocks(4)
    with pytest.raises(ValueError, match="--linear_cls_blocks 4: only Vision Transformers"):
        linear_probe_recipe(resnet, cls_blocks=4)
    with pytest.raises(ValueError, match="--linear_cls_blocks 5: this ViT has only 4 blocks"):
        linear_probe_recipe(vit_b, cls_blocks=5)


def test_four_block_features_are_the_final_norm_cls_token_of_each_of_the_last_four_blocks(vit_dir):
    model, _ = load_feature_model(str(vit_dir))
    pixels = torch.randn(3, 3, 16, 16)
    vit = model.vision_transformer
    with torch.inference_mode():
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
        cls_per_block = []
        for block in vit.blocks:
            tokens = block(tokens)
            cls_per_block.append(vit.norm(tokens)[:, 0])
        four, _ = model.with_cls_blocks(4)(pixels)
        final, _ = model(pixels)
    torch.testing.assert_close(four, torch.cat(cls_per_block[-4:], dim=1))
    torch.testing.assert_close(four[:, -VIT_WIDTH:], final)  # the last block's CLS is the usual feature


def test_global_batches_split_evenly_over_processes():
    assert per_process_batch_size(1024, 4) == 256 and per_process_batch_size(256, 8) == 32
    with pytest.raises(ValueError, match="--semi_batch_size 256 is the global batch, split over 3 processes"):
        per_process_batch_size(256, 3, "--semi_batch_size")


def test_semi_supervised_on_an_image_list_uses_the_10pct_recipe_unscaled_at_global_batch_256(
    resnet_dir, image_folder, tmp_path
):
    listed = [f"{SYNSETS[0]}_1003.JPEG", f"{SYNSETS[1]}_1007.JPEG"]  # 2 of 20 images: the 10% recipe
    (tmp_path / "10percent.txt").write_text("\n".join(listed) + "\n")
    semi = SemiArguments(semi_subset_files=[str(tmp_path / "10percent.txt")], semi_epochs=2)
    metrics = run_evaluation(run_args(resnet_dir, image_folder, "semi", tmp_path), semi_args=semi)
    assert metrics["semi_10pct_backbone_lr"] == pytest.approx(0.02) and metrics["semi_10pct_head_lr"] == 0.2
    assert metrics["semi_10pct_batch_size"] == 256 and metrics["semi_10pct_batch_size_per_process"] == 256
    assert metrics["semi_10pct_best_top1"] >= metrics["semi_10pct_top1"]


def test_image_lists_match_the_hub_imagenet_file_names_with_their_synset_suffix(fashion, tmp_path):
    for synset in SYNSETS:
        (tmp_path / "train" / synset).mkdir(parents=True)
        for n in range(3):
            fashion[n]["image"].save(tmp_path / "train" / synset / f"{synset}_{n}_{synset}.JPEG")
    from datasets import load_dataset

    train = load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    (tmp_path / "list.txt").write_text(f"{SYNSETS[1]}_2.JPEG\n{SYNSETS[0]}_0.JPEG\n")
    rows = subset_from_file(train, str(tmp_path / "list.txt"), "image")
    assert sorted(train[int(i)]["label"] for i in rows) == [0, 1] and len(rows) == 2


def test_evaluation_resizes_bilinearly_as_the_authors_evaluation(resnet_dir):
    _, processor = load_feature_model(str(resnet_dir))
    image = PIL.Image.fromarray((np.random.default_rng(0).random((28, 40, 3)) * 255).astype(np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]

    def resized(resample: int) -> torch.Tensor:
        array = np.asarray(image.resize((16, 16), resample), dtype=np.float32) / 255
        return (torch.from_numpy(array).permute(2, 0, 1) - mean) / std

    assert (pixels - resized(PIL.Image.Resampling.BILINEAR)).abs().max() < 2 / 255 / std.min()
    assert (pixels - resized(PIL.Image.Resampling.BICUBIC)).abs().max() > 0.05


@pytest.fixture
def folder_with_corrupt_images(tmp_path, fashion):
    """A small imagefolder with one corrupt PNG in each split."""
    root = tmp_path / "data"
    for split, rows in (("train", range(30)), ("test", range(100, 120))):
        for row in rows:
            example = fashion[row]
            folder = root / split / FASHION_MNIST_CLASSES[example["label"]].replace("/", "_")
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{row:05d}.png")
        (folder / "corrupt.png").write_bytes(b"this is not a PNG file")
    return root


@pytest.mark.slow
def test_evaluate_cli_skips_and_counts_corrupt_images(resnet_dir, folder_with_corrupt_images, tmp_path):
    command = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", str(resnet_dir)]
    command += ["--dataset", str(folder_with_corrupt_images), "--protocol", "knn", "--knn_k", "3"]
    command += ["--output_dir", str(tmp_path / "out"), "--num_workers", "0", "--batch_size", "8"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed["eval_skipped_images"] == 2 and 0 <= printed["eval_knn_top1"] <= 1
    assert "Skipped 2 undecodable images" in done.stderr and "corrupt.png" in done.stderr
