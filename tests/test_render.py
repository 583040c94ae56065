"""Drawings people can read (`mad predict --render`; the demo page draws the same way): text
scaled to the image, labels inside it and off each other, the caption on a band below it.
Checked on a crowded scene at 1800 px and at 215 px, by the pixels drawn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFont

from service.render import BAND, draw_prediction, font, text_size
from service.schemas import Detection, ImageSize, ModelRef, PredictResponse

CAPTION = "a red circle to the left of a blue square above a person next to three green stars"
NAMES = ["circle", "square", "triangle", "star", "hexagon", "person", "a", "b", "c", "d"]


def crowded(width: int, height: int, caption: str | None = CAPTION) -> PredictResponse:
    """Ten detections of ten classes (ten label colours), their boxes piled up in one
    corner of the image, so the first choice of place is the same for every label."""
    scale = width / 1800
    detections = [
        Detection(
            label=NAMES[i],
            category_id=i,
            score=0.95 - i * 0.05,
            box=[(40 + 12 * i) * scale, (30 + 9 * i) * scale, 700 * scale, 600 * scale],
        )
        for i in range(10)
    ]
    return PredictResponse(
        model=ModelRef(name="test", version="0", backend="torch"),
        image=ImageSize(width=width, height=height),
        tasks=["detection", "caption"],
        detections=detections,
        caption=caption,
        decoder_passes={"detection": 1, "caption": 1},
        refine_steps_applied={"detection": 0, "caption": 0},
        timings_ms={},
    )


def scene(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(90, 170, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", [(1800, 1200), (215, 160)])
def test_labels_and_caption_are_readable(width, height):
    image = scene(width, height)
    drawing = draw_prediction(image, crowded(width, height), [])
    drawn = np.asarray(drawing.image)

    # The caption is on a band added below the image, not painted over it: the image area
    # is exactly what is drawn without a caption; the band holds light text on dark.
    without = np.asarray(draw_prediction(image, crowded(width, height, None), []).image)
    assert drawn.shape[1] == width and drawn.shape[0] > height
    assert drawing.caption_band == (0, height, width, drawn.shape[0])
    assert np.array_equal(drawn[:height], without)
    band = drawn[height:]
    assert (band == BAND).all(axis=-1).mean() > 0.5 and (band > 200).all(axis=-1).any()
    # Wrapped: at 215 px the caption cannot fit one line, so the band holds several.
    lines = drawn.shape[0] - height
    assert lines > 2.5 * text_size(width, height) if width < 400 else lines > 0

    labels = drawing.labels
    assert len(labels) == 10
    for label in labels:  # inside the image
        x0, y0, x1, y1 = label.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, label
    for a, b in itertools.combinations(labels, 2):  # off each other (as placed)
        assert not (
            a.box[0] < b.box[2]
            and b.box[0] < a.box[2]
            and a.box[1] < b.box[3]
            and b.box[1] < a.box[3]
        ), (a, b)
    # By the pixels: no label's area shows another label's colour, and its corners show
    # its own (so no later label covered part of it).
    colours = {label.rgb for label in labels}
    for label in labels:
        x0, y0, x1, y1 = label.box
        area = drawn[y0:y1, x0:x1].reshape(-1, 3)
        for other in colours - {label.rgb}:
            assert not (area == other).all(axis=-1).any(), (label, other)
        for x, y in ((x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)):
            assert tuple(drawn[y, x]) == label.rgb, (label, x, y)
        # Dark text on the label.
        assert (area.max(axis=-1) < 60).any(), label


def test_text_scales_with_the_image():
    big = draw_prediction(scene(1800, 1200), crowded(1800, 1200), []).labels[0].box
    small = draw_prediction(scene(215, 160), crowded(215, 160), []).labels[0].box
    assert big[3] - big[1] > 2.5 * (small[3] - small[1])
    assert text_size(215, 160) >= 11 and text_size(1800, 1200) == 40


def test_a_truetype_font_is_used():
    assert isinstance(font(20), ImageFont.FreeTypeFont)
    assert font(20).size == 20


def test_a_label_gives_the_masks_score_where_there_is_one():
    response = crowded(400, 300, caption=None)
    response.detections[0].mask_score = 0.5749
    labels = {label.text for label in draw_prediction(scene(400, 300), response, []).labels}
    assert f"{NAMES[0]} 0.95, mask 0.57" in labels
    assert f"{NAMES[1]} 0.90" in labels  # no mask, no mask score
