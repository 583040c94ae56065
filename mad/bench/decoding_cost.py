"""What a checkpoint's decoding options cost: one all-task request, timed in process, with the
options as the checkpoint sets them, with one detection view (`detection_flip` off), and
with that and one caption candidate refined as many steps as its schedule had before the
candidates (the reference's decoding of these two).

    python -m mad.bench.decoding_cost [--checkpoint checkpoints/mad-tiny] [--repeats 7]

The configurations alternate, `--rounds` times `--repeats` requests each, on one synthetic
image; it prints each one's median. A ratio holds on the machine it ran on; absolute times
only on the machine they were measured on.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from mad.bench.workload import BUNDLED_CHECKPOINT, synthetic_image
from model.checkpoint import load_checkpoint
from model.inference_io import Request
from model.pipeline import Pipeline
from model.runner import EagerRunner


@dataclass(frozen=True)
class Variant:
    """One way to decode: the options it changes (None: the checkpoint's)."""

    name: str
    detection_flip: bool | None = None
    caption_candidates: int | None = None
    caption_steps: int | None = None  # None: the checkpoint's schedule


def variants(one_candidate_steps: int) -> list[Variant]:
    return [
        Variant("as the checkpoint sets"),
        Variant("one detection view", detection_flip=False),
        Variant("one view, one caption candidate", False, 1, one_candidate_steps),
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
    own_flip, own_candidates = mad.config.detection_flip, mad.config.caption_candidates
    pipeline = Pipeline(mad, EagerRunner(mad.required_network()))  # reads mad.config per call
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for variant in variants(args.one_candidate_steps):
            flip, candidates = variant.detection_flip, variant.caption_candidates
            mad.config.detection_flip = own_flip if flip is None else flip
            mad.config.caption_candidates = own_candidates if candidates is None else candidates
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
            f"{name:<34} median {1000 * statistics.median(seconds):6.1f} ms ({len(seconds)} runs)"
        )


if __name__ == "__main__":
    main()
