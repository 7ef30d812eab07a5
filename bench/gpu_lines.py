"""The lines of bench/gpu_acceptance.py measured inside one process, each run as
`python bench/gpu_lines.py LINE --corpus DIR --model SPEC [--device D]`, printing one JSON
object as its last line:

- model: imgfeat's model side alone, on uint8 batches already on the device, at the batch size
  `--batch-size auto` picks, launched back to back as the pipeline launches them;
- nvjpeg: imgfeat's device decoder alone (nvJPEG, resize and crop, in chunks) on the
  corpus's bytes, read into memory first;
- pixels: the device decoder against the CPU path on the same files: how far apart their
  model-sized pixels are (the CPU path drafts large JPEGs: also against a whole decode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # this tree's imgfeat, whatever is installed


def model_ceiling(spec: str, device: str, seconds: float = 6.0) -> dict:
    import torch

    from imgfeat.compute.build import build_extractor
    from imgfeat.compute.device import tune_backends
    from imgfeat.options import ExtractOptions
    from imgfeat.pipeline.batch_size import auto_batch
    from imgfeat.pipeline.host_memory import keep_freed_memory

    keep_freed_memory()  # as imgfeat's workers run
    options = ExtractOptions(model=spec, weights="random")
    extractor = build_extractor(options, device)
    batch = auto_batch(extractor)
    tune_backends(extractor.device, options.precision)
    pixels = torch.randint(0, 256, (batch, *extractor.preprocess.size, 3), dtype=torch.uint8,
                           device=extractor.device)
    extractor(pixels)  # warm: cuDNN's kernel choice
    done, began = 0, time.perf_counter()
    pending = extractor.launch(pixels)
    while time.perf_counter() - began < seconds:
        following = extractor.launch(pixels)  # queued while the one before runs
        pending.result()
        pending, done = following, done + batch
    pending.result()
    return {"rate": (done + batch) / (time.perf_counter() - began), "batch": batch}


def _preprocess(spec: str):
    import timm
    from throughput import build_model

    from imgfeat.models.timm_backend import _preprocess as timm_preprocess

    return timm_preprocess(timm, build_model(spec, "cpu")[0])


def _device_inputs(corpus: Path, preprocess) -> tuple[list, int]:
    from imgfeat.pipeline.decode_pool import Encoded
    from imgfeat.pipeline.decode_route import device_pixels

    datas = [path.read_bytes() for path in sorted(corpus.iterdir()) if path.is_file()]
    taken = [(data, device_pixels(data, preprocess, None)) for data in datas]
    return [Encoded(data, pixels) for data, pixels in taken if pixels], len(datas)


def nvjpeg_ceiling(corpus: Path, spec: str, device: str) -> dict:
    import torch

    from imgfeat.pipeline.gpu_decode import DeviceDecoder

    preprocess = _preprocess(spec)
    encoded, files = _device_inputs(corpus, preprocess)
    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    decoder = DeviceDecoder(preprocess, torch.device(device), stream)
    decoder(encoded[:64])  # warm: nvJPEG's set-up
    _finish(stream)
    began = time.perf_counter()
    for start in range(0, len(encoded), 1024):
        decoder(encoded[start:start + 1024])
    _finish(stream)
    return {"rate": len(encoded) / (time.perf_counter() - began), "taken": len(encoded),
            "files": files}


def pixel_differences(corpus: Path, spec: str, device: str) -> dict:
    import numpy as np
    import torch

    from imgfeat.pipeline.cpu_decode import pixels_from_bytes
    from imgfeat.pipeline.gpu_decode import DeviceDecoder

    preprocess = _preprocess(spec)
    whole = replace(preprocess, jpeg_draft=False)
    encoded, files = _device_inputs(corpus, preprocess)
    stream = torch.cuda.Stream(device) if device.startswith("cuda") else None
    rows = DeviceDecoder(preprocess, torch.device(device), stream)(encoded)
    found = {"drafted": [], "whole": []}
    for item, row in zip(encoded, rows):
        if row is None:
            continue
        mine = row.cpu().numpy().astype(np.int16)
        for name, cpu_preprocess in (("drafted", preprocess), ("whole", whole)):
            theirs = pixels_from_bytes(item.data, cpu_preprocess, None).astype(np.int16)
            found[name].append(np.abs(mine - theirs))
    report = {"taken": len(encoded), "decoded": sum(row is not None for row in rows),
              "files": files}
    for name, differences in found.items():
        if differences:
            report[f"{name} mean"] = float(np.mean([d.mean() for d in differences]))
            report[f"{name} max"] = int(max(d.max() for d in differences))
    return report


def _finish(stream) -> None:
    if stream is not None:
        stream.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("line", choices=("model", "nvjpeg", "pixels"))
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--model", default="timm:resnet50")
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    if args.line == "model":
        result = model_ceiling(args.model, args.device)
    elif args.line == "nvjpeg":
        result = nvjpeg_ceiling(args.corpus, args.model, args.device)
    else:
        result = pixel_differences(args.corpus, args.model, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
