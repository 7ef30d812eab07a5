"""Model specs resolve to a module plus its preprocessing. Every kind the code accepts is in
`MODEL_KINDS`, which the command line's help and the error for an unknown spec both show."""

from __future__ import annotations

from imgfeat.errors import UsageError
from imgfeat.models import (
    caffe,
    file_backend,
    hf_backend,
    openclip_backend,
    timm_backend,
    torchvision_backend,
)
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import file_sha256, state_digest
from imgfeat.options import DEFAULT_MODEL, MODEL_KINDS

BACKENDS = {"timm": timm_backend.load, "torchvision": torchvision_backend.load,
            "open_clip": openclip_backend.load, "hf": hf_backend.load}

__all__ = ["DEFAULT_MODEL", "MODEL_KINDS", "LoadedModel", "Preprocess", "load_model"]


def load_model(spec: str, weights: str = "pretrained") -> LoadedModel:
    """Resolve `spec` (`timm:resnet50`, `torchvision:vit_b_16`) with `weights`
    (`pretrained`, `random`, or a path to a state dict)."""
    if file_backend.is_model_file(spec):
        return file_backend.load(spec, weights)
    if caffe.is_prototxt(spec):
        loaded = caffe.load(spec, weights)
        loaded.weights = {"kind": "random", **loaded.weights,
                          "digest": state_digest(loaded.module)}
        return loaded
    prefix, sep, name = spec.partition(":")
    if not sep or prefix not in BACKENDS or not name:
        raise UsageError(f"unknown model spec {spec!r}: write it as one of "
                         f"{', '.join(MODEL_KINDS)}; e.g. timm:resnet50")
    loaded = BACKENDS[prefix](name, weights)
    loaded.weights = _describe_weights(loaded, weights)
    return loaded


def _describe_weights(loaded: LoadedModel, weights: str) -> dict:
    kind = weights if weights in ("pretrained", "random") else "file"
    described = {"kind": kind, "digest": state_digest(loaded.module)}
    if kind == "file":
        described.update(path=weights, sha256=file_sha256(weights))
    return described
