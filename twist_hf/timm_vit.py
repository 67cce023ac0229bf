"""timm's ViT with the authors' position-embedding interpolation, apart from `vit.py` so that importing the model
code does not import timm (half a second a process) unless a backbone is a timm ViT."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from .vit import interpolate_position_embedding

__all__ = ["AuthorsVisionTransformer", "VisionTransformer"]


class AuthorsVisionTransformer(VisionTransformer):
    """timm's `VisionTransformer` whose position embedding follows other input sizes as the authors' does."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # tokens already flattened: the model was built without dynamic image sizes
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + interpolate_position_embedding(self.pos_embed, height, width))
