"""The page shows a row's image wherever extraction read it: a tar member or a table cell is
read back through the pipeline's byte reader, never as the whole tar or table file."""

import pytest
from corpus import photo_paths
from producers import RUN, hf_parquet, write_tars

import imgfeat
from imgfeat.cli import main

pytest.importorskip("fastapi")


@pytest.mark.parametrize("kind", ["tar", "table"])
def test_a_rows_bytes_are_its_images_bytes(tmp_path, kind):
    from imgfeat.serve.items import Items

    paths = photo_paths()[:3]
    if kind == "tar":
        [source] = write_tars(tmp_path, [paths])
    else:
        source = tmp_path / "photos.parquet"
        hf_parquet(source, paths)
    out = tmp_path / "out"
    assert main(["extract", str(source), "-o", str(out), *RUN]) == 0
    store = imgfeat.open_store(out)
    items = Items(store)
    assert len(store) == len(paths)
    for row in range(len(store)):
        assert items.read(row) == paths[row].read_bytes()
        assert items.thumbnail(row)[:2] == b"\xff\xd8"  # a JPEG
