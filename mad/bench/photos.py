"""What a model says about natural photos it was never trained on (scikit-image's sample
photos): detections per photo at the default threshold, boxes of zero area, and whether the
caption is a grammatical sentence: for a model of the synthetic world (its six classes), a
sentence of the world's caption language with agreeing articles and numbers
(model/data/synth/language.py); for another model, agreement alone.

    python -m mad.bench.photos [--checkpoint checkpoints/mad-tiny] [--json out.json]

A model trained on synthetic shapes should find (almost) nothing in a photo; many confident
"person" boxes are the failure this report exists to catch. Needs scikit-image (`pip install
-e '.[dev]'`), whose wheel ships these photos.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from PIL import Image

from model.checkpoint import MAD, load_checkpoint
from model.data.synth.grammar import grammar_errors
from model.data.synth.language import is_world_sentence, sentence_check
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner

# The sample photos that are RGB or grayscale pictures of real scenes and objects (not
# microscopy, test patterns, textures, logos or scanned text).
PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "clock_motion.png",
)


def sample_photos() -> dict[str, Image.Image]:
    """The photos' files as the scikit-image wheel ships them (nothing is downloaded)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return {name.split(".")[0]: Image.open(folder / name).convert("RGB") for name in PHOTOS}


NOT_A_SENTENCE = "not a sentence of the world's captions"


def caption_errors(mad: MAD, caption: str) -> list[str]:
    """What keeps `caption` from being a grammatical sentence ([] when it is one)."""
    if "caption" not in mad.config.tasks:
        return []
    errors = grammar_errors(caption)
    if sentence_check(mad.config.class_names) and not is_world_sentence(caption):
        errors.append(NOT_A_SENTENCE)
    return errors


def photo_report(checkpoint: Path, threshold: float = 0.5) -> dict[str, Any]:
    """-> one row per photo ("photos") and the summary figures beside it."""
    mad, _ = load_checkpoint(checkpoint)
    pipeline = Pipeline(mad, EagerRunner(mad.required_network()))
    rows: list[dict[str, Any]] = []
    for name, image in sample_photos().items():
        request = Request(image, tuple(mad.config.tasks), score_threshold=threshold)
        result = pipeline([request])[0]
        detections = result.required_detections()
        boxes = detections.boxes
        zero_area = int(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).sum())
        caption = result.caption or ""
        rows.append(
            {
                "photo": name,
                "size": f"{image.width}x{image.height}",
                "detections": len(detections),
                "top_scores": [round(float(s), 2) for s in detections.scores[:3]],
                "labels": sorted({mad.config.class_names[int(i)] for i in detections.labels}),
                "zero_area_boxes": zero_area,
                "caption": caption,
                "grammar_errors": caption_errors(mad, caption),
            }
        )
    summary: dict[str, Any] = {
        "photo_count": len(rows),
        "median_detections": statistics.median(r["detections"] for r in rows),
        "zero_area_boxes": sum(r["zero_area_boxes"] for r in rows),
        "grammatical_captions": sum(1 for r in rows if not r["grammar_errors"]),
    }
    return {
        "checkpoint": str(checkpoint),
        "threshold": threshold,
        "photos": rows,
        **summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/mad-tiny"))
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    report = photo_report(args.checkpoint, args.threshold)
    print("| photo | size | detections | top scores | classes | zero-area | caption |")
    print("|---|---|---|---|---|---|---|")
    for r in report["photos"]:
        flag = f" ({'; '.join(r['grammar_errors'])})" if r["grammar_errors"] else ""
        print(
            f"| {r['photo']} | {r['size']} | {r['detections']} | {r['top_scores']} | "
            f"{', '.join(r['labels'])} | {r['zero_area_boxes']} | {r['caption']}{flag} |"
        )
    s = report
    print(
        f"\n{s['photo_count']} photos: median {s['median_detections']} detections at score >= "
        f"{args.threshold}, {s['zero_area_boxes']} zero-area boxes, "
        f"{s['grammatical_captions']}/{s['photo_count']} grammatical captions"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
