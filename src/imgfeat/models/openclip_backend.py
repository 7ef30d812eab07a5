"""`open_clip:ARCH/PRETRAINED`: the image tower of an open_clip model, with its preprocessing.

ARCH is an open_clip model name, `hf-hub:ORG/REPO`, or the path of a model config (.json)
for a local architecture. The default layer is the tower's output: the image embedding.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import download_error, seeded

_MODES = {"shortest": "crop", "squash": "squash", "longest": "pad"}


def load(name: str, weights: str) -> LoadedModel:
    try:
        import open_clip
    except ImportError:
        raise UsageError("open_clip models need open_clip: pip install open_clip_torch") \
            from None
    model, arch = _create(open_clip, name, weights)
    config = open_clip.get_model_preprocess_cfg(model)
    preprocess = Preprocess(size=tuple(config["size"]), crop_pct=1.0,
                            mode=_MODES.get(config.get("resize_mode"), "crop"),
                            interpolation=config.get("interpolation") or "bicubic",
                            mean=tuple(config["mean"]), std=tuple(config["std"]))
    return LoadedModel(f"open_clip:{name}", model.visual.eval(), preprocess, None,
                       default_layer="output")


def text_tower(name: str, weights: str):
    """texts -> (N, D) float32 text embeddings of the model `load(name, weights)` builds: the
    same seeded construction, so random weights match the image tower's store too."""
    import open_clip
    import torch

    model, arch = _create(open_clip, name, weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)

    def encode(texts: list[str]):
        with torch.inference_mode():
            return model.encode_text(tokenizer(texts)).float().numpy()

    return encode


def _create(open_clip, name: str, weights: str):
    """(the whole open_clip model, its architecture name)."""
    arch, tag = _split(name)
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise UsageError(f"open_clip model config not found: {arch}")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    elif not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown open_clip model {arch!r}{hint}")
    pretrained = _pretrained(arch, tag, weights)
    spec = f"open_clip:{name}"
    try:
        with seeded():
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
    except Exception as exc:  # hub, network, cache and checkpoint errors come in many types
        if pretrained and weights == "pretrained":
            raise download_error(spec, exc) from None
        raise UsageError(f"cannot build {spec}: {str(exc).splitlines()[0][:300]}") from None
    return model, arch


def _split(name: str) -> tuple[str, str]:
    """(architecture, pretrained tag) of ARCH/TAG, a config path (.json[/TAG]) or hf-hub:..."""
    if name.startswith("hf-hub:"):
        return name, ""
    if ".json" in name:
        path, _, tag = name.partition(".json")
        return path + ".json", tag.lstrip("/")
    arch, _, tag = name.partition("/")
    return arch, tag


def _pretrained(arch: str, tag: str, weights: str) -> str | None:
    if weights == "random":
        return None
    if weights != "pretrained":
        if not Path(weights).is_file():
            raise UsageError(f"weights file not found: {weights}")
        return weights
    if arch.startswith("hf-hub:"):
        return None  # the hub repo holds its weights
    if not tag:
        raise UsageError(f"name the pretrained weights: open_clip:{arch}/TAG (e.g. "
                         "open_clip:ViT-B-32/laion2b_s34b_b79k), or --weights random")
    return tag
