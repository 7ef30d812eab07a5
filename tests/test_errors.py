"""A user's mistake is one clear line on stderr, a non-zero exit, and never a traceback."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST

import imgfeat


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgfeat", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("imgfeat: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def store_of_resnet18(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("errs") / "out"
    imgfeat.extract(str(photos), out, model="timm:resnet18", weights="random", image_size=64,
                    progress="none")
    return out


def test_missing_source(tmp_path):
    result = cli("extract", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"), *FAST)
    assert_one_line_error(result, "source not found", "nowhere")
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_a_refused_run_ends_the_workers_it_started(photos, tmp_path):
    """The local engine's workers start loading the model while the sources and the store are
    checked; a refusal ends them at once, without waiting for the model."""
    import multiprocessing

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a store")
    for sources, out, message in [(tmp_path / "nowhere", tmp_path / "o", "source not found"),
                                  (photos, tmp_path / "foreign", "holds no imgfeat store")]:
        with pytest.raises(imgfeat.UsageError, match=message):
            imgfeat.extract(sources, out, model="timm:resnet18", weights="random")
        assert multiprocessing.active_children() == []


@pytest.mark.parametrize("spec, fragment", [
    ("timm:resnet5000", "unknown model timm:resnet5000"),
    ("torchvision:resnet5000", "unknown model torchvision:resnet5000"),
    ("resnet50", "write it as one of timm:NAME, torchvision:NAME, open_clip:"),
])
def test_unknown_model(photos, tmp_path, spec, fragment):
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), "--model", spec,
                 "--weights", "random")
    assert_one_line_error(result, fragment)


def test_model_help_names_every_kind_the_code_accepts(capsys):
    from imgfeat.cli import main
    from imgfeat.models import BACKENDS
    from imgfeat.models.file_backend import KINDS
    from imgfeat.options import MODEL_KINDS

    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(kind in help_text for kind in MODEL_KINDS)
    assert all(f"{prefix}:" in help_text for prefix in BACKENDS)
    assert all(suffix in help_text for suffix in [*KINDS, ".prototxt", ".caffemodel"])


def test_unknown_layer_suggests_names(photos, tmp_path):
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), *FAST, "--layer", "layer9")
    assert_one_line_error(result, "unknown layer 'layer9'", "imgfeat layers timm:resnet18")


def test_unreadable_weights_file(photos, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), "--model", "timm:resnet18",
                 "--weights", str(bad))
    assert_one_line_error(result, "cannot read weights file", "bad.pth")


def test_missing_weights_file(photos, tmp_path):
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), "--model", "timm:resnet18",
                 "--weights", str(tmp_path / "none.safetensors"))
    assert_one_line_error(result, "weights file not found")


def test_weights_of_another_architecture(photos, tmp_path):
    import timm

    path = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), path)
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), "--model", "timm:resnet18",
                 "--weights", str(path))
    assert_one_line_error(result, "does not fit timm:resnet18")


def test_pretrained_download_failure_says_what_to_do(photos, tmp_path):
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), "--model", "timm:resnet18",
                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "could not get pretrained weights", "--weights random")


def test_output_holding_another_models_features(photos, store_of_resnet18):
    result = cli("extract", str(photos), "-o", str(store_of_resnet18), "--model",
                 "timm:mobilenetv3_small_050", "--weights", "random", "--image-size", "64")
    assert_one_line_error(result, "already holds different features",
                          "timm:resnet18 -> timm:mobilenetv3_small_050", "--overwrite")
    assert imgfeat.open_store(store_of_resnet18).model == "timm:resnet18"  # untouched


def test_overwrite_replaces_only_imgfeat_files(photos, tmp_path):
    out = tmp_path / "out"
    imgfeat.extract(str(photos), out, model="timm:resnet18", weights="random", image_size=64,
                    progress="none")
    (out / "my_notes.md").write_text("keep me")
    result = cli("extract", str(photos), "-o", str(out), "--model", "timm:mobilenetv3_small_050",
                 "--weights", "random", "--image-size", "64", "--overwrite", "--quiet")
    assert result.returncode == 0, result.stderr
    assert imgfeat.open_store(out).model == "timm:mobilenetv3_small_050"
    assert (out / "my_notes.md").read_text() == "keep me"


def test_different_preprocessing_is_refused(photos, store_of_resnet18):
    result = cli("extract", str(photos), "-o", str(store_of_resnet18), *FAST[:-1],
                 "--image-size", "96")
    assert_one_line_error(result, "already holds different features", "preprocess")


def test_foreign_non_empty_output_folder(photos, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("precious")
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), *FAST)
    assert_one_line_error(result, "not empty and holds no imgfeat store")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--devices", "tpu", "unknown device 'tpu'"),
])
def test_bad_option_values(photos, tmp_path, flag, value, fragment):
    result = cli("extract", str(photos), "-o", str(tmp_path / "o"), *FAST, flag, value)
    assert_one_line_error(result, fragment)


def test_info_on_a_folder_that_is_no_store(tmp_path):
    assert_one_line_error(cli("info", str(tmp_path)), "not an imgfeat output folder")
