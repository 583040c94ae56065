"""Joint image/target augmentations for the multi-task targets of `CocoMultiTaskDataset`.

Image, boxes and masks go through torchvision.transforms.v2 functionals (which keep the
tv_tensors types and box canvas sizes right). Keypoints stay a plain [N, K, 3] (x, y, v)
tensor and are transformed here, because flips must also swap left/right joints.
Randomness uses torch's RNG so DataLoader workers get distinct, seedable streams.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from model.config import ModelConfig, swapped_order
from model.preprocess import fit_scale, image_canvas
from model.zoom import Zoom, crop_zoom, zoom_window


def _image_size(image: torch.Tensor) -> tuple[int, int]:
    return int(image.shape[-2]), int(image.shape[-1])


def _select(target: dict, keep: torch.Tensor) -> dict:
    """Keep the objects where `keep` is True in every per-object field."""
    out = dict(target)
    out["boxes"] = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
    out["masks"] = tv_tensors.Mask(target["masks"][keep])
    for key in ("labels", "keypoints", "has_keypoints", "iscrowd"):
        if key in target:
            out[key] = target[key][keep]
    return out


def _swap_sides(caption: str) -> str:
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m[1] == "left" else "left", caption)


Target = dict[str, Any]  # boxes, labels, masks, keypoints (tv_tensors), captions, ids
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


class Compose:
    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    """Mirror image, boxes, masks and keypoints; swap left/right joints.

    Keypoints are COCO's pixel indices (pixel x is the span [x, x + 1) of v2's continuous box
    coordinates), so mirroring pixel centres gives x' = W - 1 - x; boxes (x' = W - x on edges)
    and masks (pixel i -> W - 1 - i) mirror the same pixels.
    Captions get "left"/"right" swapped so spatial phrases stay true (`swap_captions`).
    """

    def __init__(
        self, p: float = 0.5, flip_pairs: Sequence[tuple[int, int]] = (), swap_captions: bool = True
    ) -> None:
        self.p = p
        self.flip_pairs = list(flip_pairs)
        self.swap_captions = swap_captions

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        _, w = _image_size(image)
        target = dict(target)
        image = F.horizontal_flip(image)
        target["boxes"] = F.horizontal_flip(target["boxes"])
        target["masks"] = F.horizontal_flip(target["masks"])
        kps = target["keypoints"].clone()
        labelled = kps[..., 2] > 0
        kps[..., 0] = torch.where(labelled, w - 1 - kps[..., 0], kps[..., 0])
        if self.flip_pairs and kps.shape[1]:
            kps = kps[:, swapped_order(kps.shape[1], self.flip_pairs)]
        target["keypoints"] = kps
        if self.swap_captions and "captions" in target:
            target["captions"] = [_swap_sides(c) for c in target["captions"]]
        return image, target


def _resize(
    image: torch.Tensor, target: Target, new_h: int, new_w: int
) -> tuple[torch.Tensor, Target]:
    h, w = _image_size(image)
    if (new_h, new_w) == (h, w):
        return image, target
    target = dict(target)
    image = F.resize(image, [new_h, new_w], antialias=True)
    target["boxes"] = F.resize(target["boxes"], [new_h, new_w])
    target["masks"] = F.resize(target["masks"], [new_h, new_w])  # Mask -> nearest
    kps = target["keypoints"].clone()
    kps[..., 0] *= new_w / w
    kps[..., 1] *= new_h / h
    target["keypoints"] = kps
    return image, target


def _scaled_size(h: int, w: int, longest: float) -> tuple[int, int]:
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class RandomResize:
    """Scale (aspect kept) so the longest side is uniform in
    [min_side_fraction, max_side_fraction] * max_size (multi-scale training)."""

    def __init__(
        self, min_side_fraction: float = 0.6, max_side_fraction: float = 1.0, max_size: int = 640
    ) -> None:
        self.lo = min_side_fraction * max_size
        self.hi = max_side_fraction * max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        longest = self.lo + float(torch.rand(())) * (self.hi - self.lo)
        return _resize(image, target, *_scaled_size(*_image_size(image), longest))


class ResizeLongest:
    """Deterministic resize so the longest side equals `max_size` (evaluation)."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        return _resize(image, target, *_scaled_size(*_image_size(image), self.max_size))


class RandomCrop:
    """With probability p, crop a random window with sides in [min_scale, 1] of the image.

    Boxes are clipped to the window; objects whose clipped box or mask vanishes are dropped.
    Keypoints outside the window become v=0 with x=y=0 (COCO's "not labelled").
    Captions are left as they are (they may mention a cropped-away object).
    """

    def __init__(self, p: float = 0.5, min_scale: float = 0.6) -> None:
        self.p = p
        self.min_scale = min_scale

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        h, w = _image_size(image)
        s = self.min_scale + torch.rand(2) * (1 - self.min_scale)
        ch, cw = max(1, int(h * s[0])), max(1, int(w * s[1]))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return crop(image, target, top, left, ch, cw)


def crop(
    image: torch.Tensor, target: Target, top: int, left: int, height: int, width: int
) -> tuple[torch.Tensor, Target]:
    """Crop image and target to the window; see RandomCrop for the target rules."""
    target = dict(target)
    image = F.crop(image, top, left, height, width)
    boxes = F.crop(target["boxes"], top, left, height, width)
    # v2 clamps crop results only softly; clamp hard to the new canvas.
    boxes = tv_tensors.wrap(
        torch.stack(
            [
                boxes[:, 0].clamp(0, width),
                boxes[:, 1].clamp(0, height),
                boxes[:, 2].clamp(0, width),
                boxes[:, 3].clamp(0, height),
            ],
            dim=1,
        ),
        like=boxes,
    )
    target["boxes"] = boxes
    target["masks"] = F.crop(target["masks"], top, left, height, width)

    kps = target["keypoints"].clone()
    kps[..., 0] -= left
    kps[..., 1] -= top
    inside = (
        (kps[..., 0] >= 0) & (kps[..., 0] < width) & (kps[..., 1] >= 0) & (kps[..., 1] < height)
    )
    kps[~(inside & (kps[..., 2] > 0))] = 0
    target["keypoints"] = kps
    if "has_keypoints" in target:
        target["has_keypoints"] = target["has_keypoints"] & (kps[..., 2] > 0).any(dim=-1)

    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh >= 1).all(dim=1) & (target["masks"].flatten(1) > 0).any(dim=1)
    return image, _select(target, keep)


class ZoomCrop:
    """With probability p, the image becomes the zoomed crop (model.zoom) of one of its
    objects, as inference cuts it for that object on a `canvas` (H, W) model, enlarged to
    fill the canvas; else `otherwise` applies. The object is drawn at random among those whose
    crop is not the whole image; an image with none gets `otherwise` too. The target follows
    `crop`'s rules, and the captions are dropped: they describe the whole image."""

    def __init__(self, p: float, zoom: Zoom, canvas: tuple[int, int], otherwise: Transform):
        self.p, self.zoom, self.canvas, self.otherwise = p, zoom, canvas, otherwise

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return self.otherwise(image, target)
        size = _image_size(image)
        boxes = target["boxes"].as_subclass(torch.Tensor)
        windows = [w for box in boxes if (w := zoom_window(box, size, self.canvas, self.zoom))]
        if not windows:
            return self.otherwise(image, target)
        left, top, right, bottom = windows[int(torch.randint(len(windows), ()))]
        image, target = crop(image, target, top, left, bottom - top, right - left)
        target["captions"] = []
        # Enlarged to fill its canvas, as letterboxing does at inference (the "fit"
        # augmentation's collate would; "multiscale" keeps sizes as they are).
        size = (bottom - top, right - left)
        scale = fit_scale(size, image_canvas(size, self.canvas))
        return _resize(
            image, target, max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
        )


class RandomApply:
    """Apply `transforms` in turn with probability p, else nothing."""

    def __init__(self, transforms: Sequence[Transform], p: float = 0.5) -> None:
        self.transforms, self.p = Compose(transforms), p

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        if torch.rand(()) >= self.p:
            return image, target
        return self.transforms(image, target)


def _choice(values: Sequence[int]) -> int:
    return values[int(torch.randint(len(values), ()))]


class ResizeShortestEdge:
    """Resize (aspect kept) so the short side is a random choice of `lengths`, unless the
    long side would then pass `max_size`: then the long side is max_size (detectron2's
    ResizeShortestEdge, sample_style "choice")."""

    def __init__(self, lengths: Sequence[int], max_size: int | None = None) -> None:
        self.lengths, self.max_size = list(lengths), max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = _image_size(image)
        scale = _choice(self.lengths) / min(h, w)
        if self.max_size is not None and max(h, w) * scale > self.max_size:
            scale = self.max_size / max(h, w)
        return _resize(image, target, max(1, round(h * scale)), max(1, round(w * scale)))


class RandomSizeCrop:
    """Crop a window whose height and width are each uniform in [min_size, max_size] pixels
    (at most the image's), at a uniform position (detectron2's RandomCrop, crop type
    "absolute_range"); the target follows `crop`'s rules."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
        h, w = _image_size(image)
        ch = int(torch.randint(min(h, self.min_size), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(w, self.min_size), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return crop(image, target, top, left, ch, cw)


# The reference's training scales (DETR's), at a canvas whose short side is 800.
REFERENCE_SHORT_SIDE = 800
REFERENCE_SCALES = tuple(range(480, 801, 32))  # final short side
REFERENCE_CROP_RESIZE = (400, 500, 600)  # short side before the random crop
REFERENCE_CROP = (384, 600)  # crop height and width range


def multiscale_transforms(
    canvas: tuple[int, int], flip_pairs: Sequence[tuple[int, int]] = ()
) -> Compose:
    """The reference's training augmentation, scaled to `canvas` (exact on r50's 800x1333):
    flip; half the time, resize the short side to 400, 500 or 600 and crop a random window of
    384..600 pixels a side; then resize the short side to one of 480, 512, ..., 800, the long
    side at most the canvas's longer side (1333). Images keep their size on the canvas (no
    fitting), so the model trains at all these scales."""
    factor = min(canvas) / REFERENCE_SHORT_SIDE

    def scaled(sizes: Sequence[int]) -> list[int]:
        return [max(1, round(size * factor)) for size in sizes]

    crop_min, crop_max = scaled(REFERENCE_CROP)
    return Compose(
        [
            RandomHorizontalFlip(0.5, flip_pairs),
            RandomApply(
                [
                    ResizeShortestEdge(scaled(REFERENCE_CROP_RESIZE)),
                    RandomSizeCrop(crop_min, crop_max),
                ],
                p=0.5,
            ),
            ResizeShortestEdge(scaled(REFERENCE_SCALES), max(canvas)),
        ]
    )


def training_transforms(config: ModelConfig, flip_pairs: Sequence[tuple[int, int]] = ()) -> Compose:
    """The augmentation `config.train_augmentation` names: "multiscale" (the reference's
    scales, the r50/swin-b/vit-b presets) or "fit" (the tiny preset's, `build_transforms`)."""
    if config.train_augmentation == "multiscale":
        transforms = multiscale_transforms(config.image_size, flip_pairs)
    else:
        transforms = build_transforms(True, max(config.image_size), flip_pairs)
    if not config.train_zoom_crops:
        return transforms
    # The zoomed crop replaces the augmentation's own crop and scale: flip, then either.
    flip, *rest = transforms.transforms
    assert isinstance(flip, RandomHorizontalFlip), "both augmentations start with the flip"
    zoom = ZoomCrop(config.train_zoom_crops, crop_zoom(config), config.image_size, Compose(rest))
    return Compose([flip, zoom])


def build_transforms(
    train: bool, max_size: int, flip_pairs: Sequence[tuple[int, int]] = ()
) -> Compose:
    """Train (the "fit" augmentation): flip, crop (p=0.5), resize the longest side to
    [0.6, 1.0] * max_size; the collate then fits every image to the canvas, so crops are
    seen zoomed in. Eval: resize the longest side to exactly max_size. Images stay uint8."""
    if not train:
        return Compose([ResizeLongest(max_size)])
    return Compose(
        [
            RandomHorizontalFlip(0.5, flip_pairs),
            RandomCrop(p=0.5, min_scale=0.6),
            RandomResize(0.6, 1.0, max_size),
        ]
    )
