"""`timm:NAME`: any timm architecture, with timm's own pretrained config for preprocessing."""

from __future__ import annotations

import difflib

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import download_error, load_into, read_state_dict, seeded

_CROP_MODES = {"center": "crop", "squash": "squash", "border": "pad"}


def load(name: str, weights: str) -> LoadedModel:
    import timm

    spec = f"timm:{name}"
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join('timm:' + c for c in close)}?)" if close else ""
        raise UsageError(f"unknown model {spec}{hint}")
    if weights == "pretrained":
        try:
            module = timm.create_model(name, pretrained=True)
        except Exception as exc:  # hub, network and cache errors come in many types
            raise download_error(spec, exc) from None
    elif weights == "random":
        with seeded():
            module = timm.create_model(name, pretrained=False)
    else:
        state = read_state_dict(weights)
        with seeded():
            module = timm.create_model(name, pretrained=False,
                                       num_classes=_num_classes(timm, name, state))
        load_into(module, state, weights, spec)
    return LoadedModel(spec, module.eval(), _preprocess(timm, module),
                       _classifier_name(module))


def _num_classes(timm, name: str, state: dict) -> int:
    """A fine-tuned checkpoint may have any number of classes, or no classifier at all."""
    head = timm.models.get_pretrained_cfg(name)
    classifier = getattr(head, "classifier", None) if head else None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None else 0


def _preprocess(timm, module) -> Preprocess:
    config = timm.data.resolve_model_data_config(module)
    return Preprocess(
        size=tuple(config["input_size"][1:]),
        crop_pct=config.get("crop_pct") or 0.875,
        mode=_CROP_MODES.get(config.get("crop_mode") or "center", "crop"),
        interpolation=config.get("interpolation") or "bilinear",
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


def _classifier_name(module) -> str | None:
    try:
        classifier = module.get_classifier()
    except (AttributeError, NotImplementedError):
        return None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    return next((n for n, m in module.named_modules() if m is classifier and n), None)
