"""The embedding network: its architecture config and the ``nn.Module``.

The model (:class:`EmbeddingModel`) takes what OpenCV decodes, ``[N, H, W, 3]`` BGR uint8 (or
float 0..255), so the whole input pipeline (BGR->RGB, [0, 1], optional brightness-invariant
luma normalisation, ImageNet mean/std) is part of the network and PyTorch, ONNX and training
apply it identically:

    input -> [brightness_invariant: normalize_luma] -> mean/std -> backbone features
          -> global average pooling -> [neck: BatchNorm1d] -> Linear(feature_dim, emb_dim)
          -> L2 normalisation
          [flip_average, eval mode only: the same for the mirrored image, summed, normalised]
          [person_head: an MLP on the pooled features -> person-ness 0..1 (core.math.personness)]

torch is imported on first use (the class is defined then), so importing this module is cheap.
Versions on disk, ONNX and extraction: :mod:`core.model.embed`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from core.math import personness
from core.model import backbones

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

KINDS = ("crop", "image")
LUMA = (0.299, 0.587, 0.114)  # RGB weights (ITU-R BT.601)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines an embedding model's architecture (stored in checkpoints).

    ``crop_size`` / ``image_size`` are (H, W) per sample kind; ``frozen_blocks`` counts backbone
    blocks from the input whose parameters do not train; ``seed`` makes the head init
    reproducible."""

    backbone: str = backbones.DEFAULT_BACKBONE
    emb_dim: int = 256
    brightness_invariant: bool = False
    crop_size: tuple[int, int] = backbones.DEFAULT_INPUT_SIZES["crop"]
    image_size: tuple[int, int] = backbones.DEFAULT_INPUT_SIZES["image"]
    frozen_blocks: int = 0
    seed: int = 0
    last_stride: int = 2  # 1: the backbone's last downsampling is removed (2x finer feature map)
    flip_average: bool = False  # eval mode: mean of the image's and its mirror's embeddings
    neck: bool = False  # batch norm on the pooled features before the projection head
    person_head: bool = False  # a person-ness head (MLP) on the pooled features (core.math.personness)

    def input_size(self, kind: str | None) -> tuple[int, int]:
        """(H, W) for a sample kind ("crop" or "image"; None counts as crop)."""
        if kind in (None, "crop"):
            return tuple(self.crop_size)
        if kind == "image":
            return tuple(self.image_size)
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_size"], d["image_size"] = list(self.crop_size), list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            log.warning("ignoring unknown model config keys %s", sorted(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("crop_size", "image_size"):
            if k in kw:
                kw[k] = tuple(int(v) for v in kw[k])
        return cls(**kw)


# --- the model ---------------------------------------------------------------------------------

def normalize_luma(x: "torch.Tensor", target_mean: float = 0.45, target_std: float = 0.225,
                   eps: float = 1e-2) -> "torch.Tensor":
    """Brightness-invariant input: per image, shift and scale all channels so the luma has a
    fixed mean and standard deviation, then clip to [0, 1].

    ``x``: RGB ``[N, 3, H, W]`` float in [0, 1] -> same shape. Removes global gain and offset
    (a dark night frame and a bright day frame of the same scene come out alike); ``eps`` keeps
    flat images from blowing up noise. Plain torch ops, so ONNX export applies it identically."""
    import torch

    y = LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]  # [N, 1, H, W]
    m = y.mean(dim=(2, 3), keepdim=True)
    s = torch.sqrt(((y - m) ** 2).mean(dim=(2, 3), keepdim=True) + eps * eps)
    return ((x - m) * (target_std / s) + target_mean).clamp(0.0, 1.0)


def torch_modules():
    import torch
    from torch import nn

    return torch, nn


def build_model(config: ModelConfig = ModelConfig(), pretrained: bool = True) -> "nn.Module":
    """An :class:`EmbeddingModel` in eval mode; ``pretrained`` loads the backbone's offline
    ImageNet weights (raises :class:`core.model.backbones.WeightsUnavailable` when absent)."""
    return _model_class()(config, pretrained=pretrained).eval()


_MODEL_CLS = None


def _model_class():
    """Define the nn.Module subclass on first use (keeps torch out of this module's import)."""
    global _MODEL_CLS
    if _MODEL_CLS is not None:
        return _MODEL_CLS
    torch, nn = torch_modules()

    class EmbeddingModel(nn.Module):
        """``[N, H, W, 3]`` BGR uint8/float 0..255 -> ``[N, emb_dim]`` unit vectors."""

        def __init__(self, config: ModelConfig, pretrained: bool = True):
            super().__init__()
            bb = backbones.get_backbone(config.backbone)
            self.config = config
            self.backbone = bb.create(pretrained=pretrained)
            if config.last_stride == 1:
                bb.remove_last_stride(self.backbone)
            elif config.last_stride != 2:
                raise ValueError(f"last_stride must be 1 or 2, not {config.last_stride}")
            self.register_buffer("mean", torch.tensor(bb.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(bb.std).view(1, 3, 1, 1), persistent=False)
            self.neck = nn.BatchNorm1d(bb.feature_dim) if config.neck else None
            self.head = nn.Linear(bb.feature_dim, config.emb_dim)
            # fitted after a round's training (core.math.personness), not by the identity losses
            self.person = nn.Sequential(nn.Linear(bb.feature_dim, personness.HIDDEN), nn.ReLU(),
                                        nn.Linear(personness.HIDDEN, 1)) if config.person_head else None
            if self.person is not None:
                self.person.requires_grad_(False)
            g = torch.Generator().manual_seed(config.seed)
            # orthogonal rows: a near-isometric projection, so pretrained geometry survives
            nn.init.orthogonal_(self.head.weight, generator=g)
            nn.init.zeros_(self.head.bias)
            blocks = bb.blocks(self.backbone)
            if config.frozen_blocks > len(blocks):
                raise ValueError(f"frozen_blocks={config.frozen_blocks} but {config.backbone} "
                                 f"has {len(blocks)} blocks")
            for b in blocks[: config.frozen_blocks]:
                for p in b.parameters():
                    p.requires_grad_(False)

        def prepare(self, x: "torch.Tensor") -> "torch.Tensor":
            """BGR ``[N, H, W, 3]`` 0..255 -> normalised RGB ``[N, 3, H, W]`` float."""
            x = x.to(torch.float32).permute(0, 3, 1, 2)
            x = torch.cat([x[:, 2:3], x[:, 1:2], x[:, 0:1]], dim=1) / 255.0
            if self.config.brightness_invariant:
                x = normalize_luma(x)
            return (x - self.mean) / self.std

        def pool(self, f: "torch.Tensor") -> "torch.Tensor":
            """Feature map ``[N, C, h, w]`` -> ``[N, C]``: global average, then the neck if any."""
            p = f.mean(dim=(2, 3))
            return p if self.neck is None else self.neck(p)

        def outputs(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor | None"]:
            """Normalised RGB ``[N, 3, H, W]`` -> (unit embeddings ``[N, emb_dim]``, pooled
            features ``[N, C]``, person-ness ``[N]`` in 0..1 or None without a person head)."""
            f = self.pool(self.backbone(x))
            e = self.head(f)
            if self.config.flip_average and not self.training:
                e = e + self.head(self.pool(self.backbone(torch.flip(x, dims=(3,)))))
            e = e / torch.sqrt((e * e).sum(dim=1, keepdim=True) + 1e-12)
            p = None if self.person is None else torch.sigmoid(self.person(f))[:, 0]
            return e, f, p

        def forward_normalized(self, x: "torch.Tensor") -> "torch.Tensor":
            """Normalised RGB ``[N, 3, H, W]`` -> ``[N, emb_dim]`` unit vectors."""
            return self.outputs(x)[0]

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.forward_normalized(self.prepare(x))

        def forward_with_person(self, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
            """BGR ``[N, H, W, 3]`` -> (embeddings, person-ness ``[N]``): the exported graph's outputs."""
            e, _f, p = self.outputs(self.prepare(x))
            return e, p

    _MODEL_CLS = EmbeddingModel
    return _MODEL_CLS


def __getattr__(name: str):  # core.model.network.EmbeddingModel without importing torch at import time
    if name == "EmbeddingModel":
        return _model_class()
    raise AttributeError(name)
