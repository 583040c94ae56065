"""The GPU check's parity section: the bundled model on a device against the CPU, by raw
logits (fp32 with TF32 off, bf16 autocast) and by the decoded results of the whole pipeline,
against tolerances stated here. On the CPU itself it compares CPU bf16 autocast with fp32.

Each changed argmax also records how close fp32's own top two logits were there: bf16 flips
that happen only at near-ties (adjacent coordinate bins the model barely tells apart) are
rounding, while flips at wide margins would point at a numerical fault."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from model.codecs.detection import Detections
    from model.config import ModelConfig
    from model.inference_io import Result
    from model.mask_formats import BoxMask

# Stated before the first GPU run: fp32 on the device (TF32 off) must reproduce the CPU; bf16
# may move logits but must keep nearly every decoded token. (The decoded-result rule for
# coordinates was restated after that run, from 1 px to one coordinate bin: see bin_px.)
FP32_LOGIT_ATOL = 1e-3
BF16_MEAN_ABS_DIFF = 0.1
BF16_TOKEN_AGREEMENT = 0.98


def release() -> None:
    """Return what the objects just dropped held (GPU memory included) before the next run."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parity(checkpoint: Path, device: str, count: int) -> dict[str, Any]:
    """The bundled model on the device vs on the CPU, on generated images of several sizes."""
    from mad.bench.workload import synthetic_image

    sizes = [(256, 256), (192, 320), (320, 200), (240, 240)]
    images = [synthetic_image(sizes[i % len(sizes)], seed=i) for i in range(count)]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    try:
        out = compare_devices(checkpoint, device, images)
    finally:  # the timings after this run with torch's own TF32 choice again
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out["fp32_pass"] = all(
        v["max_abs_diff"] <= FP32_LOGIT_ATOL for v in out["fp32"]["logits"].values()
    ) and out["fp32"]["same_decoded"] == len(images)
    out["bf16_pass"] = all(
        v["mean_abs_diff"] <= BF16_MEAN_ABS_DIFF and v["argmax_agreement"] >= BF16_TOKEN_AGREEMENT
        for v in out["bf16"]["logits"].values()
    )
    out["tolerances"] = {
        "fp32_logit_atol": FP32_LOGIT_ATOL,
        "bf16_mean_abs_diff": BF16_MEAN_ABS_DIFF,
        "bf16_token_agreement": BF16_TOKEN_AGREEMENT,
        "decoded_same": "same labels and captions, boxes and keypoints "
        "within one coordinate bin, masks within 0.5% of "
        "pixels",
    }
    return out


def compare_devices(checkpoint: Path, device: str, images: list[Image.Image]) -> dict[str, Any]:
    """Raw logits per task and decoded pipeline results: CPU fp32 vs each device variant."""
    from mad.bench.workload import detection_prompts
    from model.inference_io import Request
    from model.pipeline import Pipeline
    from model.preprocess import prepare_batch
    from runtime.backends import create_runner

    mad, cpu = create_runner("torch", checkpoint, "cpu")
    variants: dict[str, dict[str, Any]] = {"fp32": {}, "bf16": {"precision": "bf16"}}
    batch = prepare_batch(images, mad.config.image_size)
    reference_memory = cpu.encode(batch.images, batch.pad_mask)
    requests = [Request(image, tuple(mad.config.tasks)) for image in images]
    reference = Pipeline(mad, cpu)(requests)
    out: dict[str, Any] = {"images": [list(i.size[::-1]) for i in images]}
    for name, options in variants.items():
        _, runner = create_runner("torch", checkpoint, device, **options)
        memory = runner.encode(batch.images, batch.pad_mask)
        logits = {}
        for task, codec in mad.codecs.items():
            if codec.prompted_by_detections:
                tokens, index, _, _ = detection_prompts(mad, 3, batch.contexts)
                prompts = codec.prompts(tokens)
            else:
                prompts, index = codec.prompts(len(images)), torch.arange(len(images))
            body = torch.full((len(prompts), codec.body_len), mad.vocab.mask)
            sequence = torch.cat([prompts, body], 1)
            want = cpu.decode(reference_memory, sequence, index, codec.vocab_slice())
            got = runner.decode(memory, sequence, index, codec.vocab_slice()).cpu()
            logits[task] = logit_difference(want, got)
        decoded = [
            compare_results(a, b, bin_px(mad.config, image.size[::-1]))
            for a, b, image in zip(reference, Pipeline(mad, runner)(requests), images, strict=True)
        ]
        out[name] = {
            "logits": logits,
            "decoded": decoded,
            "same_decoded": sum(d["same"] for d in decoded),
        }
        del runner, memory
        release()
    return out


def logit_difference(want: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """Reference and compared logits [S, L, V] -> their differences, the share of positions
    with the same argmax, and fp32's top-1 minus top-2 margin: the median over every position
    and over the positions whose argmax changed (None when none did)."""
    diff = (got - want).abs()
    flipped = got.argmax(-1) != want.argmax(-1)
    top2 = want.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": 1 - flipped.float().mean().item(),
        "margin_median": margin.median().item(),
        "flipped_margin_median": margin[flipped].median().item() if flipped.any() else None,
    }


def bin_px(config: ModelConfig, size: tuple[int, int]) -> float:
    """Pixels of the original image per coordinate bin: a near-tie between two devices'
    most likely bins moves a coordinate by one bin (less, read through a coordinate window)."""
    scale = min(config.image_size[0] / size[0], config.image_size[1] / size[1])
    return max(config.image_size) / config.num_bins / scale


def pair_detections(a: Detections, b: Detections) -> list[tuple[int, int]] | None:
    """Detections of one image from two runs -> pairs (i in a, j in b) of the same class,
    the pairing with the least sum of each pair's largest coordinate difference, or None when
    the two runs found different classes or counts. Detections are sorted by score, so two
    near-tied scores can swap places: pairs, not positions, say whether the runs found the
    same objects. (The sum, not the largest pair's difference, is minimised: objects of one
    class crowded within a bin of each other could pair so that one pair misses a tolerance
    another pairing meets.)"""
    from scipy.optimize import linear_sum_assignment

    if len(a) != len(b) or not torch.equal(a.labels.sort().values, b.labels.sort().values):
        return None
    cost = torch.cdist(a.boxes.double(), b.boxes.double(), p=float("inf"))
    cost[a.labels[:, None] != b.labels[None, :]] = float("inf")
    rows, cols = linear_sum_assignment(cost.numpy())
    return list(zip(rows.tolist(), cols.tolist(), strict=True))


def paired(
    a: list[torch.Tensor | None] | None,
    b: list[torch.Tensor | None] | None,
    pairs: list[tuple[int, int]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-detection outputs (masks, keypoints) of paired detections, where both have one."""
    out = []
    for i, j in pairs:
        x = a[i] if a is not None and i < len(a) else None
        y = b[j] if b is not None and j < len(b) else None
        if x is not None and y is not None:
            out.append((x, y))
    return out


def compare_results(a: Result, b: Result, tolerance_px: float) -> dict[str, Any]:
    """Two pipeline results of one image -> what differs (coordinates within tolerance_px),
    each detection compared with its pair in the other result (pair_detections)."""
    da, db = a.detections, b.detections
    if da is None or db is None:
        raise ValueError("parity compares results that include detection")
    found = pair_detections(da, db)
    pairs = found or []
    box_diff = max(((da.boxes[i] - db.boxes[j]).abs().max().item() for i, j in pairs), default=0.0)

    def full(masks: list[BoxMask | None] | None) -> list[torch.Tensor | None] | None:
        return None if masks is None else [None if m is None else m.full() for m in masks]

    masks = paired(full(a.masks), full(b.masks), pairs)
    mask_diff = max(
        (torch.ne(x > 0.5, y > 0.5).float().mean().item() for x, y in masks), default=0.0
    )
    points = paired(a.keypoints, b.keypoints, pairs)
    kp_diff = max(((x[:, :2] - y[:, :2]).abs().max().item() for x, y in points), default=0.0)
    tolerance_px += 1e-4  # the bin size itself, up to rounding
    same = (
        found is not None
        and box_diff <= tolerance_px
        and mask_diff <= 0.005
        and kp_diff <= tolerance_px
        and a.caption == b.caption
    )
    return {
        "same": same,
        "detections": [len(da), len(db)],
        "labels_equal": found is not None,
        "box_max_px": box_diff,
        "mask_pixels": mask_diff,
        "keypoint_max_px": kp_diff,
        "captions": [a.caption, b.caption],
    }


# --- the run --------------------------------------------------------------------------------
