"""The head turns a tapped tensor into the stored feature: pooling, then optional L2.

Retrieval pools follow the definitions of Radenović et al. (cnnimageretrieval): MAC (max),
SPoC (average), GeM (generalized mean with power p over positive activations) and R-MAC
(MAC of square regions at L scales, each L2-normalised, summed with the global MAC).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imgfeat.errors import UsageError

EPS = 1e-6
SPATIAL_ONLY = ("gem", "rmac")
_ALIASES = {"mac": "max", "spoc": "avg"}


def apply_head(tensor: torch.Tensor, pool: str = "avg", l2: bool = False,
               gem_p: float = 3.0, rmac_levels: int = 3) -> torch.Tensor:
    """Pool a map (N, C, H, W) over space or tokens (N, T, C) over tokens; vectors pass."""
    tensor = tensor.float()
    pool = _ALIASES.get(pool, pool)
    if pool != "none" and tensor.ndim in (3, 4):
        tensor = _pool(tensor, pool, gem_p, rmac_levels)
    if l2:
        tensor = F.normalize(tensor.flatten(1), dim=1).view(tensor.shape)
    return tensor


def _pool(tensor: torch.Tensor, pool: str, gem_p: float, levels: int) -> torch.Tensor:
    if pool in SPATIAL_ONLY and tensor.ndim != 4:
        raise UsageError(f"--pool {pool} needs a spatial map (N, C, H, W); this layer gives "
                         f"{tuple(tensor.shape)}: choose a convolutional layer")
    dims = (2, 3) if tensor.ndim == 4 else (1,)
    if pool == "avg":
        return tensor.mean(dims)
    if pool == "max":
        return tensor.amax(dims)
    if pool == "gem":
        return gem(tensor, gem_p)
    return rmac(tensor, levels)


def gem(maps: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """(mean over positions of max(x, eps)^p)^(1/p), per channel."""
    return maps.clamp(min=EPS).pow(p).mean((2, 3)).pow(1.0 / p)


def rmac(maps: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """Sum of the L2-normalised MACs of the whole map and of R-MAC's regions."""
    total = _unit(maps.amax((2, 3)))
    for top, left, side in rmac_regions(maps.shape[2], maps.shape[3], levels):
        total = total + _unit(maps[:, :, top:top + side, left:left + side].amax((2, 3)))
    return total


def rmac_regions(height: int, width: int, levels: int = 3,
                 overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """(top, left, side) of the square regions: at level l the side is 2 min(H, W) / (l + 1),
    with l regions along the short side and l + extra along the long one, where `extra`
    (0 to 5) makes consecutive regions of level 1 overlap by about 40%."""
    short, long_ = min(height, width), max(height, width)
    extra = 0
    if height != width:
        candidates = [(abs((short * short - short * (long_ - short) / (steps - 1))
                           / (short * short) - overlap), steps) for steps in range(2, 8)]
        extra = min(candidates)[1] - 1
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        for top in _starts(height, side, level + extra_h):
            for left in _starts(width, side, level + extra_w):
                regions.append((top, left, side))
    return regions


def _starts(length: int, side: int, count: int) -> list[int]:
    """`count` region starts spread evenly over `length` (as R-MAC places region centres)."""
    half = math.floor(side / 2 - 1)
    step = 0 if count == 1 else (length - side) / (count - 1)
    return [int(math.floor(half + i * step) - half) for i in range(count)]


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / (vectors.norm(dim=1, keepdim=True) + EPS)
