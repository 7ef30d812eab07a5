"""`hf:REPO` (or a local folder): a Hugging Face vision backbone and its image processor.

Besides every named module, three layers give the usual image embeddings: `cls` (the first
token of the last hidden state), `mean` (the mean of its tokens, or of its map for
convolutional backbones) and `pooled` (the model's pooler output). The default is `pooled`
when the model has a pooler, else `cls`.
"""

from __future__ import annotations

import torch
from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import download_error, seeded

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


def load(repo: str, weights: str) -> LoadedModel:
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
    wrapped = HFImageModel(model.eval())
    with torch.inference_mode():
        probe = model(pixel_values=torch.zeros(1, 3, *_size(processor)))
    default = "pooled" if getattr(probe, "pooler_output", None) is not None else \
        ("cls" if probe.last_hidden_state.ndim == 3 else "mean")
    return LoadedModel(spec, wrapped.eval(), _preprocess(processor), None,
                       default_layer=default)


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
