"""Keypoints: prompt [kpt, x0, y0, x1, y1, person] + K x [x, y, visibility].

x and y are binned over the whole canvas. A keypoint is "visible" when it is labelled
(COCO v > 0); unlabelled ones get random coordinates inside the box in training, whose tokens
carry no loss while their visibility token does. Score = p(visible) / (p(visible) + p(invisible)).
Only persons prompt keypoints; in a response each carries its [x, y, score] list. Metric: COCO
keypoint AP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from model.codecs.base import (
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    box_tokens,
    register_codec,
)
from model.config import flip_pairs_from_names, swapped_order

if TYPE_CHECKING:
    from model.evaluate import GroundTruth
    from model.inference_io import Result


@register_codec
class KeypointCodec(TaskCodec):
    name = "keypoints"
    prompted_by_detections = True
    output_field = "keypoints"
    metrics = ("keypoints_AP",)

    decoding_options: ClassVar[dict[str, tuple[Any, ...]]] = {
        "keypoints_flip": (False, True),
        "keypoints_zoom": (False, True),
    }
    flip_option = "keypoints_flip"
    zoom_option = "keypoints_zoom"

    prompt_len = 6

    @property
    def body_len(self) -> int:
        return self.config.num_keypoints * 3

    def from_mirror(self, probs: torch.Tensor, contexts: list[DecodeContext]) -> torch.Tensor:
        """Left and right joints swap places, and each x distribution is mirrored about the
        image: keypoints are pixel indices (model.data.transforms), so pixel x on the mirror
        image is W - 1 - x on the image, and bin k's centre (k + 0.5) / n on the canvas maps
        to the fractional bin n * a - 1 - k, a = (W - 1) * scale / canvas width; its
        probability is split between the two bins around that (linearly), past the edges onto
        the edge bins."""
        K, n = self.config.num_keypoints, self.vocab.num_bins
        order = swapped_order(K, flip_pairs_from_names(self.config.keypoint_names))
        probs = probs.reshape(len(probs), K, 3, -1)[:, order]
        x = probs[:, :, 0, : n + 1]  # [S, K, n + 1] over the coordinate bins
        spans = torch.tensor([context.mirror_span for context in contexts])
        target = (n * spans - 1)[:, None] - torch.arange(n + 1.0)  # [S, n + 1] each bin's place
        below = target.floor()
        upper = target - below  # the share of the bin above
        low = below.long().clamp(0, n)[:, None].expand_as(x)
        high = (below.long() + 1).clamp(0, n)[:, None].expand_as(x)
        mirrored = torch.zeros_like(x)
        mirrored.scatter_add_(-1, low, x * (1 - upper)[:, None])
        mirrored.scatter_add_(-1, high, x * upper[:, None])
        probs = probs.clone()
        probs[:, :, 0, : n + 1] = mirrored
        return probs.reshape(len(probs), K * 3, -1)

    @property
    def person_label(self) -> int:
        return self.config.class_names.index(self.config.person_class)

    def vocab_slice(self) -> tuple[int, int]:
        return self.vocab.coord_start, self.vocab.invisible + 1

    def body_ranges(self) -> list[tuple[int, int]]:
        coords = (self.vocab.coord_start, self.vocab.coord_stop)
        visibility = (self.vocab.visible, self.vocab.invisible + 1)
        return [coords, coords, visibility] * self.config.num_keypoints

    def prompts(self, source: int | torch.Tensor) -> torch.Tensor:
        """source: detection tokens [S, 5] (box + person class) -> [S, 6]."""
        detection_tokens = self._prompt_detections(source)
        kpt = torch.full((len(detection_tokens), 1), self.vocab.keypoint_prompt)
        return torch.cat([kpt, detection_tokens.long()], 1)

    def applies_to(self, labels: torch.Tensor) -> torch.Tensor:
        """Persons only."""
        return labels == self.person_label

    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        v, K = self.vocab, self.config.num_keypoints
        prompts, bodies, coord_weights, image_index = [], [], [], []
        for b, target in enumerate(targets):
            kpts = target["keypoints"]
            persons = (target["labels"] == self.person_label) & (kpts[..., 2] > 0).any(-1)
            idx = persons.nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=generator)]
            idx = idx[: self.config.max_instances_per_image]
            if len(idx) == 0:
                continue
            boxes, kp = target["boxes"][idx].float(), kpts[idx].float()
            labelled = kp[..., 2] > 0  # [n, K]
            # Unlabelled keypoints: random coordinates inside the box.
            u = torch.rand(len(idx), K, 2, generator=generator)
            random_xy = boxes[:, None, :2] + u * (boxes[:, None, 2:] - boxes[:, None, :2])
            xy = torch.where(labelled.unsqueeze(-1), kp[..., :2], random_xy)
            vis = torch.where(labelled, v.visible, v.invisible)
            body = torch.cat([v.quantize(xy.clamp(0, 1)), vis.unsqueeze(-1)], -1).flatten(1)
            label = torch.full((len(idx), 1), v.class_token(self.person_label))
            prompts.append(self.prompts(torch.cat([box_tokens(v, boxes), label], 1)))
            bodies.append(body)
            weight = torch.stack([labelled, labelled, torch.ones_like(labelled)], -1)
            coord_weights.append(weight.flatten(1).float())
            image_index.append(torch.full((len(idx),), b))
        if not prompts:
            return TrainSequences.empty(self.seq_len)
        prompt, body = torch.cat(prompts), torch.cat(bodies)
        inputs, weights = self.fully_and_partly_masked(prompt, body, generator)
        weights[:, self.prompt_len :] *= torch.cat(coord_weights).repeat(2, 1)
        targets_ = torch.cat([prompt, body], 1).repeat(2, 1).unsqueeze(1)
        return TrainSequences(inputs, targets_, weights, torch.cat(image_index).repeat(2))

    def visibility_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [S, K*3, V_slice] -> [S, K] p(visible) / (p(visible) + p(invisible))."""
        start = self.vocab_slice()[0]
        vis = probs[:, 2::3, self.vocab.visible - start]
        invis = probs[:, 2::3, self.vocab.invisible - start]
        return vis / (vis + invis).clamp(min=1e-12)

    def remask_scores(self, probs: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """A keypoint's x and y take its visibility score; visibility tokens their own."""
        scores = confidence.clone()
        vis_score = self.visibility_scores(probs)
        scores[:, 0::3], scores[:, 1::3] = vis_score, vis_score
        return scores

    def decode(
        self,
        logits: torch.Tensor,
        prompts: torch.Tensor | None,
        contexts: list[DecodeContext],
        **_: Any,
    ) -> list[torch.Tensor]:
        """[S, K*3, V_slice] -> per sequence [K, 3] (x, y in original pixels, score)."""
        v, start = self.vocab, self.vocab_slice()[0]
        probs = logits.float().softmax(-1)
        coord_logits = logits[:, :, v.coord_start - start : v.coord_stop - start]
        xy = v.read_coordinates(coord_logits, self.config.coordinate_window)[0]  # [S, K*3]
        xy = torch.stack([xy[:, 0::3], xy[:, 1::3]], -1)  # [S, K, 2]
        scores = self.visibility_scores(probs)
        out = []
        for s, ctx in enumerate(contexts):
            pixels = ctx.to_pixels(xy[s].flatten()).reshape(-1, 2)
            out.append(torch.cat([pixels, scores[s].unsqueeze(-1)], -1))
        return out

    # --- response and metric ----------------------------------------------------------------
    def to_json(self, output: torch.Tensor, options: JsonOptions) -> list[list[float]]:
        """[K, 3] -> one [x, y, score] per keypoint name."""
        return [[round(v, 2) for v in point] for point in output.tolist()]

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        from model.evaluate import CocoAP  # pycocotools' evaluator only when evaluating

        return CocoAP(
            truth,
            truth.keypoints,
            "keypoints",
            self.coco_keypoints,
            self.metrics,
            self.output_scores,
        )

    def coco_keypoints(self, result: Result) -> list[list[float] | None]:
        """Each detection's keypoints as COCO's flat [x, y, score, ...] (None: not a person)."""
        return [None if kp is None else kp.flatten().tolist() for kp in result.outputs[self.name]]
