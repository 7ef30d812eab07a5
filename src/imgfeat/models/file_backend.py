"""Models that come as one file: TorchScript (`torch.jit.save`, .pt / .torchscript), an exported
program (`torch.export.save`, .pt2) and ONNX (.onnx, run with onnxruntime).

A file carries no preprocessing: the default is ImageNet's (224 or the file's own fixed input
size, crop 0.875, bilinear, ImageNet mean and std), and the usual flags override it. Layers:
TorchScript gives its `output`; an exported program is unflattened so its modules can be
tapped by name like any PyTorch model; ONNX gives any value of its graph by name.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgfeat.errors import UsageError
from imgfeat.models.base import LoadedModel
from imgfeat.models.preprocess import Preprocess
from imgfeat.models.weights import file_sha256

KINDS = {".pt": "torchscript", ".torchscript": "torchscript", ".pt2": "export", ".onnx": "onnx"}
OUTPUT = "output"


def is_model_file(spec: str) -> bool:
    return Path(spec).suffix.lower() in KINDS and ":" not in spec.split("/")[0]


def load(spec: str, weights: str) -> LoadedModel:
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"model file not found: {spec}")
    if weights not in ("pretrained", "random"):
        raise UsageError(f"the weights of {spec} are inside the file; drop --weights")
    kind = KINDS[path.suffix.lower()]
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notices are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            loaded = {"torchscript": _torchscript, "export": _exported, "onnx": _onnx}[kind](
                path)
    except UsageError:
        raise
    except Exception as exc:  # each format's loader raises its own types for a bad file
        lines = str(exc).strip().splitlines()
        raise UsageError(f"cannot load {kind} model {spec}: "
                         f"{lines[0][:300] if lines else type(exc).__name__}") from None
    loaded.weights = {"kind": "inside the model file", "sha256": file_sha256(str(path))}
    return loaded


def _preprocess(size: tuple[int, int] | None) -> Preprocess:
    return Preprocess(size=size or (224, 224))


class _Scripted(nn.Module):
    """A plain module around a ScriptModule, so the output can be tapped by a hook."""

    def __init__(self, scripted):
        super().__init__()
        self.scripted = scripted

    def forward(self, x):
        return self.scripted(x)


def _torchscript(path: Path) -> LoadedModel:
    module = _Scripted(torch.jit.load(str(path), map_location="cpu"))
    return LoadedModel(str(path), module.eval(), _preprocess(None), None,
                       default_layer=OUTPUT, layer_names=[OUTPUT])


def _exported(path: Path) -> LoadedModel:
    program = torch.export.load(str(path))
    module = torch.export.unflatten(program)
    shape = next((node.meta["val"].shape for node in program.graph.nodes
                  if node.op == "placeholder" and "val" in node.meta
                  and node.name not in program.graph_signature.inputs_to_parameters
                  and node.name not in program.graph_signature.inputs_to_buffers), None)
    return LoadedModel(str(path), module, _preprocess(_static_size(shape)), None,
                       default_layer=OUTPUT)


def _static_size(shape) -> tuple[int, int] | None:
    if shape is None or len(shape) != 4:
        return None
    try:
        return int(shape[2]), int(shape[3])
    except (TypeError, ValueError):  # symbolic: any size
        return None


def _onnx(path: Path) -> LoadedModel:
    try:
        import onnx
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError("ONNX models need onnx and onnxruntime: "
                         "pip install 'imgfeat[onnx]'") from None
    graph = onnx.load(str(path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    size = (dims[2].dim_value, dims[3].dim_value) if len(dims) == 4 and dims[2].dim_value \
        and dims[3].dim_value else None
    outputs = [o.name for o in graph.output]
    values = outputs + [out for node in graph.node for out in node.output
                        if out and out not in outputs]
    model = LoadedModel(str(path), nn.Identity(), _preprocess(size), None,
                        default_layer=OUTPUT,
                        layer_names=[OUTPUT, *(v for v in values if v != OUTPUT)])
    model.make_tap = lambda layers, device: OnnxTap(path, graph.input[0].name, outputs[0],
                                                    layers, device)
    return model


class OnnxTap:
    """Runs an ONNX graph with the tapped values added as outputs (CUDA provider on a GPU)."""

    def __init__(self, path: Path, input_name: str, output_name: str, layers: list[str],
                 device: torch.device):
        import onnx
        import onnxruntime as ort

        self.layers = list(layers)
        self._names = [output_name if layer == OUTPUT else layer for layer in self.layers]
        graph_model = onnx.load(str(path))
        present = {o.name for o in graph_model.graph.output}
        for name in self._names:
            if name not in present:
                graph_model.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
        providers = ["CPUExecutionProvider"]
        cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        if cuda:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # its own notice of a provider that failed is many lines
        self._session = ort.InferenceSession(graph_model.SerializeToString(), options,
                                             providers=providers)
        if device.type == "cuda" and "CUDAExecutionProvider" not in self._session.get_providers():
            why = "its CUDA provider did not load" if cuda else \
                "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
            print(f"imgfeat: {path.name} runs on the CPU, not {device}: {why}",
                  file=sys.stderr, flush=True)
        self._input, self._device = input_name, device

    def probe(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return self(batch)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self._input: batch.float().contiguous().cpu().numpy()}
        values = self._session.run(self._names, feed)
        return {layer: torch.from_numpy(np.asarray(value)).to(self._device)
                for layer, value in zip(self.layers, values)}
