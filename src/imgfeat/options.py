"""Every setting of an extraction run, and the names they accept. Deliberately free of torch
and model libraries: the command line and the coordinator import it, and only the worker
processes pay for importing a deep-learning stack."""

from __future__ import annotations

from dataclasses import dataclass

from imgfeat.errors import UsageError

DEFAULT_MODEL = "timm:resnet50"
# Every kind of model spec imgfeat.models accepts; kept here, free of torch, for the CLI's help.
MODEL_KINDS = (
    "timm:NAME", "torchvision:NAME", "open_clip:ARCH/PRETRAINED", "hf:REPO_OR_FOLDER",
    "a Caffe deploy .prototxt (weights: .caffemodel)", "TorchScript .pt/.torchscript",
    "torch.export .pt2", "ONNX .onnx",
)
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own bomb threshold: a 2 GB RGBA image
POOLS = ("avg", "max", "gem", "spoc", "mac", "rmac", "none")
DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RESIZE_MODES = ("crop", "squash", "pad")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
ENGINES = ("local", "ray")
DECODES = ("auto", "cpu", "gpu")


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose {', '.join(choices)}")
    return value


@dataclass
class ExtractOptions:
    """Every setting of `imgfeat extract`; the CLI flags have the same names."""

    model: str = DEFAULT_MODEL
    weights: str = "pretrained"
    layer: str | list[str] | None = None  # one name, or several
    pool: str = "avg"
    l2: bool = False
    gem_p: float = 3.0
    scales: tuple[float, ...] = (1.0,)
    whiten: str | None = None
    image_size: int | None = None
    crop_pct: float | None = None
    resize_mode: str | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    jpeg_draft: bool = True
    mean_pixel: tuple[float, float, float] | None = None  # 0-255, the model's channel order
    mean_file: str | None = None  # Caffe .binaryproto mean image
    input_scale: float | None = None
    batch_size: int | None = None  # None: auto (see pipeline.batch_size)
    devices: str = "auto"
    precision: str = "auto"
    decode: str = "auto"  # JPEGs: cpu, gpu (nvJPEG), or auto (cpu for now: gpu_decode.py)
    compile: bool = False  # torch.compile the model side
    freeze: bool = True  # CPU: run the model as a frozen TorchScript graph when it checks out
    dtype: str = "float16"
    shard_size: int = DEFAULT_SHARD_SIZE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    threads: int | None = None
    overwrite: bool = False
    incremental: bool = False
    num_nodes: int | None = None
    node_rank: int | None = None
    engine: str = "local"
    ray_address: str = "auto"
    storage_options: dict | None = None  # fsspec's, for sources and output (e.g. endpoint_url)
    image_column: str | None = None  # tables: the column of paths or image bytes
    key_column: str | None = None
    meta_columns: tuple[str, ...] = ()
    progress: str = "auto"  # auto | bar | lines | none
    profile: bool = False

    @property
    def layers(self) -> list[str] | None:
        if self.layer is None:
            return None
        return [self.layer] if isinstance(self.layer, str) else list(self.layer)

    def check(self) -> None:
        check_choice(self.pool, POOLS, "pooling")
        check_choice(self.dtype, DTYPES, "dtype")
        check_choice(self.precision, PRECISIONS, "precision")
        check_choice(self.engine, ENGINES, "engine")
        check_choice(self.decode, DECODES, "decode mode")
        if self.resize_mode is not None:
            check_choice(self.resize_mode, RESIZE_MODES, "resize mode")
        if self.interpolation is not None:
            check_choice(self.interpolation, INTERPOLATIONS, "interpolation")
        for name in ("batch_size", "shard_size", "image_size", "threads", "max_pixels",
                     "num_nodes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.engine == "ray" and (self.num_nodes or 1) > 1:
            raise UsageError("--num-nodes is for running without a cluster engine; "
                             "with --engine ray, Ray spreads the work over the cluster")
        if self.gem_p <= 0:
            raise UsageError(f"--gem-p must be positive, got {self.gem_p}")
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise UsageError(f"--scales must be factors in (0, 4], got {self.scales}")
        if len(self.scales) > 1 and self.pool == "none":
            raise UsageError("--scales combines vectors: choose a --pool other than none")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise UsageError("--storage-options must be a JSON object, e.g. "
                             '\'{"endpoint_url": "http://127.0.0.1:9000"}\'')
        if self.overwrite and self.incremental:
            raise UsageError("--overwrite and --incremental contradict each other")
