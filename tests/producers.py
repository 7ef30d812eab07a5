"""Collections as real producers write them: webdataset's TarWriter, Hugging Face datasets;
and the run settings the collection tests share."""

from conftest import FAST

RUN = [*FAST, "--dtype", "float32", "--shard-size", "4"]


def write_tars(folder, groups, gz=False):
    """Tars by webdataset's own writer: jpg/png, txt caption, json per sample."""
    import webdataset as wds

    names = []
    for number, paths in enumerate(groups):
        name = folder / f"shard-{number:02d}.{'tgz' if gz else 'tar'}"
        with wds.TarWriter(str(name), compress=gz) as writer:
            for path in paths:
                writer.write({"__key__": path.stem, path.suffix[1:]: path.read_bytes(),
                              "txt": f"a photo of {path.stem}", "json": {"name": path.name}})
        names.append(name)
    return names


def hf_parquet(path, paths, embed=True, null_at=None):
    """A table by Hugging Face datasets' Image feature: bytes embedded, or paths only."""
    import datasets

    images = [{"bytes": p.read_bytes() if embed else None, "path": p.name if embed else str(p)}
              for p in paths]
    if null_at is not None:
        images[null_at] = None
    table = datasets.Dataset.from_dict(
        {"image": images, "name": [p.name for p in paths],
         "caption": [p.stem for p in paths]},
        features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string"),
                                    "caption": datasets.Value("string")}))
    table.to_parquet(str(path))
    return path
