"""Weights: reading a local state dict safely, and fingerprinting whatever weights a model has."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from imgfeat.errors import UsageError

RANDOM_SEED = 0  # random weights are the same on every run, so resume and tests are exact
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch pickle loaded with `weights_only=True`."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # each library raises its own types for a bad file
        raise UsageError(f"cannot read weights file {path}: {_first_line(exc)}") from None
    return _unwrap(state, path)


def _unwrap(state: object, path: str) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise UsageError(f"weights file {path} holds no state dict")
    tensors = {k.removeprefix("module."): v for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UsageError(f"weights file {path} holds no tensors")
    return tensors


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: str, spec: str) -> None:
    """Load strictly; a mismatch is one line naming a few of the offending keys."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln),
                      _first_line(exc))
        raise UsageError(f"weights file {path} does not fit {spec}: {detail}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise UsageError(f"weights file {path} does not fit {spec}: {'; '.join(parts)}")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(module: nn.Module) -> str:
    """sha256 over parameter and buffer names and bytes: the identity of the weights in use."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


@contextmanager
def seeded():
    """Random initialisation that does not disturb the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def download_error(spec: str, exc: BaseException) -> UsageError:
    return UsageError(
        f"could not get pretrained weights for {spec} ({_first_line(exc)}); "
        "with no network, pass --weights PATH to a local weights file, or --weights random"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]

