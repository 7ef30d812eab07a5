"""float16 storage never turns a feature into inf silently (issue 13): the first shard of a
store stops the run with one line; later overflows are counted, summarised and shown by info."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from runs import make_many
from tiny_store import make_tiny_store

from imgfeat.cli import main
from imgfeat.store.reader import Store
from imgfeat.store.writer import Float16Overflow, ShardWriter

HUGE = np.array([[1.0, 70000.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
with np.errstate(over="ignore"):
    HUGE16 = HUGE.astype(np.float16)  # as compute/extractor.py casts it: inf


def write(layout, index: int, features: np.ndarray) -> ShardWriter:
    writer = ShardWriter(layout, index, {"pooled": (4,)}, "float16", 2)
    try:
        writer.add_rows(["a.jpg", "b.jpg"], {"pooled": features})
        writer.commit()
    finally:
        writer.discard()
    return writer


def test_an_overflow_in_the_first_shard_stops_and_later_ones_are_counted(tmp_path, capsys):
    layout = make_tiny_store(tmp_path / "store", 2)
    for index in layout.committed():
        layout.shard_file(index).unlink()
    for features in (HUGE, HUGE16):  # before or after the cast
        with pytest.raises(Float16Overflow, match=r"exceed float16's range .* --dtype float32"):
            write(layout, 0, features)
    assert not layout.committed()
    write(layout, 0, HUGE[1:].repeat(2, axis=0))
    assert write(layout, 1, HUGE16).overflow_rows == 1
    # the tiny store's manifest says float32; info reads the shards' records
    assert Store(layout.root).overflow_rows == 1
    main(["info", str(layout.root)])
    assert "overflow   1 rows hold inf" in capsys.readouterr().out


def test_a_run_whose_first_features_overflow_float16_stops_before_any_shard(tmp_path, capsys):
    images = make_many(tmp_path / "images", 3)
    out = tmp_path / "out"
    args = ["extract", str(images), "-o", str(out), *FAST, "--devices", "cpu:1",
            "--input-scale", "1e6"]  # features far beyond 65504
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype float32" in err
    assert not list(Path(out, "shards").glob("*.h5"))
    assert main([*args, "--dtype", "float32", "--overwrite"]) == 0
    assert np.isfinite(np.asarray(Store(out).features())).all()
    log = (out / "imgfeat.log").read_text().splitlines()  # every run appends to it
    assert [line.split(" ")[1] for line in log] == ["start:", "error:", "start:", "done:"]
    assert "--dtype float32" in log[1]


def test_warnings_go_above_the_progress_and_into_the_log(tmp_path):
    import io

    from imgfeat.report.progress import Reporter

    stream = io.StringIO()
    reporter = Reporter("lines", stream=stream, log=tmp_path / "imgfeat.log")
    reporter.warn("cuda:1: UserWarning: something odd")
    reporter.summary("done: 3 images")
    assert stream.getvalue().splitlines() == ["imgfeat: warning: cuda:1: UserWarning: "
                                              "something odd", "done: 3 images"]
    log = (tmp_path / "imgfeat.log").read_text()
    assert "warning: cuda:1: UserWarning: something odd" in log and "done: 3 images" in log
