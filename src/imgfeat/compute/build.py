"""The extractor a run's options describe: model, layers, preprocessing overrides, head,
whitening, device and precision, checked before any work."""

from __future__ import annotations

from pathlib import Path

from imgfeat.compute.device import resolve_device
from imgfeat.compute.precision import choose_precision


def build_extractor(opts, device: str, recorded: dict | None = None):
    """The model on `device`, checked: unknown models, layers or weights raise UsageError.
    `recorded`: the manifest of the store this run continues, whose precision it keeps."""
    from imgfeat.compute.extractor import Extractor
    from imgfeat.models import load_model
    from imgfeat.models.layers import resolve_layers

    device_ = resolve_device(device)
    choice = choose_precision(opts.precision, device_, recorded,
                              runs_in_torch=Path(opts.model).suffix.lower() != ".onnx")
    model = load_model(opts.model, opts.weights)
    layers = resolve_layers(model, opts.layers)
    size = (opts.image_size, opts.image_size) if opts.image_size else None
    mean, std = _normalisation(opts)
    preprocess = model.preprocess.with_overrides(
        size=size, crop_pct=opts.crop_pct, mode=opts.resize_mode,
        interpolation=opts.interpolation, mean=mean, std=std, jpeg_draft=opts.jpeg_draft)
    whitening = None
    if opts.whiten:
        from imgfeat.compute.whitening import load

        whitening = load(opts.whiten, opts.storage_options)
    extractor = Extractor(model, layers, preprocess, device=device_,
                          precision=choice.precision, pool=opts.pool, l2=opts.l2,
                          dtype=opts.dtype, gem_p=opts.gem_p, scales=tuple(opts.scales),
                          whitening=whitening, freeze=opts.freeze, compile=opts.compile)
    extractor.precision_check = choice.recorded
    if choice.guard:
        from imgfeat.compute.fidelity import guard

        guard(extractor, choice.may_fall_back, opts.precision)
    return extractor


def _normalisation(opts) -> tuple[tuple | None, tuple | None]:
    """--mean/--std (0-1 units), or Caffe-style --mean-pixel/--mean-file (0-255) and
    --input-scale; None leaves the model's own."""
    mean = tuple(opts.mean) if opts.mean else None
    std = tuple(opts.std) if opts.std else None
    pixel = opts.mean_pixel
    if opts.mean_file:
        from imgfeat.models.caffe import mean_from_file

        pixel = mean_from_file(opts.mean_file)
    if pixel:
        mean = tuple(value / 255.0 for value in pixel)
    if opts.input_scale:
        std = (1.0 / (255.0 * opts.input_scale),) * 3
    return mean, std
