"""The head turns a tapped tensor into the stored feature: spatial pooling, then optional L2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgfeat.options import POOLS, check_choice


def check_pool(pool: str) -> str:
    return check_choice(pool, POOLS, "pooling")


def apply_head(tensor: torch.Tensor, pool: str = "avg", l2: bool = False) -> torch.Tensor:
    """Pool a map (N, C, H, W) over space, or tokens (N, T, C) over tokens; vectors pass."""
    tensor = tensor.float()
    if pool != "none" and tensor.ndim in (3, 4):
        dims = (2, 3) if tensor.ndim == 4 else (1,)
        tensor = tensor.mean(dims) if pool == "avg" else tensor.amax(dims)
    if l2:
        flat = F.normalize(tensor.flatten(1), dim=1)
        tensor = flat.view(tensor.shape)
    return tensor
