"""The `imgfeat` command: extract, info, layers, and after extraction index, search, dedup,
serve. A user's mistake is one line on stderr and a
non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from imgfeat.engine.placement import DEVICE_HELP
from imgfeat.errors import ImgfeatError, UsageError
from imgfeat.options import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL,
    DEFAULT_SHARD_SIZE,
    INTERPOLATIONS,
    MODEL_KINDS,
    POOLS,
    PRECISIONS,
    RESIZE_MODES,
)

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as exc:
        print(f"imgfeat: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImgfeatError as exc:  # a run that could not finish: what is done is kept
        print(f"imgfeat: error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except BrokenPipeError:  # `imgfeat layers ... | head`: the reader has had enough
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at exit)
        return 0
    except OSError as exc:  # disk full, permission denied: the system's word, on one line
        print(f"imgfeat: error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; committed shards are kept in {out}: run the same command again to resume" \
            if out else ""
        print(f"\nimgfeat: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfeat", description="Extract deep features from large image collections.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(commands)
    info = commands.add_parser("info", help="counts, feature shape, model, errors by reason")
    info.add_argument("out", metavar="OUT")
    _add_storage_options(info)
    info.set_defaults(handler=run_info)
    _add_export(commands)
    whiten = commands.add_parser(
        "whiten", help="learn PCA whitening from a store; write it and a whitened store")
    whiten.add_argument("out", metavar="OUT")
    _add_storage_options(whiten)
    whiten.add_argument("--dim", type=int, required=True, help="dimensions to keep")
    whiten.add_argument("-o", "--dest", help="whitened store (default: OUT-whitened-DIM)")
    whiten.add_argument("--l2", action="store_true", help="L2-normalise whitened features")
    whiten.add_argument("--layer", help="the layer to whiten, in a store of several")
    whiten.add_argument("--sample", type=int, metavar="N",
                        help="learn from N rows spread evenly over the store (default: all)")
    whiten.add_argument("--overwrite", action="store_true")
    whiten.set_defaults(handler=run_whiten)
    verify = commands.add_parser("verify", help="check every shard against the manifest and plan")
    verify.add_argument("out", metavar="OUT")
    _add_storage_options(verify)
    verify.set_defaults(handler=run_verify)
    finalize = commands.add_parser(
        "finalize", help="write features.h5 of a store whose shards are all committed")
    finalize.add_argument("out", metavar="OUT")
    finalize.set_defaults(handler=run_finalize)
    layers = commands.add_parser("layers", help="the layer names that --layer accepts")
    layers.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL)
    layers.set_defaults(handler=run_layers)
    _add_search(commands)
    return parser


def _add_search(commands) -> None:
    index = commands.add_parser(
        "index", help="build the nearest-neighbour index of a store (faiss, in OUT/index)")
    index.add_argument("out", metavar="OUT")
    _add_storage_options(index)
    index.add_argument("--layer", help="the layer to index, in a store of several")
    index.add_argument("--kind", default="auto", choices=("auto", "flat", "ivf"),
                       help="flat: exact; ivf: inverted file of 8-bit vectors; auto: flat up "
                       "to 20,000 rows")
    index.add_argument("--quiet", action="store_true")
    index.set_defaults(handler=run_index)
    search = commands.add_parser(
        "search", help="nearest images to query images, folders, URLs, keys, or --text")
    search.add_argument("out", metavar="OUT")
    _add_storage_options(search)
    search.add_argument("queries", nargs="*", metavar="QUERY",
                        help="image file, folder of images, http(s) URL, or key of the store")
    search.add_argument("--text", action="append", help="a text query (CLIP stores); repeat")
    search.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--format", default="table", choices=("table", "csv", "json"))
    search.add_argument("--layer", help="the layer to search, in a store of several")
    search.add_argument("--exact", action="store_true", help="ignore the index")
    search.set_defaults(handler=run_search)
    dedup = commands.add_parser("dedup", help="groups of near-duplicate images")
    dedup.add_argument("out", metavar="OUT")
    _add_storage_options(dedup)
    dedup.add_argument("--threshold", type=float, default=0.95,
                       help="cosine at or above which two images are duplicates (default 0.95)")
    dedup.add_argument("-o", "--groups", metavar="FILE",
                       help="write group, key, similarity to the representative (.parquet, "
                       "or .csv)")
    dedup.add_argument("--keep-list", metavar="FILE",
                       help="write the keys to keep: all outside groups, one per group")
    dedup.add_argument("--layer", help="the layer to compare, in a store of several")
    dedup.add_argument("--quiet", action="store_true")
    dedup.set_defaults(handler=run_dedup)
    serve = commands.add_parser("serve", help="a local web page to browse, search and dedup")
    serve.add_argument("out", metavar="OUT")
    _add_storage_options(serve)
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--layer", help="the layer to search, in a store of several")
    serve.add_argument("--threshold", type=float, default=0.95,
                       help="cosine of the duplicates view (default 0.95)")
    serve.set_defaults(handler=run_serve)


def run_index(args: argparse.Namespace) -> int:
    from imgfeat.search.index import build

    with _open_store(args) as store:
        meta = build(store, args.layer, args.kind,
                     say=(lambda _: None) if args.quiet else _say)
    detail = f", nprobe {meta['nprobe']} (recall@10 {meta['calibrated_recall_at_10']} " \
        f"on rows of the store)" if meta["kind"] == "ivf" else ""
    print(f"{args.out}: {meta['kind']} index of {meta['rows']:,} x {meta['dim']} "
          f"({meta['layer']}) in {meta['build_seconds']} s{detail}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from imgfeat.search.api import Searcher
    from imgfeat.search.output import format_hits

    with _open_store(args) as store:
        searcher = Searcher(store, args.layer, "exact" if args.exact else "auto")
        results = searcher.search(args.queries, args.k, args.text)
        print(format_hits(results, args.format))
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from imgfeat.search.api import Searcher
    from imgfeat.search.dedup import find_groups
    from imgfeat.search.output import summary, write_groups, write_keep_list

    with _open_store(args) as store:
        searcher = Searcher(store, args.layer)
        groups = find_groups(searcher, args.threshold,
                             say=None if args.quiet else _say)
        print(summary(groups, len(store), args.threshold))
        if args.groups:
            write_groups(groups, store, args.groups)
            print(f"groups -> {args.groups}")
        if args.keep_list:
            kept = write_keep_list(groups, store, args.keep_list)
            print(f"{kept:,} keys to keep -> {args.keep_list}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from imgfeat.serve.app import serve

    serve(args.out, host=args.host, port=args.port, layer=args.layer,
          threshold=args.threshold, storage_options=args.storage_options)
    return 0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _add_extract(commands) -> None:
    p = commands.add_parser("extract", help="extract features of images into a store",
                            description="Extract features of every image in SOURCE... into OUT.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="folder of images (recursive), list file of paths, webdataset tar "
                   "(.tar, .tar.gz, .tgz; brace patterns 'data/{00000..00099}.tar'), table "
                   "(.parquet, .csv, .jsonl), or image file; local or an fsspec URL (s3://...)")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder")
    _add_storage_options(p)
    t = p.add_argument_group("tables")
    t.add_argument("--image-column", help="column of image paths or bytes (default: the first "
                   "of image, image_path, path, file, filepath, filename)")
    t.add_argument("--key-column", help="column of keys (default: the path, or "
                   "<table>/<row> for bytes)")
    t.add_argument("--meta-columns", type=_names, default=(), metavar="A,B",
                   help="columns carried as metadata into the store and the npy export")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{', '.join(MODEL_KINDS)} (default {DEFAULT_MODEL})")
    m.add_argument("--weights", default="pretrained",
                   help="pretrained (download), random (no network), or PATH to a state dict")
    m.add_argument("--layer", action="append",
                   help="module name to tap (default: pooled pre-logits embedding); repeat "
                   "for several layers in one pass, stored as /features/<layer> ('%%' and '/' "
                   "written %%25 and %%2F)")
    m.add_argument("--pool", default="avg", choices=POOLS, help="pooling of spatial maps")
    m.add_argument("--gem-p", type=float, default=3.0, help="power of --pool gem (default 3)")
    m.add_argument("--scales", type=_scales, default=(1.0,), metavar="S,S,...",
                   help="extract at several input scales (e.g. 1,0.707,0.5), combined by "
                   "generalized mean, then L2")
    m.add_argument("--whiten", metavar="FILE", help="apply a whitening from 'imgfeat whiten'")
    m.add_argument("--l2", action="store_true", help="L2-normalise each feature")
    pre = p.add_argument_group("preprocessing (default: the model's own)")
    pre.add_argument("--image-size", type=int, metavar="N", help="input size N x N")
    pre.add_argument("--crop-pct", type=float, help="fraction of the resized image kept by crop")
    pre.add_argument("--resize-mode", choices=RESIZE_MODES,
                     help="crop: keep aspect, centre crop; squash: stretch; pad: fit and pad")
    pre.add_argument("--interpolation", choices=list(INTERPOLATIONS))
    pre.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"))
    pre.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"))
    pre.add_argument("--mean-pixel", type=float, nargs=3, metavar=("C1", "C2", "C3"),
                     help="mean pixel in 0-255, in the model's channel order (BGR for Caffe)")
    pre.add_argument("--mean-file", help="Caffe .binaryproto mean image (its channel means)")
    pre.add_argument("--input-scale", type=float,
                     help="multiply (pixel - mean) by this, as Caffe's input scale")
    pre.add_argument("--no-draft", dest="jpeg_draft", action="store_false",
                     help="decode JPEGs at full size even when much larger than needed")
    pre.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help=f"refuse larger images as decompression bombs "
                     f"(default {DEFAULT_MAX_PIXELS})")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                   help="images per forward pass (default auto: 16 on CPU; on GPU the largest "
                   "that fits in free memory, at most 1024)")
    r.add_argument("--devices", default="auto", help=f"{DEVICE_HELP}: one worker per device "
                   "(auto: every GPU, else one CPU worker)")
    r.add_argument("--precision", default="auto", choices=PRECISIONS)
    r.add_argument("--decode", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where JPEGs are decoded: gpu (nvJPEG, others on the CPU), cpu, or "
                   "auto: cpu until a GPU run proves GPU decoding (bench/gpu_acceptance.py)")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile the model (first batches wait for the compiler)")
    r.add_argument("--no-freeze", dest="freeze", action="store_false",
                   help="on CPU, run the model eagerly rather than as a frozen TorchScript "
                   "graph (used only where it gives the eager result)")
    r.add_argument("--threads", type=int,
                   help="decoders per worker (default: on GPU, the worker's cores, 4 with "
                   "--decode gpu; on CPU, the cores the model leaves free, or all at low "
                   "priority); from 4 up they are processes, not threads")
    r.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="stored feature type")
    r.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    r.add_argument("--overwrite", action="store_true",
                   help="replace an output folder that holds different features")
    r.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: one process per device here; ray: actors on a Ray cluster")
    r.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join (default auto: a running one, else start one)")
    r.add_argument("--incremental", action="store_true",
                   help="extract only images whose keys are not in the store yet")
    r.add_argument("--num-nodes", type=int,
                   help="processes sharing OUT (default: srun's or torchrun's task count, or 1)")
    r.add_argument("--node-rank", type=int,
                   help="this process's rank, 0.. (default: srun's or torchrun's)")
    r.add_argument("--profile", action="store_true",
                   help="print seconds per stage (read, decode, preprocess, forward, write)")
    r.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.set_defaults(handler=run_extract)


def _add_storage_options(parser) -> None:
    parser.add_argument("--storage-options", type=_json_object, metavar="JSON",
                        help="fsspec storage options for URLs (s3://...) of sources and "
                        "output, e.g. '{\"client_kwargs\": {\"endpoint_url\": "
                        "\"http://127.0.0.1:9000\"}}'")


def _open_store(args: argparse.Namespace):
    from imgfeat import open_store

    return open_store(args.out, getattr(args, "storage_options", None))


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export", help="write a store as npy (+parquet metadata), parquet, or one h5 file",
        description="npy: DEST/img_emb/img_emb_{i}.npy + DEST/metadata/metadata_{i}.parquet "
        "(clip-retrieval's layout, read by embedding-reader and autofaiss); parquet: DEST/ "
        "with key + embedding columns; h5: one self-contained HDF5 file.")
    p.add_argument("out", metavar="OUT", help="the store to export")
    _add_storage_options(p)
    p.add_argument("--to", required=True, choices=("npy", "parquet", "h5"))
    p.add_argument("dest", metavar="DEST", help="folder (npy, parquet) or file (h5)")
    p.add_argument("--rows-per-file", type=int, default=1_000_000)
    p.add_argument("--dtype", choices=("float16", "float32"),
                   help="default: float32 for npy and parquet, the store's own for h5")
    p.add_argument("--compression", default="none", choices=("none", "gzip", "lzf"),
                   help="h5 only")
    p.add_argument("--layer", help="the layer to export, in a store of several")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from imgfeat.store.export import export

    with _open_store(args) as store:
        export(store, args.to, args.dest, rows_per_file=args.rows_per_file, dtype=args.dtype,
               compression=args.compression, overwrite=args.overwrite,
               progress="none" if args.quiet else "auto", layer=args.layer)
    return 0


def run_whiten(args: argparse.Namespace) -> int:
    from imgfeat.compute.whitening import learn_batches
    from imgfeat.store.derive import derive_store

    dest = args.dest or f"{str(args.out).rstrip('/')}-whitened-{args.dim}"
    with _open_store(args) as store:
        if store.manifest.get("whiten"):
            raise UsageError(f"{args.out} is whitened already")
        layer = store._layer(args.layer)
        whitening = learn_batches(_learning_batches(store, layer, args.sample), args.dim,
                                  store.manifest["l2"])
        whitened = derive_store(
            store, layer, dest, lambda features: whitening.apply(features, l2=args.l2),
            {"whiten": whitening.describe(), "l2": args.l2, "layers": {layer: [args.dim]}},
            overwrite=args.overwrite, files={"whitening.npz": whitening.to_bytes()},
            storage_options=getattr(args, "storage_options", None))
    where = whitened.location
    saved = f"{where.rstrip('/')}/whitening.npz" if whitened.layout.remote else \
        str(whitened.layout.root / "whitening.npz")
    print(f"whitening of {len(whitened):,} features to {args.dim} dimensions -> {saved}; "
          f"whitened store -> {where}")
    print(f"apply it while extracting: imgfeat extract ... --whiten {saved}"
          f"{' --l2' if args.l2 else ''}")
    return 0


def _learning_batches(store, layer: str, sample: int | None):
    """The rows whitening learns from, a batch at a time: all, or `sample` evenly spread."""
    import numpy as np

    if sample is not None and sample < 2:
        raise UsageError(f"--sample must be at least 2, got {sample}")
    if sample is None or sample >= len(store):
        yield from (features for _, features in store.iter_batches(65_536, layer))
        return
    rows = np.unique(np.linspace(0, len(store) - 1, sample).round().astype(np.int64))
    features = store.features(layer)
    for start in range(0, len(rows), 65_536):
        yield features[rows[start:start + 65_536]]


def run_verify(args: argparse.Namespace) -> int:
    from imgfeat.store.verify import verify

    with _open_store(args) as store:
        problems = verify(store)
        if problems:
            for problem in problems:
                print(f"problem: {problem}")
            print(f"{args.out}: {len(problems)} problem(s)")
            return 1
        print(f"{args.out}: ok: {len(store):,} rows, {store.error_count:,} errors in "
              f"{len(store.shards)} shards, plan fully covered")
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from imgfeat.run import extract

    options = {k: v for k, v in vars(args).items()
               if k not in {"sources", "out", "quiet", "handler", "command"}}
    extract(args.sources, args.out, progress="none" if args.quiet else "auto", **options)
    return 0


def run_finalize(args: argparse.Namespace) -> int:
    from imgfeat.store.reader import Store
    from imgfeat.store.virtual import finalize

    with Store(args.out) as store:
        finalize(store)
        print(f"{args.out}: {store.layout.features.name} written over {len(store.shards)} shards")
    return 0


def run_info(args: argparse.Namespace) -> int:

    with _open_store(args) as store:
        print(describe(store))
    return 0


def describe(store) -> str:
    from imgfeat.store.reader import ranges

    m = store.manifest
    planned = store.planned_shards
    lines = [
        f"store      {store.location}",
        f"model      {store.model} (weights: {m['weights'].get('path') or m['weights']['kind']})",
        f"layers     {', '.join(store.layers)}  pool={m['pool']}"
        + (f" (p={m['gem_p']})" if m.get("gem_p") else "")
        + (f"  scales={','.join(map(str, m['scales']))}" if len(m.get("scales", [1])) > 1
           else "")
        + (f"  whitened to {m['whiten']['dim']} dims" if m.get("whiten") else "")
        + f"  l2={m['l2']}",
        *[f"features   {len(store):,} x {shape} {store.dtype}"
          + (f"  ({layer})" if len(store.layers) > 1 else "")
          for layer, shape in store.feature_shapes.items()],
        _precision(m),
        f"errors     {store.error_count:,}",
        *([f"overflow   {store.overflow_rows:,} rows hold inf where features exceeded float16 "
           "(65504): extract them again with --dtype float32"] if store.overflow_rows else []),
        f"shards     {len(store.shards)} committed of "
        f"{planned if planned is not None else '? (plan not finished)'}",
    ]
    if skipped := m["plan"].get("skipped"):
        lines.append(f"skipped    {skipped:,} files of other types")
    for problem in store.plan_problems:
        lines.append(f"plan       {problem}: run the same extract command again to repair it")
    if store.complete and store.layout.remote is None and not store.layout.features.exists():
        lines.append(f"missing    {store.layout.features.name}: run 'imgfeat finalize "
                     f"{store.layout.root}' to write it")
    if store.missing_shards:
        lines.append(f"missing    shards {ranges(store.missing_shards)}: "
                     "run the same extract command again to finish")
    if store.error_count:
        lines.append("errors by reason:")
        groups: Counter = Counter()
        example = {}
        for key, reason in store.iter_errors():  # streamed: a store may hold millions
            groups[reason.split(":")[0]] += 1
            example.setdefault(reason.split(":")[0], key)
        for reason, count in groups.most_common():
            lines.append(f"  {count:>8,}  {reason}  (e.g. {example[reason]})")
    return "\n".join(lines)


def _precision(manifest: dict) -> str:
    """The precision a store was computed in and, where bf16 was checked, how it agreed."""
    line = f"precision  {manifest.get('precision', '?')}"
    check = manifest.get("precision_check")
    if not check:
        return line
    measured = f"cosine {check['agreement']:.5f} against fp32"
    if check["used"] != check["tried"]:
        return f"{line} (bf16 tried: {measured}, under {check['threshold']})"
    forced = "forced; " if check["agreement"] < check["threshold"] else ""
    return f"{line} ({forced}{measured} on {check['images']} check images at start)"


def _batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"write a number or auto, not {text!r}") from None


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"write scales as numbers separated by commas, "
                                         f"e.g. 1,0.707,0.5 (got {text!r})") from None


def run_layers(args: argparse.Namespace) -> int:
    import torch

    from imgfeat.models import load_model
    from imgfeat.models.layers import list_layers

    model = load_model(args.model, "random")  # names and shapes need no download
    size = model.preprocess.size
    infos = list_layers(model, torch.zeros((1, 3, *size)))
    width = max(len(i.name) for i in infos)
    print(f"# {model.spec}, input 3x{size[0]}x{size[1]}: name, type, output shape per image")
    for info in infos:
        shape = "x".join(map(str, info.shape)) if info.shape else "-"
        print(f"{info.name:<{width}}  {info.kind:<22} {shape}")
    return 0
