"""model.py: the head's exact layers, architectures, and every way weights are loaded."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn
from torchvision import models

from braintumor.errors import UserError
from braintumor.models.network import ARCHS, build_model, gradcam_layer


def test_resnet152_head_is_exactly_the_reference_recipe():
    model = build_model("resnet152", num_classes=4, weights="none")
    assert isinstance(model, models.ResNet)
    head = model.fc
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (2048, 512)
    assert head[2].p == 0.5
    assert (head[3].in_features, head[3].out_features) == (512, 4)
    # ResNet-152: 3, 8, 36, 3 bottleneck blocks.
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    assert gradcam_layer(model) is model.layer4


@pytest.mark.slow
@pytest.mark.parametrize("arch, features", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_smaller_archs_get_the_same_head(arch, features):
    model = build_model(arch, num_classes=3, weights="none").eval()
    assert model.fc[0].in_features == features and model.fc[3].out_features == 3
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_bad_arch_and_class_count_are_user_errors():
    with pytest.raises(UserError, match="unknown architecture 'vgg16'; choose one of: resnet18"):
        build_model("vgg16")
    with pytest.raises(UserError, match="at least 2 classes"):
        build_model("resnet18", num_classes=1)
    assert "resnet101" in ARCHS


def test_weights_from_a_torchvision_state_dict_file(tmp_path):
    torch.manual_seed(1)
    reference = models.resnet18(weights=None)  # 1000-class fc, as torchvision ships it
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", num_classes=4, weights=str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc[3].out_features == 4  # head replaced, not loaded


@pytest.mark.slow
def test_weights_file_errors(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        build_model("resnet18", weights=str(tmp_path / "nope.pth"))
    wrong = tmp_path / "resnet34.pth"
    torch.save(models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(UserError, match="does not match ResNet.*check --arch"):
        build_model("resnet18", weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read weights file"):
        build_model("resnet18", weights=str(garbage))


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_imagenet_weights_offline_with_empty_torch_home_give_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "urlopen", _no_network)
    with pytest.raises(UserError) as info:
        build_model("resnet152", weights="imagenet")
    message = str(info.value)
    assert "resnet152-f82ba261.pth" in message  # the file torchvision expects for IMAGENET1K_V2
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_imagenet_weights_come_from_the_torch_home_cache(tmp_path, monkeypatch):
    """torchvision's own mechanism: a file in $TORCH_HOME/hub/checkpoints is used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", _no_network)
    torch.manual_seed(2)
    reference = models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    torch.save(reference.state_dict(), cache / name)
    model = build_model("resnet18", num_classes=2, weights="imagenet")
    assert torch.equal(model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
