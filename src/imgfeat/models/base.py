"""What every model backend returns: a module, its preprocessing, and its identity."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from imgfeat.models.preprocess import Preprocess


@dataclass
class LoadedModel:
    """A model ready for extraction. `classifier` names the module whose *input* is the
    pooled pre-logits embedding (the default layer); None when the model has none."""

    spec: str
    module: nn.Module
    preprocess: Preprocess
    classifier: str | None
    weights: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"spec": self.spec, "weights": self.weights}
