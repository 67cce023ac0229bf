"""Converting the TWIST authors' checkpoints. Reference networks are built in the authors' layout (torchvision
ResNets, timm ViTs, a `projection_heads` head) and saved as they save them; once converted they must give
the same features and logits, and broken or unsafe files must fail loudly."""

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hub_server import PUSHED_MODEL_FILES, TEST_TOKEN, TEST_USER, client_env, start_hub_server
from huggingface_hub import HfApi, constants, hf_hub_download
from timm.layers import resample_abs_pos_embed
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import AutoModel

from twist_hf import TwistModel
from twist_hf.convert_official_checkpoint import (
    FRESH_HEAD_NOTE,
    ConversionError,
    conversion_files,
    convert_official_checkpoint,
    main,
    push_conversion,
    resolve_architecture,
)
from twist_hf.model_card import model_config_summary

K, H = 24, 40


class ReferenceHead(nn.Module):
    """The authors' head layout: indices 0/1/4/5 of `projection_head`, `last_linear`, non-affine `norm`."""

    def __init__(self, features: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.projection_head = nn.Sequential(
            nn.Linear(features, H),
            nn.BatchNorm1d(H),
            activation(),
            nn.Dropout(0.0),
            nn.Linear(H, H),
            nn.BatchNorm1d(H),
            activation(),
        )
        self.last_linear = nn.Linear(H, K)
        self.norm = nn.BatchNorm1d(K, affine=False)

    def forward(self, features):
        return self.norm(self.last_linear(self.projection_head(features)))


class ReferenceNetwork(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.backbone = backbone
        self.projection_heads = ReferenceHead(features, activation)

    def forward(self, pixels):
        features = self.backbone(pixels)
        return features, self.projection_heads(features)


@torch.no_grad()
def randomise(network: nn.Module, seed: int) -> nn.Module:
    """Move every parameter and batch-norm statistic away from its initial value, so that no tensor can
    be mistaken for a freshly initialised one."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in network.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.num_batches_tracked.fill_(7)
    return network.eval()


def torchvision_resnet50() -> nn.Module:
    backbone = resnet50()
    backbone.fc = nn.Identity()
    return backbone


def widened_resnet(stem: int, depths=(1, 1, 1, 1)) -> nn.Module:
    """A torchvision-named ResNet whose every width is scaled as in the authors' ResNet-50w2
    (stem `stem`, stage outputs 4x stem, 8x, 16x, 32x)."""
    backbone = ResNet(Bottleneck, [1, 1, 1, 1])
    backbone.inplanes = stem
    backbone.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    backbone.bn1 = nn.BatchNorm2d(stem)
    for index, depth in enumerate(depths):
        stride = 1 if index == 0 else 2
        setattr(backbone, f"layer{index + 1}", backbone._make_layer(Bottleneck, stem * 2**index, depth, stride))
    backbone.fc = nn.Identity()
    return backbone


def vit(depth: int = 2, img_size: int = 224, name: str = "vit_small_patch16_224") -> nn.Module:
    return timm.create_model(name, depth=depth, img_size=img_size, num_classes=0)


def reference(backbone: nn.Module, features: int, seed: int = 0, activation=nn.ReLU) -> ReferenceNetwork:
    torch.manual_seed(seed)
    return randomise(ReferenceNetwork(backbone, features, activation), seed)


def save_full(
    path,
    network: nn.Module,
    *,
    args: dict | None = None,
    module_prefix: bool = False,
    teacher: nn.Module | None = None,
):
    """A full checkpoint as the authors' training script writes it."""
    prefix = "module." if module_prefix else ""
    content = {
        "model": {prefix + key: value for key, value in network.state_dict().items()},
        "backbone": network.backbone.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(**(args or {})),
    }
    if teacher is not None:
        content["teacher"] = teacher.state_dict()
        content["teacher_backbone"] = teacher.backbone.state_dict()
    torch.save(content, path)
    return path


def save_backbone_only(path, backbone: nn.Module, under: str | None = None):
    state = backbone.state_dict()
    torch.save(state if under is None else {under: state}, path)
    return path


def outputs(model: TwistModel, pixels: torch.Tensor):
    with torch.inference_mode():
        out = model(pixels)
    return out.pooler_output, out.logits


def reference_outputs(network: ReferenceNetwork, pixels: torch.Tensor):
    with torch.inference_mode():
        return network(pixels)


def assert_same_outputs(model: TwistModel, network: ReferenceNetwork, pixels: torch.Tensor) -> None:
    """Converted features and logits equal the reference backbone's output and its head's eval-mode output."""
    features, logits = outputs(model, pixels)
    expected_features, expected_logits = reference_outputs(network, pixels)
    torch.testing.assert_close(features, expected_features)
    torch.testing.assert_close(logits, expected_logits)


@pytest.fixture(scope="module")
def resnet50_reference():
    return reference(torchvision_resnet50(), 2048)


@pytest.fixture(scope="module")
def small_resnet_checkpoint(tmp_path_factory):
    network = reference(widened_resnet(16), 512, seed=1)
    path = tmp_path_factory.mktemp("small-resnet") / "full.pth"
    return save_full(path, network, args={"dim": K, "hid_dim": H}), network


@pytest.fixture(scope="module")
def vit_reference():
    return reference(vit(), 384, seed=2, activation=nn.GELU)


def test_full_resnet50_checkpoint_gives_the_reference_features_and_logits(resnet50_reference, tmp_path):
    args = {"dim": K, "hid_dim": H, "tau": 0.5, "lam2": 1.5, "bunch_size": 128, "epochs": 800, "lr": 0.5}
    path = save_full(tmp_path / "full.pth", resnet50_reference, args=args, module_prefix=True)
    conversion = convert_official_checkpoint(path)
    assert_same_outputs(conversion.model, resnet50_reference, torch.randn(2, 3, 64, 64))

    config = conversion.model.config
    assert conversion.architecture.preset == "resnet50" and conversion.architecture.matches_preset
    assert (config.num_classes, config.head_hidden_size, config.tau, config.lam2) == (K, H, 0.5, 1.5)
    assert (config.bunch_size, config.lam1, config.head_activation) == (128, 0.0, "relu")
    assert config.converted_from["head"] == "converted from the checkpoint"
    assert config.converted_from["epoch"] == 3
    assert config.converted_from["network"] == "student network (`model` entry)"
    assert "lam1 = 0.0: not in the checkpoint, preset default" in conversion.notes


def test_backbone_only_resnet50_keeps_the_features_and_gets_a_fresh_head(resnet50_reference, tmp_path):
    path = save_backbone_only(tmp_path / "backbone.pth", resnet50_reference.backbone, under="backbone")
    conversion = convert_official_checkpoint(path, num_classes=16, head_hidden_size=8)
    pixels = torch.randn(2, 3, 64, 64)
    features, logits = outputs(conversion.model, pixels)
    torch.testing.assert_close(features, reference_outputs(resnet50_reference, pixels)[0])
    assert logits.shape == (2, 16)
    head = conversion.model.head
    assert head.projection_head[0].weight.shape == (8, 2048)
    assert head.norm.num_batches_tracked.item() == 0 and torch.all(head.norm.running_var == 1)
    assert conversion.model.config.converted_from["head"] == FRESH_HEAD_NOTE
    assert conversion.model.config.converted_from["network"] == "backbone only (`backbone` entry)"
    assert any(note.startswith("WARNING: the TWIST head is freshly initialised") for note in conversion.notes)


@pytest.mark.slow
def test_wide_resnet_converts_with_its_doubled_widths(tmp_path):
    network = reference(widened_resnet(128), 4096, seed=3)
    conversion = convert_official_checkpoint(save_full(tmp_path / "w2.pth", network))
    pixels = torch.randn(2, 3, 64, 64)
    assert_same_outputs(conversion.model, network, pixels)
    assert conversion.architecture.preset == "resnet50w2"
    assert not conversion.architecture.matches_preset  # one block per stage instead of 3, 4, 6, 3
    assert conversion.model.config.backbone_config.depths == [1, 1, 1, 1]


def test_the_papers_architectures_are_detected_from_their_keys():
    with torch.device("meta"):
        backbones = {
            "resnet50": torchvision_resnet50(),
            "resnet50w2": widened_resnet(128, depths=(3, 4, 6, 3)),
            "vit-s16": vit(depth=12),
            "vit-b16": vit(depth=12, name="vit_base_patch16_224"),
        }
    for preset, backbone in backbones.items():
        architecture = resolve_architecture(backbone.state_dict())
        assert (architecture.preset, architecture.matches_preset) == (preset, True)


@pytest.mark.parametrize("use_teacher", [False, True], ids=["student", "teacher"])
def test_full_vit_checkpoint_gives_the_reference_outputs(vit_reference, tmp_path, use_teacher):
    teacher = randomise(copy.deepcopy(vit_reference), seed=5)
    args = {"dim": K, "hid_dim": H, "lam1": -0.5, "drop_path": 0.1, "local_crops_number": 6}
    path = save_full(tmp_path / "vit.pth", vit_reference, args=args, teacher=teacher)
    conversion = convert_official_checkpoint(path, use_teacher=use_teacher)
    expected_network = teacher if use_teacher else vit_reference
    pixels = torch.randn(2, 3, 224, 224)
    assert_same_outputs(conversion.model, expected_network, pixels)
    config = conversion.model.config
    assert config.backbone_config.model_args == {"dynamic_img_size": True, "drop_path_rate": 0.1, "depth": 2}
    assert (config.head_activation, config.lam1) == ("gelu", -0.5)
    assert conversion.architecture.preset == "vit-s16"
    assert config.converted_from["network"].startswith("momentum teacher" if use_teacher else "student")


def test_vit_keeps_the_position_grid_it_was_trained_with(tmp_path):
    network = reference(vit(img_size=64), 384, seed=6, activation=nn.GELU)
    conversion = convert_official_checkpoint(save_backbone_only(tmp_path / "vit.pth", network.backbone, "state_dict"))
    assert conversion.model.config.backbone_config.model_args["img_size"] == 64
    pixels = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(outputs(conversion.model, pixels)[0], reference_outputs(network, pixels)[0])
    assert outputs(conversion.model, torch.randn(1, 3, 96, 96))[0].shape == (
        1,
        384,
    )  # other sizes interpolate


def dino_position_embedding(pos_embed: torch.Tensor, height: int, width: int, patch: int = 16) -> torch.Tensor:
    """The authors' (DINO's) `interpolate_pos_encoding`: bicubic with scale ((side // patch + 0.1) / sqrt(N))."""
    patches, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = int(math.sqrt(patches))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((height // patch + 0.1) / math.sqrt(patches), (width // patch + 0.1) / math.sqrt(patches))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def dino_features(backbone: nn.Module, pixels: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """The authors' ViT forward (patches, CLS, position embedding, blocks, final norm, CLS token)."""
    with torch.inference_mode():
        tokens = backbone.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([backbone.cls_token.expand(len(pixels), -1, -1), tokens], dim=1) + pos_embed
        return backbone.norm(backbone.blocks(tokens))[:, 0]


def test_a_converted_vit_gives_the_authors_features_on_96_pixel_crops(vit_reference, tmp_path):
    conversion = convert_official_checkpoint(save_full(tmp_path / "vit.pth", vit_reference, args={"act": "gelu"}))
    pixels = torch.randn(2, 3, 96, 96)
    backbone = vit_reference.backbone
    expected = dino_features(backbone, pixels, dino_position_embedding(backbone.pos_embed, 96, 96))
    torch.testing.assert_close(outputs(conversion.model, pixels)[0], expected)
    timm_default = resample_abs_pos_embed(backbone.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    assert not torch.allclose(dino_features(backbone, pixels, timm_default), expected, atol=1e-3)


def test_the_head_activation_comes_from_the_checkpoints_args(tmp_path):
    network = reference(widened_resnet(16), 512, seed=8, activation=nn.GELU)
    conversion = convert_official_checkpoint(save_full(tmp_path / "gelu.pth", network, args={"act": "gelu"}))
    assert conversion.model.config.head_activation == "gelu"
    assert "head_activation = gelu: from args.act = 'gelu'" in conversion.notes
    assert_same_outputs(conversion.model, network, torch.randn(2, 3, 64, 64))


def _without(state: dict, key: str) -> dict:
    return {name: value for name, value in state.items() if name != key}


TAMPERINGS = {
    "extra key": (lambda state: {**state, "backbone.extra.weight": torch.zeros(3)}, "backbone.extra.weight"),
    "missing key": (
        lambda state: _without(state, "backbone.layer2.0.bn1.running_var"),
        "backbone.encoder.stages.1.layers.0.layer.0.normalization.running_var",
    ),
    "wrong shape": (
        lambda state: {**state, "projection_heads.last_linear.bias": torch.zeros(K + 1)},
        f"projection_heads.last_linear.bias ({K + 1},) -> head.last_linear.bias ({K},)",
    ),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_a_tampered_checkpoint_fails_listing_the_offending_keys(small_resnet_checkpoint, tmp_path, tampering):
    path, _ = small_resnet_checkpoint
    content = torch.load(path, weights_only=False)
    change, listed = TAMPERINGS[tampering]
    content["model"] = change(content["model"])
    torch.save(content, tmp_path / "tampered.pth")
    with pytest.raises(ConversionError, match="does not match the model") as error:
        convert_official_checkpoint(tmp_path / "tampered.pth")
    assert f"  {listed}" in str(error.value).splitlines()


def test_forcing_an_architecture_the_keys_do_not_fit_fails(small_resnet_checkpoint):
    path, _ = small_resnet_checkpoint
    with pytest.raises(ConversionError) as error:
        convert_official_checkpoint(path, arch="resnet50")
    lines = str(error.value).splitlines()
    assert "  backbone.encoder.stages.0.layers.2.layer.0.convolution.weight" in lines  # resnet50 has 3 blocks
    assert any(line.startswith("  backbone.conv1.weight (16, 3, 7, 7) -> ") for line in lines)
    with pytest.raises(ConversionError, match="no place in the model"):
        convert_official_checkpoint(path, arch="vit-s16")


def test_args_under_other_names_are_read_and_the_tensors_win_over_them(small_resnet_checkpoint, tmp_path):
    _, network = small_resnet_checkpoint
    args = {"dim": 999, "temperature": 0.2, "lambda2": 2.0, "bunch": 64, "EPS": 1e-6, "lam1": "high"}
    conversion = convert_official_checkpoint(save_full(tmp_path / "args.pth", network, args=args))
    pixels = torch.randn(2, 3, 32, 32)
    assert_same_outputs(conversion.model, network, pixels)
    config = conversion.model.config
    assert (config.num_classes, config.tau, config.lam2, config.bunch_size, config.eps) == (
        K,
        0.2,
        2.0,
        64,
        1e-6,
    )
    assert config.lam1 == 0.0
    assert "ignored args.lam1 = 'high': not a number usable as lam1" in conversion.notes
    assert any("args.dim = 999 disagrees with num_classes = 24 from the head's" in note for note in conversion.notes)
    with pytest.raises(ConversionError, match="contradicts the checkpoint's head"):
        convert_official_checkpoint(tmp_path / "args.pth", num_classes=1000)


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_a_foreign_global_is_refused_without_running_it(small_resnet_checkpoint, tmp_path):
    path, _ = small_resnet_checkpoint
    content = torch.load(path, weights_only=False)
    marker = tmp_path / "code-ran"
    content["args"] = RunsAShellCommand(marker)
    torch.save(content, tmp_path / "unsafe.pth")
    with pytest.raises(ConversionError, match=r"Refusing to load .*GLOBAL .*system"):
        convert_official_checkpoint(tmp_path / "unsafe.pth")
    assert not marker.exists()


def test_files_that_are_no_checkpoint_are_clear_errors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ConversionError, match="holds a list, not a checkpoint dict"):
        convert_official_checkpoint(tmp_path / "list.pth")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "empty.pth")
    with pytest.raises(ConversionError, match="holds no state dict.*epoch, optimizer"):
        convert_official_checkpoint(tmp_path / "empty.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "unknown.pth")
    with pytest.raises(ConversionError, match="Cannot tell the architecture"):
        convert_official_checkpoint(tmp_path / "unknown.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        convert_official_checkpoint(tmp_path / "text.pth")
    with pytest.raises(ConversionError, match="no `teacher` network"):
        convert_official_checkpoint(
            save_full(tmp_path / "full.pth", reference(widened_resnet(8), 256)), use_teacher=True
        )


def test_the_command_line_exits_non_zero_and_saves_nothing_for_a_bad_file(tmp_path, caplog):
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "unknown.pth")
    assert main([str(tmp_path / "unknown.pth"), str(tmp_path / "out")]) == 1
    assert "Cannot tell the architecture" in caplog.text and not (tmp_path / "out").exists()


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    sys.modules["twist_hf"] = None  # the saved remote code must be enough
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.inference_mode():
        out = model(torch.load(sys.argv[2]))
    result = {"features": out.pooler_output, "logits": out.logits, "module": type(model).__module__}
    torch.save(result, sys.argv[3])
""")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_command_line_conversion_loads_with_the_package_and_with_remote_code(vit_reference, tmp_path):
    path = save_full(
        tmp_path / "vit.pth", vit_reference, args={"dim": K, "hid_dim": H, "epochs": 300}, module_prefix=True
    )
    out = tmp_path / "twist-vit-s16"
    done = _run([sys.executable, "-m", "twist_hf.convert_official_checkpoint", str(path), str(out)])
    assert "preset 'vit-s16'" in done.stderr and "verified: each of the" in done.stderr

    pixels = torch.randn(2, 3, 224, 224)
    expected = reference_outputs(vit_reference, pixels)
    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, TwistModel)
    for got, want in zip(outputs(model, pixels), expected, strict=True):
        torch.testing.assert_close(got, want)

    torch.save(pixels, tmp_path / "pixels.pt")
    _run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(out),
            str(tmp_path / "pixels.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=tmp_path,
    )
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    torch.testing.assert_close(remote["features"], expected[0])
    torch.testing.assert_close(remote["logits"], expected[1])

    saved = json.loads((out / "config.json").read_text())
    assert saved["converted_from"]["checkpoint"] == "vit.pth" and saved["converted_from"]["epoch"] == 3
    assert (out / "preprocessor_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "| Head | converted from the checkpoint |" in card and "| Epochs | 3 |" in card
    assert all(f"| {key} | {value} |" in card for key, value in model_config_summary(model.config).items())


@pytest.mark.slow
def test_command_line_pushes_a_backbone_only_conversion_to_the_hub(tmp_path):
    network = reference(vit(depth=1), 384, seed=7, activation=nn.GELU)
    path = save_backbone_only(tmp_path / "backbone.pth", network.backbone)
    hub = start_hub_server(tmp_path / "hub")
    try:
        repo = f"{TEST_USER}/twist-vit-s16"
        env = client_env(hub, tmp_path / "hf-home", token=TEST_TOKEN)
        command = [
            sys.executable,
            "-m",
            "twist_hf.convert_official_checkpoint",
            str(path),
            str(tmp_path / "out"),
            "--num_classes",
            "16",
            "--head_hidden_size",
            "8",
            "--push_to_hub",
            "--hub_model_id",
            repo,
        ]
        done = _run(command, env=env)
        assert "the TWIST head is freshly initialised" in done.stderr and "up to date" in done.stderr
        api = HfApi(endpoint=hub.endpoint, token=TEST_TOKEN)
        files = set(api.list_repo_files(repo))
        assert PUSHED_MODEL_FILES <= files
        card = hf_hub_download(repo, "README.md", endpoint=hub.endpoint, token=TEST_TOKEN, cache_dir=tmp_path / "cache")
        assert f"| Head | {FRESH_HEAD_NOTE} |" in Path(card).read_text()
    finally:
        hub.stop()


def test_conversion_refuses_a_folder_holding_foreign_files_and_pushes_only_its_own(
    small_resnet_checkpoint, tmp_path, hub, lfs_not_xet, monkeypatch
):
    path, _ = small_resnet_checkpoint
    used = tmp_path / "used"
    (used / ".ssh").mkdir(parents=True)
    (used / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    assert main([str(path), str(used)]) == 1
    assert sorted(item.relative_to(used).as_posix() for item in used.rglob("*")) == [".ssh", ".ssh/id_rsa"]

    out = tmp_path / "out"
    assert main([str(path), str(out)]) == 0
    written = conversion_files(out)
    assert {"config.json", "model.safetensors", "README.md"} <= set(written)
    (out / ".env").write_text("HF_TOKEN=hf_secret")  # dropped next to the model before the push
    (out / "drafts").mkdir()
    (out / "drafts" / "paper.tex").write_text("unpublished")
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    push_conversion(out, f"{TEST_USER}/converted", token=TEST_TOKEN)
    pushed = set(HfApi(endpoint=hub.endpoint, token=TEST_TOKEN).list_repo_files(f"{TEST_USER}/converted"))
    assert pushed - {".gitattributes"} == set(written)
