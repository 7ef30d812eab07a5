"""`hf:REPO` (or a local folder): a Hugging Face vision backbone and its image processor.

Besides every named module, three layers give the usual image embeddings: `cls` (the first
token of the last hidden state), `mean` (the mean of its tokens, or of its map for
convolutional backbones) and `pooled` (the model's pooler output). The default is `pooled`
when the model has a pooler, else `cls`.

Dual encoders (CLIP, SigLIP: a model with `get_image_features` and a `vision_model`) run only
their vision tower, whose layers are named as a backbone's, and add `embed`: the projected
image embedding `get_image_features` returns, the one text queries compare with. It is their
default layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import download_error, seeded, state_digest

# PIL's resampling numbers, as image processors store them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFImageModel(nn.Module):
    """The backbone, then identity taps for the embeddings users ask for."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cls, self.mean, self.pooled = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        if hidden.ndim == 4:  # a convolutional backbone: (N, C, H, W)
            cls = mean = self.mean(hidden.mean((2, 3)))
        else:
            cls, mean = self.cls(hidden[:, 0]), self.mean(hidden.mean(1))
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return self.pooled(pooled.flatten(1))
        return cls if hidden.ndim == 3 else mean


class HFDualImageModel(nn.Module):
    """A dual encoder's vision tower and its projection: the text tower is left out, so a
    worker neither holds nor runs it. `embed` is what `get_image_features` returns; without
    a `projection` (one imgfeat cannot reproduce) there is no `embed` and `pooled` ends it."""

    def __init__(self, vision: nn.Module, projection: nn.Module | None):
        super().__init__()
        # `model` as for a backbone, so layer names read the same (model.encoder.layers.0)
        self.model = vision
        self.cls, self.mean, self.pooled = nn.Identity(), nn.Identity(), nn.Identity()
        self.has_embed = projection is not None
        if projection is not None:
            self.projection, self.embed = projection, nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        hidden = out.last_hidden_state
        self.cls(hidden[:, 0])
        self.mean(hidden.mean(1))
        pooled = self.pooled(out.pooler_output)
        return self.embed(self.projection(pooled)) if self.has_embed else pooled


def is_dual_encoder(model: nn.Module) -> bool:
    """CLIP-like: an image tower reached through `get_image_features` beside a text tower."""
    return hasattr(model, "get_image_features") and hasattr(model, "vision_model")


def load(repo: str, weights: str) -> LoadedModel:
    spec = f"hf:{repo}"
    processor, model = build(repo, weights)
    if is_dual_encoder(model):
        image = image_side(model, _size(processor))
        return LoadedModel(spec, image, _preprocess(processor), None,
                           default_layer="embed" if image.has_embed else "pooled")
    wrapped = HFImageModel(model.eval())
    with torch.inference_mode():
        probe = model(pixel_values=torch.zeros(1, 3, *_size(processor)))
    default = "pooled" if getattr(probe, "pooler_output", None) is not None else \
        ("cls" if probe.last_hidden_state.ndim == 3 else "mean")
    return LoadedModel(spec, wrapped.eval(), _preprocess(processor), None,
                       default_layer=default)


def build(repo: str, weights: str) -> tuple[Any, nn.Module]:
    """(image processor, whole model in eval mode). Random weights are seeded, so the text
    side of a search rebuilds the very model extraction used."""
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face models need transformers: pip install transformers") \
            from None
    spec = f"hf:{repo}"
    if weights not in ("pretrained", "random"):
        raise UsageError(f"the weights of {spec} come with the repository; drop --weights")
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(repo)
        if weights == "random":
            config = transformers.AutoConfig.from_pretrained(repo)
            with seeded():
                model = transformers.AutoModel.from_config(config)
        else:
            model = transformers.AutoModel.from_pretrained(repo)
    except (OSError, ValueError) as exc:
        raise download_error(spec, exc) from None
    return processor, model.eval()


def image_side(model: nn.Module, size: tuple[int, int]) -> HFDualImageModel:
    """The dual encoder's image side. Its `embed` is checked once against
    `get_image_features` on a probe of the extraction's size: a model whose embedding is not
    projection(vision pooler) (CLIP) or the vision pooler itself (SigLIP) gets no `embed`
    rather than a wrong one."""
    projection = getattr(model, "visual_projection", None)
    if projection is None:  # SigLIP: the vision pooler (its head) is the embedding
        projection = nn.Identity()
    wrapped = HFDualImageModel(model.vision_model, projection).eval()
    probe = torch.linspace(-1, 1, 3 * size[0] * size[1]).reshape(1, 3, *size)
    try:
        with torch.inference_mode():
            expected = projected(model.get_image_features(pixel_values=probe))
            got = wrapped(probe)
        same = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4,
                                                                rtol=1e-4)
    except Exception:  # a model that wants more than pixels: no embed, not a crash
        same = False
    return wrapped if same else HFDualImageModel(model.vision_model, None).eval()


def projected(out: Any) -> torch.Tensor:
    """`get_image_features`/`get_text_features` return a tensor in transformers 4 and an
    output whose pooler_output is the projected embedding in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def text_tower(repo: str, weights: str) -> tuple[Callable[[list[str]], Any], str]:
    """(encode, digest): encode is texts -> (N, D) float32 text embeddings of the dual encoder
    `load(repo, weights)` extracts images with, tokenized by the repository's own tokenizer;
    digest is that of its image side, to check against the store's (a hub repo may have
    changed since extraction)."""
    import transformers

    spec = f"hf:{repo}"
    processor, model = build(repo, weights)
    if not (is_dual_encoder(model) and hasattr(model, "get_text_features")):
        raise UsageError(f"{spec} has no text tower to embed text queries with")
    image = image_side(model, _size(processor))
    if not image.has_embed:
        raise UsageError(f"{spec}: imgfeat cannot reproduce its image embedding, so a text "
                         "cannot be compared with its images")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(repo)
    except (OSError, ValueError) as exc:
        raise download_error(spec, exc) from None
    # SigLIP was trained on texts padded to the full length; CLIP masks padding either way
    padding = "max_length" if "siglip" in model.config.model_type else True
    text_config = getattr(model.config, "text_config", None)
    limit = getattr(text_config, "max_position_embeddings", None)  # None: the tokenizer's

    def encode(texts: list[str]):
        tokens = tokenizer(texts, padding=padding, truncation=True, max_length=limit,
                           return_tensors="pt")
        with torch.inference_mode():
            return projected(model.get_text_features(**tokens)).float().numpy()

    return encode, state_digest(image)


def _size(processor) -> tuple[int, int]:
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop",
                                                             False) else None
    size = crop or processor.size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge


def _preprocess(processor) -> Preprocess:
    size = _size(processor)
    resize = processor.size
    if getattr(processor, "do_center_crop", False) and "shortest_edge" in resize:
        crop_pct, mode = size[0] / int(resize["shortest_edge"]), "crop"
    elif "height" in resize:
        crop_pct, mode = 1.0, "squash"
    else:
        crop_pct, mode = 1.0, "crop"
    return Preprocess(size=size, crop_pct=min(crop_pct, 1.0), mode=mode,
                      interpolation=_RESAMPLE.get(int(getattr(processor, "resample", 2)),
                                                  "bilinear"),
                      mean=tuple(processor.image_mean), std=tuple(processor.image_std))
