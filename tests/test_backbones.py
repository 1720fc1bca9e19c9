"""Backbone registry: the packaged MobileNetV2 weights land tensor by tensor, resnets load only
from the torch hub cache and say where the file goes otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.model import backbones, embed, network
from tests.conftest import need_shared


def test_mobilenet_v2_every_tensor_lands_with_its_shape():
    src = torch.load(backbones.mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    assert len(src) == 312
    net = backbones.get_backbone("mobilenet_v2").create(pretrained=True)
    dst = net.state_dict()
    assert len(dst) == 312
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        assert sv.shape == dv.shape, (sk, dk)
        assert torch.equal(sv, dv), (sk, dk)
    # the first conv really is an RGB stem and the last block the 1280-d bottleneck
    assert dst["0.0.weight"].shape == (32, 3, 3, 3)
    assert dst["18.1.running_var"].shape == (1280,)


def test_map_in_order_rejects_a_misfit():
    net = backbones.get_backbone("mobilenet_v2").build()
    sd = net.state_dict()
    src = dict(zip([f"k{i}" for i in range(len(sd))], sd.values()))
    assert list(backbones.map_in_order(sd, src)) == list(sd)
    keys = list(src)
    src[keys[0]], src[keys[6]] = src[keys[6]], src[keys[0]]  # conv and bn swapped
    with pytest.raises(ValueError, match="tensor 0"):
        backbones.map_in_order(sd, src)
    with pytest.raises(ValueError, match="312"):
        backbones.map_in_order(sd, dict(list(src.items())[:-1]))


def test_pretrained_features_of_real_crops_differ_from_a_random_network():
    root = need_shared("reid", "campus62", "val", "gallery")
    paths = sorted(root.glob("*/*.png"))[::23][:8]  # 8 crops of different people
    x = torch.from_numpy(np.stack([embed.load_image(p, (128, 64)) for p in paths]))

    def mean_pair_cos(pretrained: bool) -> float:
        torch.manual_seed(0)
        m = network.build_model(pretrained=pretrained)
        with torch.inference_mode():
            f = m.backbone(m.prepare(x)).mean(dim=(2, 3)).numpy()
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        return float((f @ f.T)[np.triu_indices(len(f), 1)].mean())

    pre, rand = mean_pair_cos(True), mean_pair_cos(False)
    # a random network maps every person to nearly the same direction; ImageNet features spread
    assert rand > 0.9
    assert pre < rand - 0.15, (pre, rand)


def test_resnet_without_cached_weights_names_the_file(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        assert backbones.available()["resnet18"] is False
        with pytest.raises(backbones.WeightsUnavailable) as ei:
            backbones.get_backbone("resnet18").create(pretrained=True)
        assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in str(ei.value)

        # a file placed there is loaded (here: a stand-in with torchvision's keys and shapes)
        import torchvision

        ref = torchvision.models.resnet18(weights=None).state_dict()
        p = backbones.hub_weights_path("resnet18")
        p.parent.mkdir(parents=True)
        torch.save(ref, p)
        net = backbones.get_backbone("resnet18").create(pretrained=True)
        got = net.state_dict()
        assert len(got) == len([k for k in ref if not k.startswith("fc.")])
        assert torch.equal(got["0.0.weight"], ref["conv1.weight"])
        assert torch.equal(got["4.1.bn2.running_mean"], ref["layer4.1.bn2.running_mean"])
    finally:
        torch.hub.set_dir(old)


def test_unknown_backbone():
    with pytest.raises(ValueError, match="mobilenet_v2"):
        backbones.get_backbone("vgg99")
