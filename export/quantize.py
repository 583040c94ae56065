"""int8 exports: an fp32 export's graphs quantised with ONNX Runtime's quantisation tools.

encoder.onnx      static (QDQ, per-channel int8 weights, uint8 activations), calibrated on
                  images of the synthetic world (`model.data.synth`) letterboxed as the
                  pipeline letterboxes: the backbone's convolutions are where int8 pays, and
                  their activation ranges are fixed ahead of time.
decoder_*.onnx    dynamic (per-channel int8 weights of MatMul/Gemm, activations quantised at
                  run time): the decoder is linear layers over a few tokens, whose ranges
                  depend on the request.

The int8 export is then checked against the fp32 one it came from, into the manifest:
`compare_exports`, the largest logit difference and how often both decode the same token
(the argmax per position) per decoder on the same inputs; `compare_decoded`, how often the
whole pipeline decodes the same detections and captions on synthetic images.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.data.synth import render_synthetic_image
from model.data.synth.common import image_rng
from model.preprocess import prepare_batch
from model.startup import StartupError
from runtime.manifest import read_manifest, write_manifest

QUANTIZATIONS = ("int8",)  # what `mad export --quantize` offers
CALIBRATION_IMAGES = 32
# Below this share of tokens decoded alike (argmax of int8 vs fp32 logits over the check's
# inputs) the export is refused: int8 would change what the model answers. (The bundled
# model: 0.94, with AP and BLEU-4 on held-out images within about a point: docs/export.md.)
MIN_TOKEN_AGREEMENT = 0.9
CHECK_IMAGES = 8  # synthetic images (not the calibration ones) both exports decode
MATCH_IOU = 0.5  # detections of the two exports match at this IoU, same class


def quantize_export(
    source: str | Path, out: str | Path, calibration_images: int = CALIBRATION_IMAGES
) -> dict[str, Any]:
    """Quantise the fp32 export in `source` into `out` (a new export directory, int8) and
    return its manifest. Raises StartupError when int8 changes the decoded tokens too much."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out = Path(source), Path(out)
    manifest = read_manifest(source)
    if manifest["precision"] != "fp32":
        raise StartupError(f"{source} is a {manifest['precision']} export; quantise an fp32 one")
    out.mkdir(parents=True, exist_ok=True)
    for name in (manifest["config_file"], manifest.get("tokenizer_file")):
        if name:
            shutil.copyfile(source / name, out / name)
    graphs = manifest["graphs"]
    with tempfile.TemporaryDirectory(prefix="mad-quant-") as tmp:

        def prepared(file: str) -> Path:
            """Shape inference + ORT's graph fusions first, as the quantiser expects."""
            path = Path(tmp) / file
            quant_pre_process(str(source / file), str(path), skip_symbolic_shape=True)
            return path

        encoder = graphs["encoder"]["file"]
        quantize_encoder(prepared(encoder), out / encoder, manifest, calibration_images)
        for graph in decoder_files(graphs):
            quantize_dynamic(
                prepared(graph),
                out / graph,
                per_channel=True,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"],
            )
    quantized = {
        **manifest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": "int8",
        "quantization": {
            "encoder": {
                "method": "static",
                "format": "QDQ",
                "weights": "int8, per channel",
                "activations": "uint8",
                "calibration": f"{calibration_images} synthetic images, min-max",
            },
            "decoders": {
                "method": "dynamic",
                "weights": "int8, per channel",
                "ops": ["MatMul", "Gemm"],
            },
            "source_created": manifest["created"],  # which fp32 export it was made from
        },
    }
    write_manifest(out, quantized)  # the runner of the decoded comparison reads it
    check = compare_exports(source, out, quantized)
    check["decoded"] = compare_decoded(source, out, CHECK_IMAGES)
    quantized["quantization"]["check"] = check
    agreement = quantized["quantization"]["check"]["token_agreement"]
    if agreement < MIN_TOKEN_AGREEMENT:
        raise StartupError(
            f"int8 decodes {agreement:.1%} of the tokens as fp32 does (at least "
            f"{MIN_TOKEN_AGREEMENT:.0%} needed); serve the fp32 export"
        )
    write_manifest(out, quantized)
    return quantized


def decoder_files(graphs: dict[str, Any]) -> Iterator[str]:
    for graph in graphs["decoders"].values():
        yield graph["file"]
        if "single_image" in graph:
            yield graph["single_image"]["file"]


def synthetic_images(count: int, seed: int) -> Iterator[Image.Image]:
    """`count` images of the synthetic worlds, alternating v2 and v1, seeded."""
    for i in range(count):
        pixels, _, _ = render_synthetic_image(
            image_rng(seed, "calibration", i), "v1" if i % 2 else "v2"
        )
        yield Image.fromarray(pixels)


def calibration_batches(
    manifest: dict[str, Any], count: int, seed: int = 7
) -> Iterator[dict[str, np.ndarray]]:
    """One encoder feed per synthetic image, letterboxed onto the model's canvas as the
    pipeline does."""
    canvas = tuple(manifest["model"]["image_size"])
    for image in synthetic_images(count, seed):
        batch = prepare_batch([image], canvas, torch.device("cpu"))
        yield {"images": batch.images.numpy(), "pad_mask": batch.pad_mask.numpy()}


def quantize_encoder(source: Path, out: Path, manifest: dict[str, Any], count: int) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = calibration_batches(manifest, count)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(source),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        # Only the convolutions: the encoder's attention and layer norms lose accuracy in
        # int8 and gain little at this size.
        op_types_to_quantize=["Conv"],
    )


def compare_exports(reference: Path, candidate: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """int8 vs fp32 on the same inputs: calibration-world images (not the calibration ones)
    through each encoder, then every decoder graph on the same random token sequences.
    -> max |logit difference|, and the share of positions whose argmax token agrees."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3

    def session(directory: Path, file: str) -> ort.InferenceSession:
        return ort.InferenceSession(
            str(directory / file), options, providers=["CPUExecutionProvider"]
        )

    graphs = manifest["graphs"]
    feeds = list(calibration_batches(manifest, 4, seed=11))
    images = {k: np.concatenate([f[k] for f in feeds]) for k in ("images", "pad_mask")}
    memories = [
        session(directory, graphs["encoder"]["file"]).run(None, images)
        for directory in (reference, candidate)
    ]
    generator = torch.Generator().manual_seed(0)
    worst, agree, total = 0.0, 0, 0
    per_task: dict[str, float] = {}
    for task, graph in graphs["decoders"].items():
        start, stop = graph["vocab_slice"]
        tokens = torch.randint(start, stop, (8, graph["seq_len"]), generator=generator).numpy()
        index = np.arange(8) % len(feeds)
        logits = []
        for directory, (keys, values, mask) in zip((reference, candidate), memories, strict=True):
            decoder = session(directory, graph["file"])
            feed = {"keys": keys, "values": values, "mask": mask, "tokens": tokens}
            feed["image_index"] = index
            names = {i.name for i in decoder.get_inputs()}
            (out,) = decoder.run(None, {k: v for k, v in feed.items() if k in names})
            logits.append(out)
        worst = max(worst, float(np.abs(logits[0] - logits[1]).max()))
        same = logits[0].argmax(-1) == logits[1].argmax(-1)
        per_task[task] = float(same.mean())
        agree, total = agree + int(same.sum()), total + same.size
    return {
        "max_abs_logit_diff": worst,
        "token_agreement": agree / total,
        "token_agreement_by_task": per_task,
        "images": len(feeds),
        "sequences": 8,
        "reference": "the fp32 export, ONNX Runtime CPU",
    }


def compare_decoded(reference: Path, candidate: Path, count: int) -> dict[str, Any]:
    """The full pipeline (every task, default refinement) on `count` synthetic images with
    each export: how often int8 decodes what fp32 decodes. -> detections: matched pairs
    (same class, IoU >= MATCH_IOU) over the larger count, summed over images (1.0 when
    neither finds any); captions: the share that are the same text."""
    from torchvision.ops import box_iou

    from model.inference_io import Request
    from model.pipeline import Pipeline
    from runtime.backends import load_bundle
    from runtime.onnx_runner import OnnxRunner

    images = list(synthetic_images(count, seed=11))
    results = []
    for directory in (reference, candidate):
        mad = load_bundle(directory)
        pipeline = Pipeline(mad, OnnxRunner(directory))
        tasks = tuple(mad.config.tasks)
        results.append(pipeline([Request(image, tasks) for image in images]))
    matched = larger = same_captions = captions = 0
    for fp32, int8 in zip(*results, strict=True):
        if fp32.detections is not None and int8.detections is not None:
            a, b = fp32.detections, int8.detections
            larger += max(len(a), len(b))
            if len(a) and len(b):
                iou = box_iou(a.boxes, b.boxes)
                iou[a.labels[:, None] != b.labels[None, :]] = 0
                taken: set[int] = set()
                for row in iou:  # greedy, in fp32's score order
                    candidates = [(float(v), j) for j, v in enumerate(row) if j not in taken]
                    best = max(candidates, default=(0.0, -1))
                    if best[0] >= MATCH_IOU:
                        taken.add(best[1])
                        matched += 1
        if fp32.caption is not None:
            captions += 1
            same_captions += fp32.caption == int8.caption
    return {
        "images": count,
        "detection_agreement": matched / larger if larger else None,  # None: none to compare
        "detections_fp32": sum(len(r.detections or []) for r in results[0]),
        "caption_agreement": same_captions / captions if captions else None,
    }
