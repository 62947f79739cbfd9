"""Image-token coordinates: each image token's (view, patch_row, patch_col), from the model's own layout."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches


def image_token_coordinates(model: nn.Module, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Map every image token of each image to (view, patch_row, patch_col).

    For LLaVA-NeXT-style models the model's own ``pack_image_features`` is run on a coordinate
    tensor instead of image features, so the layout (base view first, then the unpadded anyres grid
    with an image-newline token closing each row) is exactly the model's. Image-newline tokens get
    view -2 and null (-1) coordinates.

    Args:
        model: a loaded image-text model.
        image_sizes: (n_images, 2) original (height, width) per image, as the processor returns.

    Returns:
        A list of int tensors, one per image, of shape (n_image_tokens, 3): view (0 = base view,
        1.. = anyres tiles in the processor's order, -2 = newline), patch_row, patch_col
        (-1 where undefined).
    """
    inner = getattr(model, "model", model)
    cfg = model.config
    vcfg = cfg.vision_config
    side = vcfg.image_size // vcfg.patch_size
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    if hasattr(inner, "pack_image_features") and getattr(cfg, "image_grid_pinpoints", None):
        feats = []
        for size in image_sizes:
            n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vcfg.image_size)
            view = torch.arange(n)[:, None].expand(n, side * side)
            feats.append(torch.stack([view, rows.flatten().expand(n, -1), cols.flatten().expand(n, -1)], -1).float())
        newline = torch.tensor([-2.0, -1.0, -1.0])
        packed, _ = inner.pack_image_features(
            feats, image_sizes, cfg.vision_feature_select_strategy, image_newline=newline
        )
        return [p.round().long() for p in packed]
    # Fallback: a single square view (e.g. LLaVA-1.5).
    base = torch.stack([torch.zeros(side * side, dtype=torch.long), rows.flatten(), cols.flatten()], -1)
    return [base.clone() for _ in range(len(image_sizes))]
