"""`torchvision:NAME`: torchvision's classification models and their weights' transforms."""

from __future__ import annotations

import difflib

from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import download_error, load_into, read_state_dict, seeded


def load(name: str, weights: str) -> LoadedModel:
    from torchvision import models

    spec = f"torchvision:{name}"
    names = models.list_models(module=models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (did you mean {', '.join('torchvision:' + c for c in close)}?)" if close else ""
        raise UsageError(f"unknown model {spec}{hint}")
    default = models.get_model_weights(name).DEFAULT  # metadata only: no download
    if weights == "pretrained":
        try:
            module = models.get_model(name, weights=default)
        except Exception as exc:  # network and cache errors come in many types
            raise download_error(spec, exc) from None
    else:
        with seeded():
            module = models.get_model(name, weights=None)
        if weights != "random":
            state = read_state_dict(weights)
            module = _fit_classifier(models, name, module, state)
            load_into(module, state, weights, spec)
    return LoadedModel(spec, module.eval(), _preprocess(default), _last_linear(module))


def _fit_classifier(models, name: str, module: nn.Module, state: dict) -> nn.Module:
    """Rebuild with the checkpoint's number of classes (fine-tuned models differ)."""
    last = _last_linear(module)
    weight = state.get(f"{last}.weight") if last else None
    if weight is None or weight.shape[0] == module.get_submodule(last).out_features:
        return module
    with seeded():
        return models.get_model(name, weights=None, num_classes=int(weight.shape[0]))


def _preprocess(weights) -> Preprocess:
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    return Preprocess(
        size=(crop, crop),
        crop_pct=crop / resize,
        mode="crop",
        interpolation=transform.interpolation.value,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def _last_linear(module: nn.Module) -> str | None:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None
