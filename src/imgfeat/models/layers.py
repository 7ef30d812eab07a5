"""Layers chosen by name: a tap records one module's output (or the classifier's input) and
stops the forward pass there, so tapping an early layer costs only the layers before it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel

PRE_LOGITS = "pre_logits"
OUTPUT = "output"  # the whole model's output


class _Reached(Exception):
    """Raised by a hook once the tapped tensor is in hand: the rest of the net is skipped."""


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    shape: tuple[int, ...] | None  # output shape for one image; None if not a tensor


def resolve_layers(model: LoadedModel, layers: list[str] | None) -> list[str]:
    """Canonical, distinct names of the layers to tap (none given: the pre-logits embedding)."""
    resolved = [resolve_layer(model, layer) for layer in (layers or [None])]
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"a layer is named twice in {resolved}")
    if any("\0" in layer for layer in resolved):  # HDF5 strings end at a NUL
        raise UsageError("a layer name with a NUL character cannot be stored")
    return resolved


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    """The canonical name of `layer` (None: the model's default), or a one-line error."""
    layer = layer or model.default_layer
    if model.layer_names is not None:
        if layer in model.layer_names:
            return layer
        return _unknown(model, layer, model.layer_names)
    if layer == OUTPUT:
        return OUTPUT
    if layer == PRE_LOGITS:
        if model.classifier is None:
            raise UsageError(f"{model.spec} has no linear classifier to take the pre-logits "
                             "embedding from; choose a layer with --layer "
                             f"(imgfeat layers {model.spec} lists them)")
        return PRE_LOGITS
    names = [n for n, _ in model.module.named_modules() if n]
    if layer not in names:
        _unknown(model, layer, names)
    return layer


def _unknown(model: LoadedModel, layer: str, names: list[str]):
    close = difflib.get_close_matches(layer, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UsageError(f"unknown layer {layer!r} for {model.spec}{hint}; "
                     f"'imgfeat layers {model.spec}' lists the valid names")


class Tap:
    """Runs the model up to the last of its layers and returns each layer's tensor.

    A module called several times in one pass (a shared activation) is tapped at its last
    call, which a probe pass counts.
    """

    def __init__(self, model: LoadedModel, layers: list[str]):
        self.module = model.module
        self.layers = list(layers)
        self._calls = dict.fromkeys(self.layers, 1)
        self._seen = dict.fromkeys(self.layers, 0)
        self._tensors: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            name = {PRE_LOGITS: model.classifier, OUTPUT: ""}.get(layer, layer)
            target = self.module.get_submodule(name)
            if layer == PRE_LOGITS:
                target.register_forward_pre_hook(
                    lambda _m, args, layer=layer: self._record(layer, args[0] if args else None))
            else:
                target.register_forward_hook(
                    lambda _m, _a, output, layer=layer: self._record(layer, output))

    def probe(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """A first pass that counts the calls of each tapped module; returns the tensors."""
        self._calls = dict.fromkeys(self.layers, 10**9)
        try:
            self._run(batch)
        finally:
            self._calls = {layer: max(1, seen) for layer, seen in self._seen.items()}
        return self(batch)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self._run(batch)
        if missing := [layer for layer in self.layers if layer not in self._tensors]:
            raise RuntimeError(f"layer {missing[0]} was not reached by the forward pass")
        tensors, self._tensors = self._tensors, {}
        return {layer: tensors[layer] for layer in self.layers}

    def _run(self, batch: torch.Tensor) -> None:
        self._seen = dict.fromkeys(self.layers, 0)
        self._tensors = {}
        try:
            self.module(batch)
        except _Reached:
            pass
        except BaseException:
            self._tensors = {}  # a failed pass (out of memory) must not keep its tensors alive
            raise

    def _record(self, layer: str, value) -> None:
        self._seen[layer] += 1
        self._tensors[layer] = _first_tensor(value, layer)
        if all(self._seen[name] >= self._calls[name] for name in self.layers):
            raise _Reached


def _first_tensor(value, layer: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "to_tuple"):  # Hugging Face model outputs
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        for element in value:
            if isinstance(element, torch.Tensor):
                return element
    raise UsageError(f"layer {layer} gives a {type(value).__name__}, not a tensor; "
                     "choose another layer")


def list_layers(model: LoadedModel, batch: torch.Tensor) -> list[LayerInfo]:
    """Every tappable name with its output shape for one image, in definition order."""
    if model.layer_names is not None:  # not hookable: the names the model declares
        return [LayerInfo(name, "value", None) for name in model.layer_names]
    shapes: dict[str, tuple[int, ...] | None] = {}

    def hook(name):
        def record(_module, _args, output):
            tensor = _first_tensor(output, name) if isinstance(output, (torch.Tensor, tuple,
                                                                         list)) else None
            shapes[name] = tuple(tensor.shape[1:]) if tensor is not None else None
        return record

    modules = list(model.module.named_modules())
    handles = [m.register_forward_hook(hook(n or OUTPUT)) for n, m in modules]
    try:
        with torch.inference_mode():
            model.module(batch)
    finally:
        for handle in handles:
            handle.remove()
    infos = [LayerInfo(n or OUTPUT, type(m).__name__ if n else "model output",
                       shapes.get(n or OUTPUT)) for n, m in modules]
    if model.classifier is not None:
        classifier = model.module.get_submodule(model.classifier)
        width = getattr(classifier, "in_features", None)
        infos.insert(0, LayerInfo(PRE_LOGITS, "embedding (default)", (width,) if width else None))
    return infos
