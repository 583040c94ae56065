"""Image backbones: torchvision ResNets or timm models, weights from a local file only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.config import ModelConfig

RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}


def load_local_weights(module: nn.Module, path: str | Path) -> None:
    """Load backbone weights from a local .safetensors file (never a pickle, never a URL)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"backbone weights must be a .safetensors file, got {path}")
    _, unexpected = module.load_state_dict(load_file(path), strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {unexpected[:5]}...")


class Backbone(nn.Module):
    """What the network needs of a backbone: NCHW feature maps, finest first, with their
    channels and strides. One map (the last stage), or two when built with `fine`: the stage
    before the last too, at twice the resolution."""

    channels: list[int]
    strides: list[int]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> per level [B, channels[i], H/strides[i], W/strides[i]]"""
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """A torchvision ResNet cut after `last_stage` (3 -> stride 16, 4 -> stride 32)."""

    def __init__(
        self, name: str, last_stage: int, frozen_bn: bool, weights: str | None, fine: bool
    ):
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        if weights:
            load_local_weights(net, weights)
        if frozen_bn:  # a pretrained backbone: its stem stays fixed too (reference: freeze_at=1)
            for param in [*net.conv1.parameters(), *net.bn1.parameters()]:
                param.requires_grad_(False)
        if fine and last_stage < 2:
            raise ValueError("a fine memory level needs backbone_last_stage >= 2")
        stages = [net.layer1, net.layer2, net.layer3, net.layer4][:last_stage]
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages)
        levels = [last_stage - 1, last_stage] if fine else [last_stage]
        self.channels = [RESNET_CHANNELS[name][stage - 1] for stage in levels]
        self.strides = [2 ** (stage + 1) for stage in levels]
        # body: stem (4 modules), then the stages; a level is a stage's output
        self.taps = [3 + stage for stage in levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> per level [B, C, H/stride, W/stride]"""
        maps, x = [], images
        for index, module in enumerate(self.body):
            x = module(x)
            if index in self.taps:
                maps.append(x)
        return maps


class TimmBackbone(Backbone):
    """A timm model's last feature map (Swin, ViT, ...), with the one before it when `fine`,
    as NCHW."""

    def __init__(self, name: str, image_size: tuple[int, int], weights: str | None, fine: bool):
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"img_size": image_size}
        if name.startswith("vit"):
            kwargs["dynamic_img_size"] = True
        elif name.startswith("swin"):
            kwargs["strict_img_size"] = False
        self.net = timm.create_model(
            name,
            pretrained=False,
            features_only=True,
            out_indices=(-2, -1) if fine else (-1,),
            **kwargs,
        )
        if weights:
            load_local_weights(self.net, weights)
        info = self.net.feature_info
        assert isinstance(info, timm.models.FeatureInfo)  # features_only=True has one
        self.channels = list(info.channels())
        self.strides = list(info.reduction())
        if fine and self.strides[0] >= self.strides[-1]:  # e.g. ViT: every block at stride 16
            raise ValueError(f"fine_memory: timm:{name} has no finer stage before its last")
        fmt = getattr(self.net, "output_fmt", "NCHW")
        self.channels_last = str(getattr(fmt, "name", fmt)) == "NHWC"
        patches = [m for m in self.net.modules() if isinstance(m, timm.layers.PatchEmbed)]
        self.patch_size: tuple[int, int] = tuple(patches[0].patch_size) if patches else (1, 1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> per level [B, C, ceil(H/stride), ceil(W/stride)]: a canvas off the
        patch grid (800x1333 is no multiple of 16) is padded on the right and bottom to the
        next patch; the pad mask is resized to each map, so the padding stays masked."""
        height, width = images.shape[-2:]
        ph, pw = self.patch_size
        images = F.pad(images, (0, -width % pw, 0, -height % ph))
        maps = self.net(images)
        return [m.permute(0, 3, 1, 2) for m in maps] if self.channels_last else list(maps)


def build_backbone(config: ModelConfig) -> Backbone:
    if config.backbone.startswith("timm:"):
        return TimmBackbone(
            config.backbone[5:], config.image_size, config.backbone_weights, config.fine_memory
        )
    if config.backbone not in RESNET_CHANNELS:
        raise ValueError(f"unknown backbone {config.backbone!r}")
    return ResNetBackbone(
        config.backbone,
        config.backbone_last_stage,
        config.frozen_batchnorm,
        config.backbone_weights,
        config.fine_memory,
    )
