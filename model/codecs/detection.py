"""Detection: 6 prompt tokens + num_slots x [x0, y0, x1, y1, class].

Training input: noise boxes with random classes in every slot, the ground-truth objects
written into random slots, then fully or partly masked. Targets are Hungarian-matched per
decoder layer (model.matcher); unmatched slots must say "no object".

Inference decodes every slot; each request keeps those over its score threshold, best first,
up to its maximum count. Their box and class tokens prompt the tasks prompted by detections.
Metric: COCO box AP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torchvision.ops import batched_nms, box_iou

from model.codecs.base import (
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    box_tokens,
    register_codec,
)
from model.matcher import match_slots

if TYPE_CHECKING:
    from model.evaluate import GroundTruth
    from model.inference_io import Request, Result

TOKENS_PER_SLOT = 5
# Two views' boxes of one class overlapping this much are one object (`fuse_flipped`).
FLIP_MATCH_IOU = 0.55
FLIP_ALONE = 0.5  # the score factor of a box only one view found
# A box re-read on its zoomed crop (`reread`) takes the crop's box of its class that overlaps
# it most, above this IoU, among the crop's detections scoring at least REREAD_SCORE.
REREAD_IOU = 0.5
REREAD_SCORE = 0.05


@dataclass
class Detections:
    """Detections of one image, sorted by score (descending).

    boxes: [N, 4] xyxy in original-image pixels; boxes_norm: [N, 4] normalised canvas coords;
    scores: [N]; labels: [N] class indices; tokens: [N, 5] the slot's tokens (box + class),
    which prompt segmentation and keypoints.
    """

    boxes: torch.Tensor
    boxes_norm: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    tokens: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: torch.Tensor) -> Detections:
        return Detections(
            self.boxes[keep],
            self.boxes_norm[keep],
            self.scores[keep],
            self.labels[keep],
            self.tokens[keep],
        )


def mirror_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """[N, 4] xyxy pixel boxes of an image `width` pixels wide -> the same on its mirror image
    (and back: mirroring is its own inverse)."""
    return boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor(
        [width, 0.0, width, 0.0]
    )


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] plausible random boxes (normalised xyxy) used as detection noise."""
    centre = torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.45 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre - size / 2, centre + size / 2], 1).clamp(0, 1)


@register_codec
class DetectionCodec(TaskCodec):
    name = "detection"
    output_field = "detections"
    metrics = ("bbox_AP", "bbox_AP50", "bbox_AP75")
    # The coordinate window also reads keypoints: every task prompted by detections needs it.
    decoding_options: ClassVar[dict[str, tuple[Any, ...]]] = {
        "coordinate_window": (0, 1, 2, 3, 4),
        "box_confidence_exponent": (0.0, 0.5, 1.0),
        "detection_flip": (False, True),
        "detection_zoom": (False, True),
        # The crops' geometry (model.zoom), for every task that reads them.
        "zoom": (3.0, 2.0, 4.0),
        "zoom_context": (3.0, 2.0, 4.0),
    }
    flip_option = "detection_flip"
    zoom_option = "detection_zoom"

    @property
    def prompt_len(self) -> int:
        return len(self.vocab.detection_prompt)

    @property
    def body_len(self) -> int:
        return self.config.num_slots * TOKENS_PER_SLOT

    def vocab_slice(self) -> tuple[int, int]:
        return self.vocab.class_start, self.vocab.coord_stop

    def body_ranges(self) -> list[tuple[int, int]]:
        coords = (self.vocab.coord_start, self.vocab.coord_stop)
        classes = (self.vocab.class_start, self.vocab.no_object + 1)
        return ([coords] * 4 + [classes]) * self.config.num_slots

    def prompts(self, source: int | torch.Tensor) -> torch.Tensor:
        """source: the batch size -> [B, 6]."""
        batch_size = self._prompt_batch_size(source)
        return torch.tensor([self.vocab.detection_prompt] * batch_size, dtype=torch.long)

    # --- training ---------------------------------------------------------------------------
    def object_tokens(self, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, 5] ground-truth slot tokens of one image."""
        if len(target["labels"]) == 0:
            return torch.zeros(0, TOKENS_PER_SLOT, dtype=torch.long)
        classes = self.vocab.class_token(target["labels"].long()).unsqueeze(1)
        return torch.cat([box_tokens(self.vocab, target["boxes"]), classes], 1)

    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        slots, batch = self.config.num_slots, len(targets)
        bodies, objects = [], torch.zeros(batch, slots, TOKENS_PER_SLOT, dtype=torch.long)
        counts = torch.zeros(batch, dtype=torch.long)
        for b, target in enumerate(targets):
            gt = self.object_tokens(target)
            if len(gt) > slots:  # keep a random subset; the rest cannot be expressed
                gt = gt[torch.randperm(len(gt), generator=generator)[:slots]]
            noise_labels = torch.randint(self.config.num_classes, (slots, 1), generator=generator)
            body = torch.cat(
                [
                    box_tokens(self.vocab, random_boxes(slots, generator)),
                    self.vocab.class_token(noise_labels),
                ],
                1,
            )
            body[torch.randperm(slots, generator=generator)[: len(gt)]] = gt
            bodies.append(body.flatten())
            objects[b, : len(gt)], counts[b] = gt, len(gt)
        prompt = self.prompts(batch)
        inputs, weights = self.fully_and_partly_masked(prompt, torch.stack(bodies), generator)
        return TrainSequences(
            inputs=inputs,
            targets=inputs.unsqueeze(1).clone(),  # placeholder: assign_targets matches per layer
            weights=weights,
            image_index=torch.arange(batch).repeat(2),
            extra={"objects": objects.repeat(2, 1, 1), "num_objects": counts.repeat(2)},
        )

    @torch.no_grad()
    def assign_targets(
        self, log_probs: torch.Tensor, seqs: TrainSequences
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hungarian-match slots to objects, per sequence, on this layer's predictions."""
        P, slots = self.prompt_len, self.config.num_slots
        body_lp = log_probs[:, P:].reshape(len(seqs), slots, TOKENS_PER_SLOT, -1)
        inputs = seqs.inputs[:, P:].reshape(len(seqs), slots, TOKENS_PER_SLOT)
        shown = seqs.weights[:, P:].reshape(len(seqs), slots, TOKENS_PER_SLOT) == 0
        seq, slot, obj = match_slots(
            body_lp,
            self.to_local(inputs),
            shown,
            self.to_local(seqs.extra["objects"]).clamp(min=0),
            seqs.extra["num_objects"],
        )
        # Default target: "no object" in the class position, coordinates carry no loss.
        targets = torch.zeros(
            len(seqs), slots, TOKENS_PER_SLOT, dtype=torch.long, device=log_probs.device
        )
        targets[..., 4] = self.vocab.no_object
        counts = torch.zeros_like(targets, dtype=torch.float)
        counts[..., 4] = self.config.no_object_weight  # DETR's eos_coef: most slots are empty
        targets[seq, slot] = seqs.extra["objects"][seq, obj]
        counts[seq, slot] = 1.0
        prompt_targets = torch.full((len(seqs), P), self.vocab_slice()[0], device=targets.device)
        full = torch.cat([prompt_targets, targets.flatten(1)], 1)
        weights = seqs.weights * torch.cat(
            [torch.zeros_like(prompt_targets, dtype=torch.float), counts.flatten(1)], 1
        )
        return self.to_local(full).clamp(min=0), weights  # weightless positions: any id

    # --- inference --------------------------------------------------------------------------
    def decode(
        self,
        logits: torch.Tensor,
        prompts: torch.Tensor | None,
        contexts: list[DecodeContext],
        **_: Any,
    ) -> list[Detections]:
        """[B, body_len, V_slice] -> one Detections per image: every slot whose box has an
        extent (no two opposite corners in one bin) and some area in the image (so not off
        it), as the reference keeps, sorted by score (`select` applies each request's threshold
        and maximum count). Scores and coordinates follow the config's
        `box_confidence_exponent` and `coordinate_window`."""
        v, config = self.vocab, self.config
        slots = logits.reshape(len(logits), config.num_slots, TOKENS_PER_SLOT, -1).float()
        start = self.vocab_slice()[0]
        class_probs = slots[:, :, 4, v.class_start - start : v.no_object + 1 - start].softmax(-1)
        scores, labels = class_probs[..., :-1].max(-1)  # best real class, no-object excluded
        coord_lo, coord_hi = v.coord_start - start, v.coord_stop - start
        coord_logits = slots[:, :, :4, coord_lo:coord_hi]
        coords, confidence = v.read_coordinates(coord_logits, config.coordinate_window)
        # A box has an extent when its corners' most likely bins differ (the reference's rule;
        # a window alone could part two coordinates of one bin by a sliver).
        best = coord_logits.argmax(-1)  # [B, slots, 4]
        has_extent = (best[..., 2] != best[..., 0]) & (best[..., 3] != best[..., 1])
        if config.box_confidence_exponent:
            box_confidence = confidence.clamp(min=1e-12).log().mean(-1).exp()  # of the four
            scores = scores * box_confidence**config.box_confidence_exponent
        results = []
        for b, context in enumerate(contexts):
            xy = coords[b]
            boxes = torch.cat(
                [torch.minimum(xy[:, :2], xy[:, 2:]), torch.maximum(xy[:, :2], xy[:, 2:])], 1
            )
            order = scores[b].argsort(descending=True)
            pixels = context.to_pixels(boxes[order])
            has_area = has_extent[b][order]  # and some area left in the image (not off it)
            has_area &= (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
            order, pixels = order[has_area], pixels[has_area]
            box_tok = v.quantize(boxes[order])
            tokens = torch.cat([box_tok, v.class_token(labels[b][order]).unsqueeze(1)], 1)
            results.append(
                Detections(
                    pixels,
                    boxes[order],
                    scores[b][order],
                    labels[b][order],
                    tokens,
                )
            )
        return results

    def fuse_flipped(
        self, original: Detections, flipped: Detections, context: DecodeContext
    ) -> Detections:
        """The detections of an image and of its mirror image (`detection_flip`; the mirror's
        boxes in its own pixels) -> one set: each original box of the same class as a mirrored
        one it overlaps (IoU >= FLIP_MATCH_IOU; the most overlapping, in score order) becomes
        their score-weighted mean, scored the two scores' mean; a box one view alone found
        keeps its place at FLIP_ALONE times its score (weighted box fusion over two views)."""
        mirrored = mirror_boxes(flipped.boxes, context.image_size[1])
        overlap = box_iou(original.boxes, mirrored)
        overlap[original.labels[:, None] != flipped.labels[None, :]] = 0.0
        partner = torch.full((len(original),), -1)
        taken = torch.zeros(len(flipped), dtype=torch.bool)
        for i in range(len(original)):  # in score order: the best claim their match first
            candidates = overlap[i].masked_fill(taken, 0.0)
            if len(candidates) and candidates.max() >= FLIP_MATCH_IOU:
                partner[i] = j = int(candidates.argmax())
                taken[j] = True
        pair = partner >= 0
        a, b = original.scores[pair], flipped.scores[partner[pair]]
        total = a + b
        weights = torch.where(  # two scores of 0 weigh the same
            total[:, None] > 0, torch.stack([a, b], 1) / total.clamp(min=1e-12)[:, None], 0.5
        )
        fused = original.boxes.clone()
        fused[pair] = (
            weights[:, :1] * original.boxes[pair] + weights[:, 1:] * mirrored[partner[pair]]
        )
        fused_scores = original.scores * FLIP_ALONE
        fused_scores[pair] = total / 2
        boxes = torch.cat([fused, mirrored[~taken]])
        scores = torch.cat([fused_scores, flipped.scores[~taken] * FLIP_ALONE])
        labels = torch.cat([original.labels, flipped.labels[~taken]])
        order = scores.argsort(descending=True)
        return self.detections(boxes[order], scores[order], labels[order], context)

    def reread(
        self, detections: Detections, on_crops: list[Detections | None], context: DecodeContext
    ) -> Detections:
        """An image's detections, each box re-read on its zoomed crop (model.zoom): replaced by
        the box of its class that overlaps it most (IoU above REREAD_IOU) among the detections
        of its crop (`on_crops[j]`, in the image's pixels; None: it had no crop). Scores,
        classes and order are kept; a replaced box's tokens are recomputed."""
        boxes = detections.boxes.clone()
        changed = torch.zeros(len(detections), dtype=torch.bool)
        for j, found in enumerate(on_crops):
            if found is None:
                continue
            same = (found.labels == detections.labels[j]) & (found.scores >= REREAD_SCORE)
            if not same.any():
                continue
            overlap = box_iou(detections.boxes[j : j + 1], found.boxes[same])[0]
            best = int(overlap.argmax())
            if overlap[best] > REREAD_IOU:
                boxes[j], changed[j] = found.boxes[same][best], True
        if not changed.any():
            return detections
        fresh = self.detections(boxes, detections.scores, detections.labels, context)
        keep = changed[:, None]
        return Detections(
            boxes,
            torch.where(keep, fresh.boxes_norm, detections.boxes_norm),
            detections.scores,
            detections.labels,
            torch.where(keep, fresh.tokens, detections.tokens),
        )

    def mirror(self, detections: Detections, context: DecodeContext) -> Detections:
        """An image's detections as they lie on its mirror image, tokens and all (what prompts
        the tasks that read mirror images, `reads_mirror_image`)."""
        boxes = mirror_boxes(detections.boxes, context.image_size[1])
        return self.detections(boxes, detections.scores, detections.labels, context)

    def detections(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        context: DecodeContext,
    ) -> Detections:
        """Pixel boxes [N, 4], scores and labels -> Detections with their canvas boxes and
        tokens."""
        normalised = context.to_canvas(boxes).clamp(0, 1)
        tokens = torch.cat(
            [box_tokens(self.vocab, normalised), self.vocab.class_token(labels).unsqueeze(1)], 1
        )
        return Detections(boxes, normalised, scores, labels, tokens)

    def select(self, output: Detections, request: Request) -> Detections:
        """The request's detections: scoring at least its threshold, class-wise NMS at its
        IoU (else the model's; 1 is off), then at most its count. Sorted by score, like the
        input."""
        keep = (output.scores >= request.score_threshold).nonzero().flatten()
        keep = keep[self.after_nms(output.select(keep), request)]
        return output.select(keep[: request.max_detections])

    def after_nms(self, detections: Detections, request: Request) -> torch.Tensor:
        """Indices of the detections class-wise NMS at the request's IoU (else the model's; 1
        is off) keeps, in their (score) order."""
        iou = self.config.nms_iou if request.nms_iou is None else request.nms_iou
        if iou >= 1.0 or len(detections) < 2:
            return torch.arange(len(detections))
        kept = batched_nms(
            detections.boxes.float(), detections.scores.float(), detections.labels, iou
        )
        return kept.sort().values  # scores were sorted: index order is score order

    # --- response and metric ----------------------------------------------------------------
    def to_json(self, output: Detections, options: JsonOptions) -> list[dict[str, Any]]:
        """-> one object per detection (the tasks it prompted add their fields to it)."""
        names = self.config.class_names
        return [
            {
                "label": names[label],
                "category_id": label,
                "score": round(score, 5),
                "box": [round(v, 2) for v in box],
            }
            for box, score, label in zip(
                output.boxes.tolist(), output.scores.tolist(), output.labels.tolist(), strict=True
            )
        ]

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        from model.evaluate import CocoAP  # pycocotools' evaluator only when evaluating

        return CocoAP(truth, truth.instances, "bbox", self.coco_boxes, self.metrics)

    def coco_boxes(self, result: Result) -> list[list[float]]:
        """Each detection's box as COCO's [x, y, width, height]."""
        return [
            [x0, y0, x1 - x0, y1 - y0]
            for x0, y0, x1, y1 in result.outputs[self.name].boxes.tolist()
        ]
