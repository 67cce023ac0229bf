"""Convert the TWIST authors' published checkpoints into `TwistModel` folders.

    python -m twist_hf.convert_official_checkpoint twist_r50.pth twist-resnet50 \
        [--arch resnet50] [--push_to_hub --hub_model_id ORG/NAME]

Reads "full" checkpoints (whole network, optimizer, epoch, hyperparameters) and "backbone only" files (the
head is then freshly initialised), with or without DDP's `module.` prefixes, through
`torch.load(weights_only=True)` only. Every source tensor must land in a target tensor of the same shape
and every target tensor must be filled, or the conversion fails listing the offending keys.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import logging
import math
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configuration_twist import TWIST_PRESETS, TwistConfig, check_choice
from .hub import HubPusher
from .model_card import model_config_summary, write_model_card
from .modeling_twist import TwistModel

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet50", "resnet50w2", "vit-s16", "vit-b16")
BACKBONE_PREFIX = "backbone."
SOURCE_HEAD_PREFIX = "projection_heads."
TARGET_HEAD_PREFIX = "head."
FRESH_HEAD_NOTE = (
    "freshly initialised (random): the checkpoint holds the backbone only, so the logits mean nothing until "
    "the head is trained"
)
_RESNET_STEM_WIDTHS = {64: "resnet50", 128: "resnet50w2"}
_VIT_WIDTHS = {384: "vit-s16", 768: "vit-b16"}
_TIMM_VIT_DEFAULTS = {"depth": 12, "patch_size": 16, "img_size": 224}
_MAX_LISTED_KEYS = 25
# What `save_conversion` writes (top-level names): `save_pretrained`'s weights, config, image processor and
# remote-code modules, and the model card.
CONVERSION_OUTPUTS = (
    "config.json",
    "preprocessor_config.json",
    "README.md",
    "*.safetensors",
    "model.safetensors.index.json",
    "*.py",
)

# Names the reference training scripts may give each hyperparameter in their `args` namespace.
ARG_ALIASES: dict[str, tuple[str, ...]] = {
    "num_classes": ("dim", "num_classes", "out_dim", "n_classes"),
    "head_hidden_size": ("hid_dim", "hidden_dim", "head_hidden_size", "proj_hidden_dim", "mlp_dim"),
    "tau": ("tau", "temperature"),
    "lam1": ("lam1", "lambda1"),
    "lam2": ("lam2", "lambda2"),
    "bunch_size": ("bunch_size", "bunch"),
    "eps": ("EPS", "eps"),
    "head_dropout": ("head_dropout", "proj_dropout"),
    "drop_path_rate": ("drop_path", "drop_path_rate"),
}
_INTEGER_FIELDS = ("num_classes", "head_hidden_size", "bunch_size")
_RECIPE_ARGS = (
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "wd",
    "optimizer",
    "local_crops_number",
    "momentum_teacher",
    "warmup_epochs",
    "clip_grad",
    "use_fp16",
)


class ConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully; the message names the keys or values at fault."""


@dataclass
class SourceNetwork:
    """One reference network's tensors (backbone keys under `backbone.`, head keys under `projection_heads.`)
    and what the checkpoint file says about its training."""

    path: Path
    tensors: dict[str, torch.Tensor]
    origin: str
    args: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    has_teacher: bool = False

    @property
    def has_head(self) -> bool:
        return any(key.startswith(SOURCE_HEAD_PREFIX) for key in self.tensors)

    def backbone(self) -> dict[str, torch.Tensor]:
        """The backbone tensors under their own (torchvision or timm) names."""
        return {
            key[len(BACKBONE_PREFIX) :]: tensor
            for key, tensor in self.tensors.items()
            if key.startswith(BACKBONE_PREFIX)
        }


@dataclass(frozen=True)
class Architecture:
    """The preset a checkpoint is converted with, and the backbone settings its keys demand on top of it."""

    preset: str
    family: str
    backbone_overrides: dict[str, Any]
    description: str
    matches_preset: bool


@dataclass
class Conversion:
    """A converted model and the record of where its weights came from."""

    model: TwistModel
    architecture: Architecture
    source: SourceNetwork
    notes: list[str]
    record: dict[str, Any]


def load_checkpoint_safely(path: str | Path) -> Any:
    """Load a checkpoint with `weights_only=True`, allowing `argparse.Namespace` and nothing else beyond
    tensors and plain containers: a pickle naming any other Python object is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is None:
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
            raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {detail}") from error
        raise ConversionError(
            f"Refusing to load {path}: it holds a Python object other than tensors, plain containers and "
            f"argparse.Namespace ({refused}). The converter never unpickles arbitrary objects; if you trust "
            "the file, re-save only its state dicts, epoch and args."
        ) from error
    except RuntimeError as error:
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint: {error}") from error


def read_source_network(path: str | Path, use_teacher: bool = False) -> SourceNetwork:
    """Find the network's tensors in a full or backbone-only checkpoint and bring their keys to one layout."""
    path = Path(path)
    content = load_checkpoint_safely(path)
    if not isinstance(content, Mapping):
        raise ConversionError(f"{path} holds a {type(content).__name__}, not a checkpoint dict or state dict.")
    if use_teacher and not _is_state_dict(content.get("teacher")):
        raise ConversionError(
            f"{path} has no `teacher` network (only momentum-encoder runs save one); drop --use_teacher."
        )
    state, origin = _network_state(content, "teacher" if use_teacher else "model", path)
    tensors = _strip_module_prefixes(state)
    if not any(key.startswith((BACKBONE_PREFIX, SOURCE_HEAD_PREFIX)) for key in tensors):
        tensors = {BACKBONE_PREFIX + key: tensor for key, tensor in tensors.items()}
    epoch = content.get("epoch")
    return SourceNetwork(
        path=path,
        tensors=tensors,
        origin=origin,
        args=_args_dict(content.get("args")),
        epoch=epoch if isinstance(epoch, int) else None,
        has_teacher=_is_state_dict(content.get("teacher")),
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _network_state(content: Mapping, network_key: str, path: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """The whole network (`model` / `teacher`), else the backbone-only state dict, and where it was found."""
    for key in (network_key, "backbone", "state_dict"):
        if _is_state_dict(content.get(key)):
            return content[key], key
    if _is_state_dict(content):
        return content, "file"
    raise ConversionError(
        f"{path} holds no state dict: expected a `model` entry (full checkpoint), a `backbone` or "
        "`state_dict` entry, or a state dict of tensors itself. "
        f"Its top-level keys are: {', '.join(map(str, content))}."
    )


def _strip_module_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` components that DistributedDataParallel adds to keys."""
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = ".".join(part for part in key.split(".") if part != "module")
        if name in stripped:
            raise ConversionError(f"Keys clash once `module.` is removed: {key!r} and another key give {name!r}.")
        stripped[name] = tensor
    return stripped


def _args_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def resolve_architecture(backbone: Mapping[str, torch.Tensor], arch: str | None = None) -> Architecture:
    """The preset for a backbone, detected from its keys and shapes, or forced with `arch`.

    Detected: the backbone settings follow the keys (depths and widths for ResNet; depth, patch and
    position grid for ViT). Forced: the preset as it is, except a ViT keeps the checkpoint's position grid.
    """
    if arch is not None:
        return _forced_architecture(backbone, arch)
    if "conv1.weight" in backbone:
        return _resnet_architecture(backbone)
    if "cls_token" in backbone and "patch_embed.proj.weight" in backbone:
        return _vit_architecture(backbone)
    first = ", ".join(list(backbone)[:5]) or "none"
    raise ConversionError(
        f"Cannot tell the architecture from the backbone keys (first ones: {first}): expected torchvision "
        "ResNet keys (conv1, layer1, ...) or DINO/timm ViT keys (cls_token, patch_embed, blocks, ...). "
        f"Pass --arch (one of {', '.join(ARCHITECTURES)}) if the keys are right but unusual."
    )


def _forced_architecture(backbone: Mapping[str, torch.Tensor], arch: str) -> Architecture:
    try:
        check_choice("--arch", arch, ARCHITECTURES)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    family = "resnet" if arch.startswith("resnet") else "vit"
    overrides = {}
    if family == "vit" and "pos_embed" in backbone and "patch_embed.proj.weight" in backbone:
        img_size = _vit_image_size(backbone)
        if img_size != _TIMM_VIT_DEFAULTS["img_size"]:
            overrides = {"img_size": img_size}
    return Architecture(arch, family, overrides, f"{arch} (forced with --arch)", matches_preset=True)


def _resnet_architecture(backbone: Mapping[str, torch.Tensor]) -> Architecture:
    geometry = resnet_geometry(backbone)
    preset = _RESNET_STEM_WIDTHS.get(geometry["embedding_size"], "resnet50")
    expected = TwistConfig.from_preset(preset).backbone_config
    matches = all(_as_tuple(getattr(expected, name)) == _as_tuple(value) for name, value in geometry.items())
    description = (
        f"ResNet, {geometry['layer_type']} blocks, stem width {geometry['embedding_size']}, "
        f"stage widths {geometry['hidden_sizes']}, depths {geometry['depths']}"
    )
    return Architecture(preset, "resnet", geometry, description, matches)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def resnet_geometry(backbone: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """HF `ResNetConfig` settings read from torchvision-named keys: stem width, stage widths and depths."""
    blocks: dict[int, set[int]] = {}
    for key in backbone:
        match = re.match(r"layer(\d+)\.(\d+)\.", key)
        if match:
            blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise ConversionError(f"A torchvision ResNet has stages layer1, layer2, ...; these keys have {stages}.")
    bottleneck = "layer1.0.conv3.weight" in backbone
    last_conv = "conv3" if bottleneck else "conv2"
    try:
        widths = [backbone[f"layer{stage}.0.{last_conv}.weight"].shape[0] for stage in stages]
    except KeyError as error:
        raise ConversionError(f"A ResNet block lacks its last convolution: {error.args[0]} is missing.") from error
    return {
        "embedding_size": backbone["conv1.weight"].shape[0],
        "hidden_sizes": widths,
        "depths": [len(blocks[stage]) for stage in stages],
        "layer_type": "bottleneck" if bottleneck else "basic",
    }


def _vit_architecture(backbone: Mapping[str, torch.Tensor]) -> Architecture:
    width = backbone["cls_token"].shape[-1]
    if width not in _VIT_WIDTHS:
        raise ConversionError(
            f"The ViT has width {width}, but the TWIST ViTs are ViT-S/16 (384) and ViT-B/16 (768); the "
            "number of attention heads of another width cannot be read from the weights."
        )
    geometry = {
        "depth": len({int(m.group(1)) for key in backbone if (m := re.match(r"blocks\.(\d+)\.", key))}),
        "patch_size": backbone["patch_embed.proj.weight"].shape[-1],
        "img_size": _vit_image_size(backbone),
    }
    overrides = {name: value for name, value in geometry.items() if value != _TIMM_VIT_DEFAULTS[name]}
    description = (
        f"ViT, width {width}, depth {geometry['depth']}, patch {geometry['patch_size']}, "
        f"position grid for {geometry['img_size']} px"
    )
    return Architecture(_VIT_WIDTHS[width], "vit", overrides, description, matches_preset=not overrides)


def _vit_image_size(backbone: Mapping[str, torch.Tensor]) -> int:
    """The image side the position embedding was made for (one class token, a square grid of patches)."""
    patches = backbone["pos_embed"].shape[1] - 1
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ConversionError(f"pos_embed holds {patches} patch positions plus a class token: not a square grid.")
    return grid * backbone["patch_embed.proj.weight"].shape[-1]


def build_config(
    architecture: Architecture,
    source: SourceNetwork,
    num_classes: int | None = None,
    head_hidden_size: int | None = None,
) -> tuple[TwistConfig, list[str]]:
    """The TWIST config for a converted network, and a note saying where each setting came from.

    The head's sizes and norms come from its tensors; TWIST hyperparameters from the checkpoint's `args`
    where present, else from the preset; `num_classes` / `head_hidden_size` size a fresh head.
    """
    notes = [f"architecture: {architecture.description} -> preset {architecture.preset!r}"]
    if not architecture.matches_preset:
        notes.append(f"WARNING: not the paper's {architecture.preset}; the model follows the checkpoint's keys")
    if source.has_head:
        fields = _head_fields_from_tensors(source.tensors, num_classes, head_hidden_size, notes)
    else:
        fields = _head_sizes_from_command_line(num_classes, head_hidden_size, notes)
    hyper = _fields_from_args(source.args, known=fields, notes=notes)
    drop_path = hyper.pop("drop_path_rate", None)
    if drop_path is not None and architecture.family != "vit":
        notes.append("drop_path_rate not used: ResNet backbones have no stochastic depth")
    fields.update(hyper)
    fields.update(_activation_from_args(source.args, notes))
    fields["backbone_config"] = _backbone_config(architecture, drop_path)
    preset = TWIST_PRESETS[architecture.preset]
    for name in ("num_classes", "head_hidden_size", "tau", "lam1", "lam2", "bunch_size", "eps", "head_activation"):
        if name not in fields:
            default = preset.get(name, TwistConfig.__dataclass_fields__[name].default)
            notes.append(f"{name} = {default}: not in the checkpoint, preset default")
    return TwistConfig.from_preset(architecture.preset, **fields), notes


def _head_fields_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    num_classes: int | None,
    head_hidden_size: int | None,
    notes: list[str],
) -> dict[str, Any]:
    """Head sizes and norm kinds read from the reference head's tensors."""
    first, last = f"{SOURCE_HEAD_PREFIX}projection_head.0.weight", f"{SOURCE_HEAD_PREFIX}last_linear.weight"
    for key in (first, last):
        if key not in tensors:
            raise ConversionError(f"The checkpoint has a head (projection_heads.*) but no {key}.")
    fields = {"head_hidden_size": tensors[first].shape[0], "num_classes": tensors[last].shape[0]}
    for name, requested in (("num_classes", num_classes), ("head_hidden_size", head_hidden_size)):
        if requested is not None and requested != fields[name]:
            raise ConversionError(
                f"--{name} {requested} contradicts the checkpoint's head, which has {name} {fields[name]}; "
                "drop the option (it only sizes the fresh head of a backbone-only checkpoint)."
            )
        notes.append(f"{name} = {fields[name]}: from the head's tensor shapes")
    norm = f"{SOURCE_HEAD_PREFIX}projection_head.1"
    if f"{norm}.running_mean" in tensors:
        fields["head_norm"] = "batch_norm"
    elif f"{norm}.weight" in tensors:
        fields["head_norm"] = "layer_norm"
    else:
        fields["head_norm"] = "none"
    has_last_norm = f"{SOURCE_HEAD_PREFIX}norm.running_mean" in tensors
    fields["last_norm"] = "bunch" if has_last_norm else "none"
    notes.append(f"head_norm = {fields['head_norm']}, last_norm = {fields['last_norm']}: from the head's tensors")
    return fields


def _head_sizes_from_command_line(
    num_classes: int | None, head_hidden_size: int | None, notes: list[str]
) -> dict[str, Any]:
    """The sizes asked for a fresh head."""
    fields = {}
    for name, value in (("num_classes", num_classes), ("head_hidden_size", head_hidden_size)):
        if value is not None:
            fields[name] = value
            notes.append(f"{name} = {value}: from the command line")
    return fields


def _fields_from_args(args: Mapping[str, Any], known: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """Config fields read from the checkpoint's hyperparameters under any of their plausible names; the
    `known` fields (from the head's tensors or the command line) win over them."""
    fields: dict[str, Any] = {}
    for name, aliases in ARG_ALIASES.items():
        alias = next((a for a in aliases if a in args), None)
        if alias is None:
            continue
        value = args[alias]
        expected_type = int if name in _INTEGER_FIELDS else (int, float)
        if isinstance(value, bool) or not isinstance(value, expected_type):
            notes.append(f"ignored args.{alias} = {value!r}: not a number usable as {name}")
        elif name not in known:
            fields[name] = value
            notes.append(f"{name} = {value}: from args.{alias}")
        elif value != known[name]:
            notes.append(
                f"WARNING: args.{alias} = {value} disagrees with {name} = {known[name]} from the head's "
                "tensors or the command line; using the latter"
            )
    return fields


def _activation_from_args(args: Mapping[str, Any], notes: list[str]) -> dict[str, str]:
    """The head activation the checkpoint was trained with (`args.act`): the authors' head uses ReLU for
    "relu" and GELU for any other value. Empty when the checkpoint does not say."""
    if "act" not in args:
        return {}
    activation = "relu" if args["act"] == "relu" else "gelu"
    notes.append(f"head_activation = {activation}: from args.act = {args['act']!r}")
    return {"head_activation": activation}


def _backbone_config(architecture: Architecture, drop_path_rate: float | None) -> dict[str, Any]:
    config = copy.deepcopy(TWIST_PRESETS[architecture.preset]["backbone_config"])
    if architecture.family == "resnet":
        config.update(architecture.backbone_overrides)
    else:
        config["model_args"].update(architecture.backbone_overrides)
        if drop_path_rate is not None:
            config["model_args"]["drop_path_rate"] = float(drop_path_rate)
    return config


_RESNET_PARTS = {"conv": "convolution", "bn": "normalization"}


def resnet_target_key(key: str) -> str | None:
    """HF `ResNetModel` name of a torchvision ResNet key; None for a key without counterpart (e.g. `fc.*`)."""
    if match := re.fullmatch(r"(conv|bn)1\.(\w+)", key):
        return f"embedder.embedder.{_RESNET_PARTS[match.group(1)]}.{match.group(2)}"
    if match := re.fullmatch(r"layer(\d+)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key):
        stage, block, kind, index, name = match.groups()
        layer = f"layer.{int(index) - 1}.{_RESNET_PARTS[kind]}"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.{layer}.{name}"
    if match := re.fullmatch(r"layer(\d+)\.(\d+)\.downsample\.([01])\.(\w+)", key):
        stage, block, index, name = match.groups()
        part = ("convolution", "normalization")[int(index)]
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{part}.{name}"
    return None


def vit_target_key(key: str) -> str:
    """`TimmWrapperModel` name of a DINO/timm ViT key: the same name inside `timm_model`."""
    return f"timm_model.{key}"


def target_key(source_key: str, family: str) -> str | None:
    """`TwistModel` name of a reference network key (`backbone.*` or `projection_heads.*`), or None."""
    if source_key.startswith(SOURCE_HEAD_PREFIX):
        return TARGET_HEAD_PREFIX + source_key[len(SOURCE_HEAD_PREFIX) :]
    if not source_key.startswith(BACKBONE_PREFIX):
        return None
    rename = resnet_target_key if family == "resnet" else vit_target_key
    inner = rename(source_key[len(BACKBONE_PREFIX) :])
    return None if inner is None else BACKBONE_PREFIX + inner


def map_state_dict(
    source: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, Sequence[int]],
    rename: Callable[[str], str | None],
    required: Sequence[str],
) -> dict[str, torch.Tensor]:
    """The source tensors under their target names, once every source tensor has found a target of its
    shape and every required target is filled; otherwise a `ConversionError` listing every offender."""
    converted: dict[str, torch.Tensor] = {}
    unused, mismatched, mismatched_targets = [], [], set()
    for key, tensor in source.items():
        target = rename(key)
        if target is None or target not in target_shapes or target in converted:
            unused.append(key)
        elif tuple(tensor.shape) != tuple(target_shapes[target]):
            mismatched.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(target_shapes[target])}")
            mismatched_targets.add(target)
        else:
            converted[target] = tensor
    missing = sorted(set(required) - set(converted) - mismatched_targets)
    if unused or missing or mismatched:
        raise _mismatch_error(unused, missing, mismatched)
    return converted


def _mismatch_error(unused: list[str], missing: list[str], mismatched: list[str]) -> ConversionError:
    sections = (
        ("checkpoint tensors with no place in the model (unused)", unused),
        ("model tensors the checkpoint does not fill (missing)", missing),
        ("tensors whose shapes differ (checkpoint -> model)", mismatched),
    )
    lines = ["The checkpoint does not match the model, so nothing was converted:"]
    for title, keys in sections:
        if keys:
            lines.append(f"{len(keys)} {title}:")
            lines += [f"  {key}" for key in keys[:_MAX_LISTED_KEYS]]
            if len(keys) > _MAX_LISTED_KEYS:
                lines.append(f"  ... and {len(keys) - _MAX_LISTED_KEYS} more")
    lines.append("Check --arch (or leave it out to detect the architecture from the keys) and the file itself.")
    return ConversionError("\n".join(lines))


def convert_official_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    use_teacher: bool = False,
    num_classes: int | None = None,
    head_hidden_size: int | None = None,
    seed: int = 0,
) -> Conversion:
    """Convert an authors' checkpoint into an eval-mode `TwistModel`, verified tensor by tensor.

    A backbone-only file gives a fresh head (seeded with `seed`, sized by `num_classes` / `head_hidden_size`
    or the preset); `use_teacher` converts a momentum run's teacher instead of the student.
    """
    source = read_source_network(path, use_teacher)
    logger.info("Read %s: %d tensors from its %r entry", source.path, len(source.tensors), source.origin)
    architecture = resolve_architecture(source.backbone(), arch)
    config, notes = build_config(architecture, source, num_classes, head_hidden_size)
    if source.has_teacher and not use_teacher:
        notes.append("the checkpoint also holds a momentum teacher: --use_teacher converts it instead")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TwistModel(config)
    target_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    required = [key for key in target_shapes if source.has_head or not key.startswith(TARGET_HEAD_PREFIX)]
    converted = map_state_dict(
        source.tensors, target_shapes, lambda key: target_key(key, architecture.family), required
    )
    model.load_state_dict(converted, strict=source.has_head)
    notes.append(
        f"verified: each of the {len(converted)} checkpoint tensors filled a model tensor of the same "
        f"shape, and every {'' if source.has_head else 'backbone '}model tensor was filled"
    )
    if not source.has_head:
        notes.append(f"WARNING: the TWIST head is {FRESH_HEAD_NOTE}")
    record = _conversion_record(source, architecture)
    model.config.converted_from = record
    for note in notes:
        if note.startswith("WARNING: "):
            logger.warning("%s", note.removeprefix("WARNING: "))
        else:
            logger.info("%s", note)
    return Conversion(model.eval(), architecture, source, notes, record)


def _conversion_record(source: SourceNetwork, architecture: Architecture) -> dict[str, Any]:
    """Provenance saved in `config.json` as `converted_from`."""
    with source.path.open("rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    return {
        "checkpoint": source.path.name,
        "sha256": sha256,
        "network": _network_description(source),
        "architecture": architecture.preset,
        "epoch": source.epoch,
        "head": "converted from the checkpoint" if source.has_head else FRESH_HEAD_NOTE,
    }


def _network_description(source: SourceNetwork) -> str:
    if source.origin == "model":
        return "student network (`model` entry)"
    if source.origin == "teacher":
        return "momentum teacher (`teacher` entry)"
    where = "the whole file" if source.origin == "file" else f"`{source.origin}` entry"
    return f"{'whole network' if source.has_head else 'backbone only'} ({where})"


def save_conversion(
    conversion: Conversion,
    output_dir: str | Path,
    *,
    model_id: str | None = None,
    dataset: str = "imagenet-1k",
) -> Path:
    """Save the converted model (`save_pretrained`: weights, config, image processor, remote code) and a
    model card saying where the weights came from, into a new or empty folder or an earlier conversion's."""
    output = Path(output_dir)
    check_output_folder(output)
    conversion.model.save_pretrained(output)
    write_model_card(
        output,
        model_id=model_id or output.resolve().name,
        config_summary=model_config_summary(conversion.model.config),
        training_summary=_training_summary(conversion, dataset),
    )
    return output


def check_output_folder(output: Path) -> None:
    """Refuse a folder holding anything a conversion does not write (a push would publish it)."""
    foreign = foreign_files(output)
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConversionError(
            f"{output} holds files a conversion does not write ({listed}); a push would publish them. "
            "Pass a new or empty output folder."
        )


def conversion_files(folder: str | Path) -> list[str]:
    """The files of `folder` a conversion writes: top-level weights, config, image processor, card and code."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path.name for path in folder.iterdir() if path.is_file() and _is_conversion_output(path.name))


def foreign_files(folder: str | Path) -> list[str]:
    """Everything in `folder` (recursively) that is not a conversion output: another program's or the user's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = set(conversion_files(folder))
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.name not in ours or path.parent != folder
    )


def _is_conversion_output(name: str) -> bool:
    return not name.startswith(".") and any(fnmatch.fnmatchcase(name, pattern) for pattern in CONVERSION_OUTPUTS)


def _training_summary(conversion: Conversion, dataset: str) -> dict[str, Any]:
    record, args = conversion.record, conversion.source.args
    summary: dict[str, Any] = {
        "dataset": dataset,
        "Trained by": "the TWIST authors; converted with `python -m twist_hf.convert_official_checkpoint`",
        "Source checkpoint": f"{record['checkpoint']} (sha256 {record['sha256'][:16]}...)",
        "Network converted": record["network"],
        "Architecture": f"{conversion.architecture.description} (preset {conversion.architecture.preset})",
        "Epochs": record["epoch"] if record["epoch"] is not None else "not recorded",
        "Head": record["head"],
    }
    summary.update({f"args.{name}": args[name] for name in _RECIPE_ARGS if name in args})
    return summary


def push_conversion(
    folder: str | Path,
    hub_model_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    push_timeout: float = 600.0,
) -> str:
    """Upload a saved conversion's own files (nothing else in `folder`) to the Hub as one commit; raises if
    the push did not land."""
    pusher = HubPusher(
        hub_model_id,
        allow_patterns=conversion_files(folder),
        hub_strategy="end",
        hub_private_repo=private,
        hub_token=token,
        hub_revision=revision,
        push_timeout=push_timeout,
    )
    summary = pusher.finish(folder)
    if not summary.ok:
        raise RuntimeError(f"The Hub push failed; the local folder {folder} is complete. {summary}")
    return summary.message


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's options; `--push_to_hub` requires `--hub_model_id`."""
    parser = argparse.ArgumentParser(
        prog="python -m twist_hf.convert_official_checkpoint",
        description="Convert a TWIST authors' checkpoint (full or backbone only) into a TwistModel folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="the authors' .pth file")
    parser.add_argument("output_dir", type=Path, help="folder to save the converted model in")
    parser.add_argument("--arch", choices=ARCHITECTURES, help="force the architecture instead of detecting it")
    parser.add_argument(
        "--use_teacher",
        action="store_true",
        help="convert the momentum teacher of a full checkpoint instead of the student",
    )
    parser.add_argument("--num_classes", type=int, help="K of the fresh head of a backbone-only checkpoint")
    parser.add_argument("--head_hidden_size", type=int, help="H of the fresh head of a backbone-only checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh head's initialisation")
    parser.add_argument("--dataset", default="imagenet-1k", help="pretraining dataset named in the model card")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to the Hugging Face Hub")
    parser.add_argument("--hub_model_id", help="Hub repo to push to, 'namespace/name'")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--hub_token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument("--hub_revision", help="branch to push to (default: main)")
    parser.add_argument("--push_timeout", type=float, default=600.0, help="seconds the upload may take")
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id ORG/NAME.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        check_output_folder(args.output_dir)
        conversion = convert_official_checkpoint(
            args.checkpoint,
            arch=args.arch,
            use_teacher=args.use_teacher,
            num_classes=args.num_classes,
            head_hidden_size=args.head_hidden_size,
            seed=args.seed,
        )
        folder = save_conversion(conversion, args.output_dir, model_id=args.hub_model_id, dataset=args.dataset)
    except (ConversionError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 1
    logger.info("Saved the converted model to %s", folder)
    if args.push_to_hub:
        try:
            logger.info(
                "%s",
                push_conversion(
                    folder,
                    args.hub_model_id,
                    private=args.hub_private_repo or None,
                    token=args.hub_token,
                    revision=args.hub_revision,
                    push_timeout=args.push_timeout,
                ),
            )
        except (RuntimeError, ValueError) as error:
            logger.error("%s", error)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
