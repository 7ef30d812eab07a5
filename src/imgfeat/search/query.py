"""Queries embedded as the store's own extraction embeds images: the recorded model, weights,
layer, head and preprocessing, decoded by the pipeline's own decoder. The model is built once,
on first use, and serves every query after."""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgfeat.errors import UsageError
from imgfeat.options import DEFAULT_MAX_PIXELS
from imgfeat.search.vectors import unit
from imgfeat.sources.item import is_image_name

MAX_QUERY_BYTES = 64 * 1024 * 1024  # a query image larger than this is not an image we want
URL_TIMEOUT_S = 30


@dataclass(frozen=True)
class Query:
    """What the user asked for (`label`) and either a row of the store or encoded image bytes."""

    label: str
    row: int | None = None
    data: bytes | None = None


def resolve(store, texts: list[str]) -> list[Query]:
    """Each argument as queries: a key of the store, an image file, a folder of images (sorted,
    recursive) or an http(s) URL."""
    queries: list[Query] = []
    for text in texts:
        if text in store:
            queries.append(Query(text, row=store.index(text)))
        elif text.startswith(("http://", "https://")):
            queries.append(Query(text, data=fetch_url(text)))
        elif os.path.isdir(text):
            found = sorted(p for p in Path(text).rglob("*") if p.is_file()
                           and is_image_name(p.name))
            if not found:
                raise UsageError(f"query folder {text} holds no images")
            queries.extend(Query(str(p), data=read_file(str(p))) for p in found)
        elif os.path.isfile(text):
            queries.append(Query(text, data=read_file(text)))
        else:
            raise UsageError(f"query {text!r} is neither a key of the store, an image file, "
                             "a folder nor a URL")
    return queries


def read_file(path: str) -> bytes:
    try:
        if os.path.getsize(path) > MAX_QUERY_BYTES:
            raise UsageError(f"query image {path} is over {MAX_QUERY_BYTES >> 20} MB")
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read query image {path}: {exc.strerror or exc}") from None


def fetch_url(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310
            data = response.read(MAX_QUERY_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot fetch query image {url}: {exc}") from None
    if len(data) > MAX_QUERY_BYTES:
        raise UsageError(f"query image {url} is over {MAX_QUERY_BYTES >> 20} MB")
    return data


class Embedder:
    """Images and (for CLIP stores) texts to unit vectors comparable with a layer of a
    store."""

    def __init__(self, store, layer: str, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.store, self.layer, self.max_pixels = store, layer, max_pixels
        self._extractor = None
        self._text = None

    def images(self, named: list[tuple[str, bytes]]) -> np.ndarray:
        """(N, D) unit vectors of encoded images; an unreadable one is a UsageError naming it."""
        import torch

        from imgfeat.pipeline.cpu_decode import pixels_from_bytes

        extractor = self.extractor()
        pixels = []
        for label, data in named:
            shaped = pixels_from_bytes(data, extractor.preprocess, self.max_pixels)
            if isinstance(shaped, str):
                raise UsageError(f"cannot use query image {label}: {shaped}")
            pixels.append(shaped)
        features = extractor(torch.from_numpy(np.stack(pixels)))[self.layer]
        return unit(features)

    def texts(self, texts: list[str]) -> np.ndarray:
        if self._text is None:
            self._text = _text_tower(self.store, self.layer)
        return unit(self._text(texts))

    def extractor(self):
        if self._extractor is None:
            self._extractor = build_query_extractor(self.store)
        return self._extractor


def build_query_extractor(store):
    """The store's extractor, rebuilt from its manifest on the CPU, eager (the reference the
    frozen and compiled paths are checked against)."""
    from imgfeat.compute.extractor import Extractor
    from imgfeat.models import load_model
    from imgfeat.models.preprocess import Preprocess

    m = store.manifest
    model = load_model(m["model"]["spec"], _weights_argument(m["weights"]))
    _check_weights(store, model.weights)
    preprocess = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in m["preprocess"].items()})
    precision = m.get("precision") if m.get("precision") in ("fp32", "bf16") else "fp32"
    return Extractor(model, store.layers, preprocess, device=_cpu(), precision=precision,
                     pool=m["pool"], l2=m["l2"], dtype="float32", gem_p=m.get("gem_p") or 3.0,
                     scales=tuple(m.get("scales", [1.0])), whitening=_whitening(store),
                     freeze=False)


def _cpu():
    import torch

    return torch.device("cpu")


def _weights_argument(weights: dict) -> str:
    kind = weights.get("kind")
    if kind == "file":
        return weights["path"]
    return kind if kind in ("random", "pretrained") else "pretrained"


def _check_weights(store, loaded: dict) -> None:
    recorded = store.manifest["weights"]
    for field in ("digest", "sha256"):
        if recorded.get(field) and loaded.get(field) and recorded[field] != loaded[field]:
            raise UsageError(f"the model {store.model} loads other weights today than those "
                             f"{store.layout.root} was extracted with ({field} differs): "
                             "queries would not compare with its features")


def _whitening(store):
    recorded = store.manifest.get("whiten")
    if not recorded:
        return None
    from imgfeat.compute.whitening import load

    path = store.layout.root / "whitening.npz"
    if path.exists() and (whitening := load(path)).digest() == recorded["sha256"]:
        return whitening
    raise UsageError(f"{store.layout.root} holds whitened features; put the whitening file "
                     f"they were made with at {path} to embed queries")


def text_layer(store) -> str | None:
    """The layer a text query compares with, the CLIP image embedding (None: the store's model
    has no text tower): open_clip's tower output, or a Hugging Face dual encoder's `embed`
    (only those have one)."""
    spec = store.model
    if spec.startswith("open_clip:"):
        return "output"
    return "embed" if spec.startswith("hf:") and "embed" in store.layers else None


def text_capable(store, layer: str) -> bool:
    """Whether a text query can be compared with `layer` of the store."""
    return layer == text_layer(store) and not store.manifest.get("whiten")


def _text_tower(store, layer: str):
    """texts -> (N, D) embeddings comparable with `layer` of the store, or a one-line error
    saying why a text cannot be compared with it."""
    spec, image_layer = store.model, text_layer(store)
    if image_layer is None:
        raise UsageError(f"text queries need a CLIP model (open_clip:... or a Hugging Face "
                         f"CLIP/SigLIP); {store.layout.root} was extracted with {spec}")
    if not text_capable(store, layer):
        raise UsageError(f"text queries compare with the CLIP image embedding (layer "
                         f"{image_layer}, unwhitened); this search is on layer {layer!r}"
                         + (", whitened" if store.manifest.get("whiten") else ""))
    weights = _weights_argument(store.manifest["weights"])
    if spec.startswith("hf:"):
        from imgfeat.models.hf_backend import text_tower as hf_text_tower

        encode, digest = hf_text_tower(spec.removeprefix("hf:"), weights)
        _check_weights(store, {"digest": digest})
        return encode
    from imgfeat.models.openclip_backend import text_tower

    return text_tower(spec.removeprefix("open_clip:"), weights)
