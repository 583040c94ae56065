"""Segmentation: prompt [seg, x0, y0, x1, y1, class] + mask_size^2 fg/bg tokens.

The body is the instance mask cropped to its box and resized to mask_size x mask_size, as
Mask R-CNN targets. At inference one sequence per kept detection; the foreground probability
is pasted back into the box and thresholded at the config's `mask_threshold`, and the mask
scored (`mask_score`) by `mask_scoring`. In a response each detection carries its
mask as COCO RLE or polygons (`mask_format`). Metric: COCO mask AP.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from model.codecs.base import (
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    box_tokens,
    register_codec,
)
from model.mask_formats import BoxMask, encode_rle, mask_to_polygons

if TYPE_CHECKING:
    from model.evaluate import GroundTruth
    from model.inference_io import Result

BOX_JITTER = 0.05  # training boxes move by up to 5% of their size: inference boxes are predicted


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """masks [N, H, W] (canvas), boxes [N, 4] normalised xyxy -> [N, size, size] bool."""
    if len(masks) == 0:
        return torch.zeros(0, size, size, dtype=torch.bool)
    h, w = masks.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float)
    rois = torch.cat([torch.arange(len(boxes)).float().unsqueeze(1), boxes.float() * scale], 1)
    crops = roi_align(masks.unsqueeze(1).float(), rois, (size, size), 1.0, 2, aligned=True)
    return crops.squeeze(1) >= 0.5


def paste_mask(
    prob: torch.Tensor,
    box: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    quality: float = 1.0,
) -> BoxMask:
    """prob [m, m] in the box, box [4] in pixels -> the image's mask (the pixels whose
    probability reaches `threshold`), held as the box's pixels (BoxMask: a full-size mask of a
    large photo would cost H x W bytes)."""
    H, W = image_size
    left, top, right, bottom = (float(v) for v in box)
    x0, y0 = max(math.floor(left), 0), max(math.floor(top), 0)
    x1, y1 = min(math.ceil(right), W), min(math.ceil(bottom), H)
    if x1 <= x0 or y1 <= y0:
        return BoxMask(torch.zeros(0, 0, dtype=torch.bool), 0, 0, (H, W), quality)
    # Sample the m x m grid at the pixel centres of the (float) box.
    bw, bh = max(float(box[2] - box[0]), 1e-3), max(float(box[3] - box[1]), 1e-3)
    xs = ((torch.arange(x0, x1) + 0.5 - float(box[0])) / bw) * 2 - 1
    ys = ((torch.arange(y0, y1) + 0.5 - float(box[1])) / bh) * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).unsqueeze(0)
    sampled = F.grid_sample(
        prob[None, None].float(), grid, align_corners=False, padding_mode="border"
    )
    return BoxMask(sampled[0, 0] >= threshold, y0, x0, (H, W), quality)


@register_codec
class SegmentationCodec(TaskCodec):
    name = "segmentation"
    prompted_by_detections = True
    output_field = "mask"
    score_field = "mask_score"
    metrics = ("segm_AP",)
    decoding_options: ClassVar[dict[str, tuple[Any, ...]]] = {
        "mask_threshold": (0.5, 0.3, 0.4, 0.6),
        "mask_scoring": (False, True),
        "segmentation_flip": (False, True),
        "segmentation_zoom": (False, True),
    }
    flip_option = "segmentation_flip"
    zoom_option = "segmentation_zoom"

    prompt_len = 6

    def from_mirror(self, probs: torch.Tensor, contexts: list[DecodeContext]) -> torch.Tensor:
        """A mask's grid lies in its box, and the mirrored box is the box: the grid's columns
        reversed."""
        m = self.config.mask_size
        return probs.reshape(len(probs), m, m, -1).flip(2).reshape(probs.shape)

    @property
    def body_len(self) -> int:
        return self.config.mask_size**2

    def vocab_slice(self) -> tuple[int, int]:
        return self.vocab.foreground, self.vocab.background + 1

    def body_ranges(self) -> list[tuple[int, int]]:
        return [self.vocab_slice()] * self.body_len

    def prompts(self, source: int | torch.Tensor) -> torch.Tensor:
        """source: detection tokens [S, 5] (box + class) -> [S, 6]."""
        detection_tokens = self._prompt_detections(source)
        seg = torch.full((len(detection_tokens), 1), self.vocab.segmentation_prompt)
        return torch.cat([seg, detection_tokens.long()], 1)

    def mask_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        fg, bg = self.vocab.foreground, self.vocab.background
        return torch.where(crops, fg, bg).flatten(1).long()

    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        prompts, bodies, image_index = [], [], []
        for b, target in enumerate(targets):
            n = len(target["labels"])
            keep = torch.randperm(n, generator=generator)[: self.config.max_instances_per_image]
            if len(keep) == 0:
                continue
            boxes = target["boxes"][keep].float()
            size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            jitter = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * BOX_JITTER * size
            boxes = (boxes + jitter).clamp(0, 1)
            crops = crop_masks(target["masks"][keep], boxes, self.config.mask_size)
            classes = self.vocab.class_token(target["labels"][keep].long()).unsqueeze(1)
            prompts.append(self.prompts(torch.cat([box_tokens(self.vocab, boxes), classes], 1)))
            bodies.append(self.mask_tokens(crops))
            image_index.append(torch.full((len(keep),), b))
        if not prompts:
            return TrainSequences.empty(self.seq_len)
        prompt, body, index = torch.cat(prompts), torch.cat(bodies), torch.cat(image_index)
        targets_ = torch.cat([prompt, body], 1).unsqueeze(1)
        if self.config.segmentation_masked_copies == 2:  # the reference's: both copies
            inputs, weights = self.fully_and_partly_masked(prompt, body, generator)
            return TrainSequences(inputs, targets_.repeat(2, 1, 1), weights, index.repeat(2))
        # 256 mask tokens make these the costliest sequences: by default one masked copy each.
        inputs, weights = self.fully_or_partly_masked(prompt, body, generator)
        return TrainSequences(inputs, targets_, weights, index)

    def decode(
        self,
        logits: torch.Tensor,
        prompts: torch.Tensor | None,
        contexts: list[DecodeContext],
        boxes: list[torch.Tensor] | None = None,
        **_: Any,
    ) -> list[BoxMask]:
        """[S, m*m, 2] logits -> a mask per sequence, pasted into its box
        (`boxes`: [4] pixel boxes of the detections that prompted each sequence)."""
        if boxes is None:
            raise ValueError(
                "segmentation decodes need `boxes`, those of the detections that "
                "prompted its sequences"
            )
        fg = self.mask_probabilities(logits)
        threshold = self.config.mask_threshold
        quality = self.mask_quality(fg) if self.config.mask_scoring else torch.ones(len(fg))
        return [
            paste_mask(fg[s], boxes[s], ctx.result_size, threshold, float(quality[s]))
            for s, ctx in enumerate(contexts)
        ]

    def mask_quality(self, fg: torch.Tensor) -> torch.Tensor:
        """fg [S, m, m] foreground probabilities -> [S] the mean over the cells in the mask
        (SOLO's maskness; 0 for an empty mask)."""
        inside = fg >= self.config.mask_threshold
        total = (fg * inside).flatten(1).sum(-1)
        return total / inside.flatten(1).sum(-1).clamp(min=1)

    def output_score(self, output: BoxMask, detection_score: float) -> float:
        """A mask's score: its detection's x its quality (`mask_scoring`; else 1); 0 for a
        mask without pixels, which can match nothing."""
        return detection_score * output.quality if output.crop.any() else 0.0

    def mask_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[S, m*m, 2] logits -> [S, m, m] foreground probability (fg is the slice's id 0)."""
        m = self.config.mask_size
        return logits.float().softmax(-1)[..., 0].reshape(-1, m, m)

    # --- response and metric ----------------------------------------------------------------
    def to_json(self, output: BoxMask, options: JsonOptions) -> dict[str, Any] | list[list[float]]:
        """A mask -> COCO compressed RLE, or outer-boundary polygons."""
        if options.mask_format == "polygon":
            return mask_to_polygons(output)
        return encode_rle(output)

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        from model.evaluate import CocoAP  # pycocotools' evaluator only when evaluating

        return CocoAP(
            truth, truth.instances, "segm", self.coco_masks, self.metrics, self.output_scores
        )

    def coco_masks(self, result: Result) -> list[dict[str, Any] | None]:
        """Each detection's mask as COCO RLE (None: no mask)."""
        return [None if mask is None else encode_rle(mask) for mask in result.outputs[self.name]]
