"""Caffe models without Caffe: `--model deploy.prototxt --weights net.caffemodel`.

Preprocessing follows Caffe's conventions: BGR channel order, 0-255 pixel values minus the
mean pixel (the published VGG mean [103.939, 116.779, 123.68] unless --mean-pixel or
--mean-file says otherwise), times --input-scale; the input size is the net's own, reached by
resizing to 256/224 of it and cropping the centre, as Caffe's reference pipelines do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError
from google.protobuf.text_format import ParseError

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.caffe.net import CaffeNet
from imgfeat.models.caffe.schema import parse_binary, parse_prototxt
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import file_sha256, seeded

VGG_MEAN_BGR = (103.939, 116.779, 123.68)


def is_prototxt(spec: str) -> bool:
    return spec.lower().endswith(".prototxt")


def load(spec: str, weights: str) -> LoadedModel:
    net = _read(spec, lambda data: parse_prototxt(data.decode("utf-8")), "prototxt")
    if weights == "pretrained":
        raise UsageError("a Caffe net needs its weights: --weights NET.caffemodel "
                         "(or --weights random)")
    trained = None if weights == "random" else _read(weights, parse_binary, "caffemodel")
    with seeded():
        module = CaffeNet(net, trained).eval()
    model = LoadedModel(spec, module, caffe_preprocess(module.input_shape[2:]), None,
                        default_layer=_default_layer(module), layer_names=module.names())
    model.make_tap = lambda layers, device: CaffeTap(module, layers)
    if trained is not None:
        model.weights = {"kind": "file", "path": weights, "sha256": file_sha256(weights)}
    return model


def _read(path: str, parse, what: str):
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return parse(data)
    except (ParseError, DecodeError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path} is not a valid Caffe {what}: {first[:300]}") from None


def caffe_preprocess(size, mean_pixel=VGG_MEAN_BGR, scale: float = 1.0) -> Preprocess:
    """Caffe's convention in imgfeat's terms: (255 x - mean) * scale on BGR pixels."""
    return Preprocess(size=tuple(int(s) for s in size), crop_pct=0.875,
                      interpolation="bilinear", bgr=True,
                      mean=tuple(m / 255.0 for m in mean_pixel),
                      std=(1.0 / (255.0 * scale),) * 3)


def mean_from_file(path: str) -> tuple[float, float, float]:
    """The per-channel mean of a .binaryproto mean image (Caffe's channel order)."""
    blob = _read(path, lambda data: parse_binary(data, "BlobProto"), "mean file")
    values = np.asarray(blob.data or blob.double_data, dtype=np.float64)
    channels = blob.shape.dim[-3] if len(blob.shape.dim) >= 3 else blob.channels
    if channels != 3 or values.size % 3:
        raise UsageError(f"mean file {path} does not hold a 3-channel image")
    return tuple(values.reshape(3, -1).mean(axis=1))


def _default_layer(net: CaffeNet) -> str:
    """What the last InnerProduct reads (fc7 in VGG), else the net's output."""
    products = [bottoms[0] for (_, bottoms, _), step in zip(net.specs, net.steps)
                if type(step).__name__ == "InnerProduct"]
    return products[-1] if products and products[-1] != net.input_name else net.output


class CaffeTap:
    def __init__(self, net: CaffeNet, layers: list[str]):
        self.net, self.layers = net, list(layers)

    def probe(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(batch)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        found = self.net.run(batch.contiguous(), self.layers)
        return {layer: found[layer] for layer in self.layers}
