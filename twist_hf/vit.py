"""The TWIST authors' ViT conventions on timm ViT backbones: their position-embedding interpolation for
crops of another size, and their initialisation of the CLS token and patch embedding (docs/method.md §2.3)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def authors_vit(backbone: nn.Module) -> VisionTransformer | None:
    """The timm ViT inside a `timm_wrapper` backbone if it has the authors' layout (one CLS token, no
    register tokens, a position embedding that includes the CLS position), else None."""
    vit = getattr(backbone, "timm_model", None)
    if vit is None:
        return None
    from .timm_vit import AuthorsVisionTransformer, VisionTransformer  # timm only for timm backbones

    if type(vit) not in (VisionTransformer, AuthorsVisionTransformer) or vit.pos_embed is None:
        return None
    if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class or vit.num_prefix_tokens != 1:
        return None
    return vit


def interpolate_position_embedding(pos_embed: torch.Tensor, grid_height: int, grid_width: int) -> torch.Tensor:
    """Position embedding (1, 1 + N, D) for a grid_height x grid_width patch grid, as the authors compute it.

    Plain bicubic interpolation (no antialias) of the square grid with the scale factor
    ((grid + 0.1) / sqrt(N)) per side; the output size is that of the grid. timm's default resampling
    (antialiased, sized by the output) gives other values for 96 px crops.
    """
    patches = pos_embed.shape[1] - 1
    side = int(math.sqrt(patches))
    if grid_height == grid_width == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_height + 0.1) / math.sqrt(patches), (grid_width + 0.1) / math.sqrt(patches))
    resized = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic")
    if resized.shape[-2:] != (grid_height, grid_width):
        raise ValueError(f"Cannot interpolate a {side}x{side} position grid to {grid_height}x{grid_width}.")
    resized = resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
    return torch.cat([pos_embed[:, :1], resized], dim=1)


def use_authors_position_interpolation(backbone: nn.Module) -> None:
    """Make a timm ViT backbone interpolate its position embedding as the authors do (no-op otherwise)."""
    vit = authors_vit(backbone)
    if vit is not None:
        from .timm_vit import AuthorsVisionTransformer

        vit.__class__ = AuthorsVisionTransformer


def init_authors_vit(vit: nn.Module) -> None:
    """The authors' (DINO's) init where timm's differs: CLS token truncated-normal std 0.02 (timm: normal
    1e-6) and the patch-embedding convolution left at PyTorch's default (timm / HF: normal 0.02, bias 0).
    Linear layers (truncated normal 0.02, zero bias), LayerNorms and the position embedding already agree."""
    init.trunc_normal_(vit.cls_token, std=0.02)
    conv = vit.patch_embed.proj
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        init.uniform_(conv.bias, -bound, bound)
