"""What every model backend returns: a module, its preprocessing, and its identity."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from imgfeat.models.preprocess import Preprocess


@dataclass
class LoadedModel:
    """A model ready for extraction. `classifier` names the module whose *input* is the
    pooled pre-logits embedding; None when the model has none. `layer_names` restricts the
    layers that can be tapped (default: every named module, `output` and `pre_logits`);
    `make_tap(layers, device)` replaces hook-based taps for models that are not PyTorch."""

    spec: str
    module: nn.Module
    preprocess: Preprocess
    classifier: str | None
    weights: dict = field(default_factory=dict)
    default_layer: str = "pre_logits"
    layer_names: list[str] | None = None
    make_tap: Callable | None = None

    def describe(self) -> dict:
        return {"spec": self.spec, "weights": self.weights}
