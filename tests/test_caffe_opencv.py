"""imgfeat's Caffe layers against an independent implementation: OpenCV's dnn module reads the
same prototxt and caffemodel (random weights written here), is fed the same preprocessed
photos, and every blob of the net must agree (cosine >= 0.9999 per image)."""

import caffe_nets as nets
import cv2
import numpy as np
import pytest
import torch
from corpus import photo_paths

import imgfeat
from imgfeat.models import load_model
from imgfeat.models.caffe import VGG_MEAN_BGR, caffe_preprocess
from imgfeat.pipeline.cpu_decode import decode

MIN_COSINE = 0.9999


def geometry(size: int, count: int = 3) -> np.ndarray:
    """imgfeat's Caffe geometry (resize, centre crop) of real photos: uint8 RGB, N x H x W x 3."""
    preprocess = caffe_preprocess((size, size))
    return np.stack([preprocess.geometry(decode(p.read_bytes(), min_side=preprocess.draft_side))
                     for p in photo_paths()[:count]])


def caffe_input(size: int) -> np.ndarray:
    """The preprocessed batch both sides get: BGR, 0-255, minus the mean pixel, N x 3 x H x W."""
    bgr = geometry(size)[..., ::-1].astype(np.float32) - np.float32(VGG_MEAN_BGR)
    return np.ascontiguousarray(bgr.transpose(0, 3, 1, 2))


def opencv_blobs(prototxt, caffemodel, x: np.ndarray, layers: list[str]) -> list[np.ndarray]:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.enableFusion(False)  # each layer's own output, not a fused conv + BN + ReLU
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(x)
    return net.forward(layers)


def imgfeat_blobs(prototxt, caffemodel, x: np.ndarray, blobs: list[str]) -> dict:
    model = load_model(str(prototxt), str(caffemodel))
    with torch.inference_mode():
        found = model.make_tap(blobs, torch.device("cpu"))(torch.from_numpy(x))
    return {blob: value.numpy() for blob, value in found.items()}


def assert_agree(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs OpenCV {theirs.shape}"
    a, b = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    assert cosine.min() >= MIN_COSINE, f"{what}: cosine {cosine.min():.6f} with OpenCV"
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-6, f"{what}: values differ"


def vgg(folder, v1: bool) -> tuple:
    prototxt, caffemodel = folder / "vgg.prototxt", folder / "vgg.caffemodel"
    prototxt.write_text(nets.vgg_prototxt(v1))
    nets.write_caffemodel(caffemodel, nets.vgg_weights(), v1, legacy_dims=v1)
    blobs = ["conv1_1", "norm1", "pool1", "conv2", "pool5", "fc6", "fc7", "fc8", "prob"]
    last = {"conv1_1": "relu1_1", "conv2": "relu2", "fc6": "drop6", "fc7": "drop7"}
    return prototxt, caffemodel, nets.SIZE, blobs, [last.get(b, b) for b in blobs]


def written(net: nets.NetWriter, folder, v1: bool = False) -> tuple:
    prototxt, caffemodel = net.save(folder, "net", v1)
    blobs = net.blobs()
    return prototxt, caffemodel, net.size, blobs, [net.last_writer(b) for b in blobs]


NETS = {
    "vgg": lambda folder: vgg(folder, v1=False),
    "vgg-v1": lambda folder: vgg(folder, v1=True),
    "inception": lambda folder: written(nets.inception(), folder),
    "inception-v1": lambda folder: written(nets.inception(), folder, v1=True),
    "resnet": lambda folder: written(nets.resnet(), folder),
    "depthwise": lambda folder: written(nets.mobilenet(), folder),
}


@pytest.mark.parametrize("name", list(NETS))
def test_every_blob_agrees_with_opencv(name, tmp_path):
    prototxt, caffemodel, size, blobs, writers = NETS[name](tmp_path)
    x = caffe_input(size)
    theirs = opencv_blobs(prototxt, caffemodel, x, writers)
    ours = imgfeat_blobs(prototxt, caffemodel, x, blobs)
    assert len(blobs) >= 8
    for blob, value in zip(blobs, theirs):
        assert_agree(ours[blob], value, f"{name} blob {blob!r}")


def test_extraction_agrees_with_opencv_on_its_own_caffe_recipe(tmp_path):
    """Extracting from image files (imgfeat's decode, BGR and mean subtraction) gives what
    OpenCV gives for the same crops through blobFromImage, Caffe's usual recipe there."""
    net = nets.inception()
    prototxt, caffemodel = net.save(tmp_path, "net")
    layers = ["inception_3a/output", "pool5/7x7_s1", "prob"]
    store = imgfeat.extract([str(p) for p in photo_paths()[:3]], tmp_path / "out",
                            model=str(prototxt), weights=str(caffemodel), layer=layers,
                            pool="none", dtype="float32", progress="none", devices="cpu:1",
                            precision="fp32")  # a reference check: fp32, as OpenCV computes
    blob = cv2.dnn.blobFromImages(list(geometry(net.size)), 1.0, (net.size, net.size),
                                  mean=VGG_MEAN_BGR, swapRB=True)  # mean: BGR, as the blob
    theirs = opencv_blobs(prototxt, caffemodel, blob, [net.last_writer(b) for b in layers])
    for layer, value in zip(layers, theirs):
        assert_agree(np.asarray(store.features(layer)), value, f"extracted {layer!r}")
