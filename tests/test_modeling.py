"""The TWIST model family: presets, outputs, Auto classes, remote code, pipelines and bad input."""

import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, ResNetConfig, pipeline

from twist_hf import (
    TWIST_PRESETS,
    TwistConfig,
    TwistForImageClassification,
    TwistForPreTraining,
    TwistModel,
)
from twist_hf.configuration_twist import TWIST_AUTO_MAP
from twist_hf.distributed import BunchBatchNorm, DistributedBatchNorm2d
from twist_hf.model_card import model_config_summary, write_model_card


def tiny_config(**overrides) -> TwistConfig:
    return TwistConfig.from_preset("tiny-resnet", **overrides)


@pytest.mark.parametrize("name", list(TWIST_PRESETS))
def test_every_preset_builds_and_runs(name):
    config = TwistConfig.from_preset(name)
    model = TwistModel(config).eval()
    size = 32 if config.image_size <= 32 else 96
    with torch.inference_mode():
        out = model(torch.randn(2, 3, size, size))
    assert out.pooler_output.shape == (2, model.feature_size)
    assert out.logits.shape == (2, config.num_classes)


def test_preset_feature_sizes_follow_the_paper():
    sizes = {
        name: TwistModel(TwistConfig.from_preset(name, head_hidden_size=8, num_classes=4)).feature_size
        for name in ("resnet50", "resnet50w2", "vit-s16", "vit-b16")
    }
    assert sizes == {"resnet50": 2048, "resnet50w2": 4096, "vit-s16": 384, "vit-b16": 768}


def test_vit_presets_carry_the_recipe_details():
    small, base = TwistConfig.from_preset("vit-s16"), TwistConfig.from_preset("vit-b16")
    assert base.backbone_config.model_args["drop_path_rate"] == 0.1
    assert small.backbone_config.model_args["dynamic_img_size"]  # 96 px local crops interpolate pos-embed
    assert (small.head_activation, small.head_init, small.lam1) == ("gelu", "trunc_normal", -0.6)
    model = TwistModel(TwistConfig.from_preset("vit-s16", head_hidden_size=16, num_classes=8))
    linear = model.head.projection_head[0]
    assert linear.bias.abs().max() == 0 and linear.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_vit_initialisation_is_the_authors():
    """docs/method.md §2.3: DINO's init. timm draws the CLS token with std 1e-6 and HF's init gives the
    patch convolution N(0, 0.02) with zero bias; the authors leave the convolution at PyTorch's default."""
    vit = TwistModel(TwistConfig.from_preset("vit-s16", head_hidden_size=16, num_classes=8)).backbone.timm_model
    assert vit.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    bound = 1 / vit.patch_embed.proj.weight[0].numel() ** 0.5
    for tensor in (vit.patch_embed.proj.weight, vit.patch_embed.proj.bias):
        assert tensor.abs().max().item() <= bound and tensor.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    qkv, norm = vit.blocks[0].attn.qkv, vit.blocks[0].norm1
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05) and qkv.bias.abs().max() == 0
    assert norm.weight.eq(1).all() and norm.bias.eq(0).all() and norm.eps == 1e-6
    assert type(pickle.loads(pickle.dumps(vit))) is type(vit)  # Ray and deepcopy (the teacher) keep the behaviour


def test_head_layer_norm_uses_the_authors_eps():
    head = TwistModel(tiny_config(head_norm="layer_norm")).head.projection_head
    assert head[1].eps == head[5].eps == 1e-6


def test_loss_path_stays_fp32_under_bf16_autocast():
    """The last norm's output and the loss are fp32 even when the head's Linears run in bf16."""
    model = TwistForPreTraining(tiny_config()).train()
    views = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(views)
    assert out.unnormalized_logits.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    raw = out.unnormalized_logits.float().reshape(16, -1)  # one bunch of 8 samples x 2 views
    expected = ((raw - raw.mean(0)) / (raw.var(0, unbiased=False) + 1e-5).sqrt()).view(2, 8, -1)
    torch.testing.assert_close(out.logits, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, model.compute_loss(expected).loss, rtol=1e-6, atol=1e-7)


def test_multicrop_pretraining_forward_compiles_into_one_graph():
    """`torch_compile: true` recipes get the whole forward (backbone, head, fp32 last norm, loss) as one graph."""
    model = TwistForPreTraining(tiny_config()).train()
    views = [torch.randn(4, 3, size, size) for size in (32, 32, 16, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(views)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_resnet_keeps_its_own_initialisation():
    """Same seed, same draws: TWIST's backbone holds exactly what Hugging Face's ResNet draws when built alone,
    so a re-initialisation by TWIST (even with the same kaiming distribution) is caught."""
    config = TwistConfig.from_preset("resnet50", head_hidden_size=8, num_classes=4)
    torch.manual_seed(0)
    inside = TwistModel(config).backbone.state_dict()
    torch.manual_seed(0)
    alone = AutoModel.from_config(config.backbone_config).state_dict()
    assert inside.keys() == alone.keys()
    for name, tensor in alone.items():
        torch.testing.assert_close(inside[name], tensor, rtol=0, atol=0, msg=name)


def test_pretraining_output_shapes_and_terms():
    model = TwistForPreTraining(tiny_config()).train()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    out = model(views)
    assert out.logits.shape == (3, 4, 16) and out.pooler_output.shape == (3, 4, 16)
    expected = out.kl_loss + out.eh_loss - out.he_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_same_resolution_views_share_one_backbone_forward():
    model = TwistForPreTraining(tiny_config()).train()
    calls = []
    model.twist.backbone.register_forward_hook(lambda module, args, output: calls.append(args))
    views = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 3
    model(views)
    assert len(calls) == 2


def test_momentum_and_self_label_losses_through_the_model():
    model = TwistForPreTraining(tiny_config()).train()
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)]
    teacher = torch.randn(2, 4, 16)
    out = model(views, teacher_logits=teacher)
    torch.testing.assert_close(out.loss, model.compute_loss(out.logits, teacher).loss)
    labeled = model(views, self_label_quantile=0.5)
    assert labeled.loss.item() > 0 and 0.5 <= labeled.self_label_fraction.item() <= 1.0


def test_batch_norms_are_synchronised_versions_only_when_asked():
    synced = TwistForPreTraining(tiny_config())
    plain = TwistForPreTraining(tiny_config(sync_batch_norm=False))
    assert any(isinstance(m, DistributedBatchNorm2d) for m in synced.modules())
    assert not any(isinstance(m, DistributedBatchNorm2d) for m in plain.modules())
    assert isinstance(synced.twist.head.norm, BunchBatchNorm)


def test_head_state_dict_uses_the_reference_layout():
    keys = set(TwistModel(tiny_config()).state_dict())
    for key in (
        "head.projection_head.0.weight",
        "head.projection_head.1.running_var",
        "head.projection_head.4.bias",
        "head.projection_head.5.weight",
        "head.last_linear.weight",
        "head.norm.running_mean",
    ):
        assert key in keys
    assert not any(key.startswith("head.norm.weight") for key in keys)


@pytest.mark.parametrize(
    "views,message",
    [
        ([torch.randn(4, 3, 16, 16)], "at least two augmented views"),
        ([torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)], "same batch size"),
    ],
)
def test_bad_views_are_rejected(views, message):
    with pytest.raises(ValueError, match=message):
        TwistForPreTraining(tiny_config())(views)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"tau": 0.0}, "tau must be > 0"),
        ({"eps": -1.0}, "eps must be > 0"),
        ({"num_classes": 1}, "num_classes"),
        ({"last_norm": "layer"}, "last_norm must be one of"),
        ({"head_norm": "group_norm"}, "head_norm must be one of"),
    ],
)
def test_bad_config_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_preset_and_backbone_type_are_rejected():
    with pytest.raises(ValueError, match="TWIST preset must be one of 'resnet50'.*got 'resnet-9000'"):
        TwistConfig.from_preset("resnet-9000")
    with pytest.raises(ValueError, match="Unknown backbone type 'resnot'"):
        TwistConfig(backbone_config={"model_type": "resnot"})


def test_any_hf_backbone_config_can_be_swapped_in():
    config = TwistConfig(
        backbone_config={"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
        head_hidden_size=16,
        num_classes=8,
    )
    out = TwistModel(config).eval()(torch.randn(2, 3, 64, 64))
    assert out.pooler_output.shape == (2, 32)
    vit = TwistConfig(
        backbone_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 32,
            "patch_size": 8,
        },
        head_hidden_size=16,
        num_classes=8,
    )
    assert TwistModel(vit).eval()(torch.randn(2, 3, 32, 32)).pooler_output.shape == (2, 32)


def test_loading_a_folder_that_is_not_twist_is_a_clear_error(tmp_path):
    ResNetConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="twist"):
        TwistModel.from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-twist")
    torch.manual_seed(0)
    model = TwistForPreTraining(tiny_config()).train()
    for _ in range(2):  # move running stats away from their initial values
        model([torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)])
    model.eval().save_pretrained(folder)
    return folder, model


def test_saved_folder_has_weights_code_and_processor(saved_model):
    folder, _ = saved_model
    names = {path.name for path in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "configuration_twist.py",
        "modeling_twist.py",
        "losses.py",
        "distributed.py",
    } <= names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_twist.TwistModel"
    assert auto_map["AutoConfig"] == "configuration_twist.TwistConfig"


def test_a_foreign_auto_map_warns_on_load_and_is_not_passed_on(saved_model, tmp_path, caplog):
    """A folder whose config points an Auto class at someone else's code (issue 12, item 7)."""
    folder = shutil.copytree(saved_model[0], tmp_path / "downloaded")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {**config["auto_map"], "AutoModel": "attacker/repo--modeling.Evil", "AutoTokenizer": "x.Y"}
    (folder / "config.json").write_text(json.dumps(config))

    with caplog.at_level("WARNING"):
        model = TwistForPreTraining.from_pretrained(folder)
    assert "attacker/repo--modeling.Evil" in caplog.text and "not TWIST's own classes" in caplog.text
    out = tmp_path / "trained"
    model.save_pretrained(out)
    write_model_card(out, model_id="me/twist", config_summary=model_config_summary(model.config), training_summary={})
    assert json.loads((out / "config.json").read_text())["auto_map"] == TWIST_AUTO_MAP
    assert not [path.name for path in out.iterdir() if "attacker" in path.read_text(errors="replace")]


def test_pretraining_checkpoint_loads_as_twist_model_with_identical_outputs(saved_model):
    folder, pretraining = saved_model
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, TwistModel)
    pixels = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        expected = pretraining.twist(pixels)
        got = model(pixels)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output)


def test_classifier_carries_the_pretrained_backbone(saved_model):
    folder, pretraining = saved_model
    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=5)
    assert isinstance(classifier, TwistForImageClassification)
    for name, tensor in pretraining.twist.backbone.state_dict().items():
        torch.testing.assert_close(classifier.twist.backbone.state_dict()[name], tensor)
    out = classifier(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 4]))
    assert out.logits.shape == (2, 5) and out.loss.item() > 0


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    BLOCK_PACKAGE = {block}
    if BLOCK_PACKAGE:
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "twist_hf" or name.startswith("twist_hf."):
                    raise ImportError("twist_hf is blocked in this process")
        sys.meta_path.insert(0, Block())
    else:
        import twist_hf
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=BLOCK_PACKAGE).eval()
    torch.manual_seed(1)
    with torch.inference_mode():
        out = model(torch.randn(3, 3, 16, 16))
    torch.save({{"logits": out.logits, "features": out.pooler_output, "cls": type(model).__module__}}, sys.argv[2])
""")


@pytest.mark.slow
@pytest.mark.parametrize("block_package", [False, True], ids=["with-package", "trust-remote-code"])
def test_fresh_process_loads_identical_model(saved_model, tmp_path, block_package):
    folder, pretraining = saved_model
    result_file = tmp_path / "out.pt"
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS.format(block=block_package), str(folder), str(result_file)],
        check=True,
        cwd=tmp_path,
    )
    result = torch.load(result_file)
    torch.manual_seed(1)
    with torch.inference_mode():
        expected = pretraining.twist(torch.randn(3, 3, 16, 16))
    torch.testing.assert_close(result["logits"], expected.logits)
    torch.testing.assert_close(result["features"], expected.pooler_output)
    assert result["cls"].startswith("transformers_modules") == block_package


def test_auto_config_round_trip(saved_model):
    folder, _ = saved_model
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, TwistConfig) and config.num_classes == 16 and config.small_image_stem


def test_pipelines_run_on_a_small_model(saved_model, tmp_path):
    folder, _ = saved_model
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(folder))
    features = extractor(image, pool=True)
    assert np.asarray(features).shape[-1] == 16
    classifier = TwistForImageClassification.from_pretrained(
        folder,
        num_labels=3,
        id2label={0: "shirt", 1: "boot", 2: "bag"},
        label2id={"shirt": 0, "boot": 1, "bag": 2},
    )
    classifier.save_pretrained(tmp_path)
    predictions = pipeline("image-classification", model=str(tmp_path))(image)
    assert {p["label"] for p in predictions} == {"shirt", "boot", "bag"}
