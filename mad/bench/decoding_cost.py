"""What a checkpoint's decoding options cost: one all-task request, timed in process, with the
options as the checkpoint sets them, then with each of these turned off in turn: the zoomed
crops (every zoom option), the mirror image for masks and keypoints (`segmentation_flip` and
`keypoints_flip`: detection alone reads it), every flip option (one view), and the caption
candidates (one, refined as many steps as its schedule had before the candidates): the last
row is the reference's decoding of these.

    python -m mad.bench.decoding_cost [--checkpoint checkpoints/mad-tiny] [--repeats 7]

The configurations alternate, `--rounds` times `--repeats` requests each, on one synthetic
image; it prints each one's median. A ratio holds on the machine it ran on; absolute times
only on the machine they were measured on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mad.bench.workload import BUNDLED_CHECKPOINT, synthetic_image
from model.checkpoint import load_checkpoint
from model.codecs import flip_options, zoom_options
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner


@dataclass(frozen=True)
class Variant:
    """One way to decode: the config options it changes (the rest: the checkpoint's)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    caption_steps: int | None = None  # None: the checkpoint's schedule


def variants(one_candidate_steps: int) -> list[Variant]:
    no_crops: dict[str, Any] = dict.fromkeys(zoom_options(), False)
    one_view = {**no_crops, **dict.fromkeys(flip_options(), False)}
    return [
        Variant("as the checkpoint sets"),
        Variant("no zoomed crops", no_crops),
        Variant(
            "no crops, mirror image for detection alone",
            {**no_crops, "segmentation_flip": False, "keypoints_flip": False},
        ),
        Variant("no crops, one view", one_view),
        Variant(
            "no crops, one view, one caption candidate",
            {**one_view, "caption_candidates": 1},
            one_candidate_steps,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_CHECKPOINT)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--one-candidate-steps",
        type=int,
        default=8,
        help="Caption steps of the one-candidate row (the bundled model's before: 8).",
    )
    args = parser.parse_args(argv)
    mad, _ = load_checkpoint(args.checkpoint)
    tasks = tuple(mad.config.tasks)
    image = synthetic_image(mad.config.image_size, seed=7)
    changed = {option for variant in variants(0) for option in variant.options}
    own = {option: getattr(mad.config, option) for option in changed}
    pipeline = Pipeline(mad, EagerRunner(mad.required_network()))  # reads mad.config per call
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for variant in variants(args.one_candidate_steps):
            for option, value in {**own, **variant.options}.items():
                setattr(mad.config, option, value)
            steps = {} if variant.caption_steps is None else {"caption": variant.caption_steps}
            request = Request(image, tasks, steps)
            pipeline([request])  # warm
            for _ in range(args.repeats):
                start = time.perf_counter()
                pipeline([request])
                times.setdefault(variant.name, []).append(time.perf_counter() - start)
    print(f"{args.checkpoint}: one {image.width}x{image.height} image, tasks {', '.join(tasks)}")
    for name, seconds in times.items():
        print(
            f"{name:<44} median {1000 * statistics.median(seconds):6.1f} ms ({len(seconds)} runs)"
        )


if __name__ == "__main__":
    main()
