import numpy as np
import pytest
import timm
import torch

import imgfeat
from imgfeat.errors import UsageError
from imgfeat.models import load_model
from imgfeat.models.weights import read_state_dict


def test_training_checkpoint_wrapper_and_prefix(tmp_path):
    model = timm.create_model("resnet18", num_classes=7)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                           model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    state = read_state_dict(str(tmp_path / "ckpt.pt"))
    assert set(state) == set(model.state_dict())


def test_fine_tuned_classifier_size_is_taken_from_the_checkpoint(tmp_path):
    model = timm.create_model("resnet18", num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "ft.pth")
    loaded = load_model("timm:resnet18", str(tmp_path / "ft.pth"))
    assert loaded.module.get_classifier().out_features == 7
    assert loaded.weights["kind"] == "file" and len(loaded.weights["sha256"]) == 64


def test_backbone_checkpoint_without_classifier(tmp_path):
    model = timm.create_model("resnet18", num_classes=0).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    loaded = load_model("timm:resnet18", str(tmp_path / "backbone.pth"))
    assert loaded.classifier == "fc"


def test_pickled_objects_are_not_loaded(tmp_path):
    torch.save({"model": timm.create_model("resnet18")}, tmp_path / "whole_model.pt")
    with pytest.raises(UsageError, match="cannot read weights file"):
        read_state_dict(str(tmp_path / "whole_model.pt"))


def test_random_weights_are_reproducible():
    assert (load_model("timm:resnet18", "random").weights["digest"]
            == load_model("timm:resnet18", "random").weights["digest"])


def test_weights_file_gives_the_same_features_as_the_model_saved(tmp_path, photos):
    random_store = imgfeat.extract(str(photos), tmp_path / "a", model="timm:resnet18",
                                   weights="random", image_size=64, progress="none")
    torch.save(load_model("timm:resnet18", "random").module.state_dict(), tmp_path / "w.pth")
    file_store = imgfeat.extract(str(photos), tmp_path / "b", model="timm:resnet18",
                                 weights=str(tmp_path / "w.pth"), image_size=64,
                                 progress="none")
    np.testing.assert_array_equal(np.asarray(random_store.features()),
                                  np.asarray(file_store.features()))
