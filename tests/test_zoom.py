"""Zoomed crops around each detection (model.zoom): boxes re-read on them (`detection_zoom`),
masks and keypoints decoded on them (`segmentation_zoom`, `keypoints_zoom`)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.codecs.base import DecodeContext
from model.config import ModelConfig
from model.decoding import masked_decode
from model.inference_io import Request
from model.pipeline import Pipeline
from model.preprocess import decode_context, prepare_batch
from model.zoom import Zoom, mirror_in, window_context, zoom_window
from tests.helpers import synthetic_images
from tests.test_mirror_views import assert_same_outputs, with_options
from tests.test_refinement import CountingRunner

TASKS = ("detection", "segmentation", "keypoints")


def test_a_small_box_gets_a_crop_of_the_canvas_shape_around_it():
    # A 20 x 10 box (x0, y0, x1, y1) in a 200 x 300 (H, W) image, on a 96 x 96 canvas.
    window = zoom_window(
        torch.tensor([140.0, 90.0, 160.0, 100.0]), (200, 300), (96, 96), Zoom(4, 3)
    )
    assert window is not None
    left, top, right, bottom = window
    # The crop spans 3 x the box's longer side, at most 4 x enlarged over the whole image's
    # view (300 / 4 = 75 pixels): 75 wins over 60.
    assert (right - left, bottom - top) == (75, 75)
    assert left <= 140 and right >= 160 and top <= 90 and bottom >= 100
    assert abs((left + right) / 2 - 150) <= 1 and abs((top + bottom) / 2 - 95) <= 1
    # Unbounded enlargement: 3 x 20 pixels.
    window = zoom_window(
        torch.tensor([140.0, 90.0, 160.0, 100.0]), (200, 300), (96, 96), Zoom(99, 3)
    )
    assert window is not None and window[2] - window[0] == 60


def test_a_crop_stays_inside_the_image_and_a_large_box_reads_the_whole_image():
    # At the corner: shifted inside, not cut.
    window = zoom_window(torch.tensor([0.0, 190.0, 10.0, 200.0]), (200, 300), (96, 96), Zoom(4, 3))
    assert window == (0, 125, 75, 200)
    # A box whose crop would not enlarge it reads the whole image.
    assert (
        zoom_window(torch.tensor([50.0, 20.0, 250.0, 180.0]), (200, 300), (96, 96), Zoom(4, 3))
        is None
    )
    # A crop taller than the image is cut where the image ends: a landscape canvas's crop of
    # a wide, low image.
    window = zoom_window(torch.tensor([100.0, 10.0, 160.0, 50.0]), (60, 400), (96, 128), Zoom(4, 3))
    assert window is not None and window[1] == 0 and window[3] == 60
    # A portrait image on a landscape canvas runs on the transposed canvas: its crops too.
    window = zoom_window(
        torch.tensor([40.0, 100.0, 50.0, 120.0]), (300, 200), (96, 128), Zoom(8, 3)
    )
    assert window is not None
    assert window[3] - window[1] > window[2] - window[0]


def test_a_crop_context_maps_the_crop_canvas_to_the_image_pixels():
    window = (40, 30, 115, 105)  # 75 x 75 pixels of a 200 x 300 image
    context = window_context(window, (200, 300), (96, 96))
    assert context.image_size == (75, 75) and context.result_size == (200, 300)
    box = torch.tensor([50.0, 40.0, 70.0, 60.0])
    torch.testing.assert_close(context.to_pixels(context.to_canvas(box)), box)
    # Points are clipped to the crop the model saw, then placed on the image.
    corner = context.to_pixels(torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(corner, torch.tensor([115.0, 105.0]))
    # Mirrored within the crop: x -> left + right - x, the corners swapped.
    torch.testing.assert_close(mirror_in(context, box), torch.tensor([85.0, 40.0, 105.0, 60.0]))
    whole = DecodeContext((96, 96), 0.32, (200, 300))
    torch.testing.assert_close(mirror_in(whole, box), torch.tensor([230.0, 40.0, 250.0, 60.0]))


@pytest.mark.parametrize("option", ["zoom", "zoom_context"])
def test_zoom_options_are_checked(option):
    with pytest.raises(ValueError, match=f"{option} must be at least 1"):
        ModelConfig(**{option: 0.5})


def hand_decoded(model, runner, image, result, task, mirror):
    """What the pipeline should answer for `task`: each detection's sequence decoded by hand
    on its crop (and its crop's mirror, fused), alone. -> outputs, crops encoded."""
    codec, canvas = model.codecs[task], model.config.image_size
    detections = result.detections
    zoom = Zoom(model.config.zoom, model.config.zoom_context)
    schedule = model.config.schedules.get(task, [])
    image_context = decode_context(image, canvas)
    outputs, crops = [], 0
    for j in codec.applies_to(detections.labels).nonzero().flatten().tolist():
        box, tokens = detections.boxes[j], detections.tokens[j].clone()
        window = zoom_window(box, image_context.image_size, canvas, zoom)
        views = [image] if window is None else [image.crop(window)]
        context = (
            image_context
            if window is None
            else window_context(window, image_context.image_size, canvas)
        )
        if window is not None:
            crops += 1
            tokens[:4] = model.vocab.quantize(context.to_canvas(box).clamp(0, 1))
        prompts = [codec.prompts(tokens[None])]
        if mirror:
            views.append(views[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT))
            flipped = tokens.clone()
            flipped[:4] = model.vocab.quantize(
                context.to_canvas(mirror_in(context, box)).clamp(0, 1)
            )
            prompts.append(codec.prompts(flipped[None]))
        logits = []
        for view, prompt in zip(views, prompts, strict=True):
            batch = prepare_batch([view], canvas)
            memory = runner.encode(batch.images, batch.pad_mask)
            logits.append(
                masked_decode(runner, memory, codec, prompt, torch.zeros(1).long(), schedule)
            )
        fused = logits[0] if not mirror else codec.fuse_mirror(logits[0], logits[1], [context])
        boxes = {"boxes": [box]} if task == "segmentation" else {}
        outputs.append((j, codec.decode(fused, None, [context], **boxes)[0]))
    return outputs, crops


@pytest.mark.parametrize("mirror", [False, True])
def test_each_sequence_decodes_on_its_own_crop(micro_model, mirror):
    options = {"segmentation_zoom": True, "keypoints_zoom": True, "zoom_context": 2.0}
    if mirror:
        options |= {"segmentation_flip": True, "keypoints_flip": True}
    model = with_options(micro_model, **options)
    runner = CountingRunner(micro_model.network)
    first, second = synthetic_images(2, seed=3)
    images = [first, second.resize((second.width * 3 // 4, second.height // 2))]
    results = Pipeline(model, runner)(
        [Request(image, TASKS, score_threshold=0.0) for image in images]
    )
    checked = set()
    for image, result in zip(images, results, strict=True):
        for task in ("segmentation", "keypoints"):
            expected, crops = hand_decoded(model, runner, image, result, task, mirror)
            if crops:
                checked.add(task)
            for j, want in expected:
                got = result.outputs[task][j]
                if task == "segmentation":
                    assert (got.top, got.left) == (want.top, want.left)
                    assert torch.equal(got.crop, want.crop)
                else:
                    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert checked == {"segmentation", "keypoints"}


def test_a_crop_is_encoded_once_per_batch_and_observed_as_crop_work(micro_model):
    # A person's mask and skeleton read one crop.
    model = with_options(micro_model, segmentation_zoom=True, keypoints_zoom=True)
    runner = CountingRunner(micro_model.network)
    seen = []
    pipeline = Pipeline(model, runner, observer=lambda *call: seen.append(call[:2]))
    image = synthetic_images(1, seed=5)[0]
    result = pipeline([Request(image, TASKS, score_threshold=0.0)])[0]
    detections = result.detections
    canvas, size = model.config.image_size, (image.height, image.width)
    windows = {zoom_window(box, size, canvas, Zoom(3.0, 3.0)) for box in detections.boxes}
    windows.discard(None)
    assert windows and runner.encoded == 1 + len(windows)
    # The image's encoder time as such; the crops' once for the batch, per image reading them.
    assert [call for call in seen if call[0] == "encode"] == [("encode", 1)]
    assert seen.count(("crops", 1)) == 1
    # Keypoints alone read the persons' crops only.
    runner.encoded = 0
    seen.clear()
    pipeline([Request(image, ("caption",)), Request(image, ("detection",))])
    assert runner.encoded == 2 and ("crops", 1) not in seen  # neither reads crops here
    runner.encoded = 0
    pipeline([Request(image, ("detection", "keypoints"), score_threshold=0.0)])
    persons = detections.boxes[model.codecs["keypoints"].applies_to(detections.labels)]
    person_windows = {zoom_window(box, size, canvas, Zoom(3.0, 3.0)) for box in persons} - {None}
    assert runner.encoded == 1 + len(person_windows)


class CallRecorder(CountingRunner):
    """Records the images of each encoder call."""

    def __init__(self, network):
        super().__init__(network)
        self.calls: list[int] = []

    def encode(self, images, pad_mask):
        self.calls.append(len(images))
        return super().encode(images, pad_mask)


def test_crops_are_encoded_a_chunk_at_a_time_with_the_same_answers(micro_model, monkeypatch):
    """A request's many crops are encoded at most max(the batch's images, CROP_CHUNK) per
    call (bounded accelerator memory), and the answers equal those of one call for all."""
    model = with_options(micro_model, segmentation_zoom=True, keypoints_zoom=True)
    image = synthetic_images(1, seed=5)[0]
    request = Request(image, TASKS, score_threshold=0.0)
    runner = CallRecorder(micro_model.network)
    monkeypatch.setattr("model.crops.CROP_CHUNK", 1000)
    whole = Pipeline(model, runner)([request])[0]
    crops = runner.calls[1:]
    assert len(crops) == 1 and crops[0] >= 2  # the image, then its crops in one call
    runner.calls.clear()
    monkeypatch.setattr("model.crops.CROP_CHUNK", 1)  # the batch's one image: one at a time
    chunked = Pipeline(model, runner)([request])[0]
    assert runner.calls == [1] * (1 + crops[0])
    torch.testing.assert_close(chunked.detections.boxes, whole.detections.boxes)
    for task in ("segmentation", "keypoints"):
        assert_same_outputs(task, chunked.outputs[task], whole.outputs[task])


def test_a_zoomed_request_answers_the_same_beside_batch_mates(micro_model):
    model = with_options(
        micro_model, zoom=4.0, detection_zoom=True, segmentation_zoom=True, keypoints_zoom=True
    )
    pipeline = Pipeline(model, CountingRunner(micro_model.network))
    images = synthetic_images(3, seed=6)
    together = pipeline([Request(image, TASKS, score_threshold=0.0) for image in images])
    alone = pipeline([Request(images[1], TASKS, score_threshold=0.0)])[0]
    assert any(mask is not None for mask in alone.outputs["segmentation"])
    for task in ("segmentation", "keypoints"):
        assert_same_outputs(task, together[1].outputs[task], alone.outputs[task])


def test_a_box_is_re_read_as_its_crop_s_best_overlapping_box_of_its_class(micro_model):
    codec = micro_model.codecs["detection"]
    context = DecodeContext((96, 96), 0.32, (200, 300))
    kept = codec.detections(
        torch.tensor(
            [[10.0, 10.0, 50.0, 50.0], [100.0, 100.0, 140.0, 150.0], [0.0, 0.0, 9.0, 9.0]]
        ),
        torch.tensor([0.9, 0.8, 0.7]),
        torch.tensor([1, 2, 1]),
        context,
    )
    on_first = codec.detections(
        torch.tensor(
            [[12.0, 11.0, 52.0, 49.0], [11.0, 10.0, 50.0, 50.0], [30.0, 30.0, 90.0, 90.0]]
        ),
        torch.tensor([0.6, 0.9, 0.9]),
        torch.tensor([1, 3, 1]),  # the better overlap is of another class
        context,
    )
    on_second = codec.detections(  # of its class but too far
        torch.tensor([[125.0, 100.0, 170.0, 150.0]]),
        torch.tensor([0.9]),
        torch.tensor([2]),
        context,
    )
    reread = codec.reread(kept, [on_first, on_second, None], context)
    assert reread.boxes.tolist() == [[12.0, 11.0, 52.0, 49.0], *kept.boxes[1:].tolist()]
    assert torch.equal(reread.tokens[1:], kept.tokens[1:])  # untouched: the slot's tokens
    assert torch.equal(reread.tokens[0], on_first.tokens[0])
    assert torch.equal(reread.scores, kept.scores) and torch.equal(reread.labels, kept.labels)
    assert codec.reread(kept, [None, None, None], context) is kept


def test_detection_re_reads_each_kept_box_on_its_crop_before_it_prompts(micro_model):
    model = with_options(
        micro_model, detection_zoom=True, segmentation_zoom=True, zoom=4.0, zoom_context=1.5
    )
    runner = CountingRunner(micro_model.network)
    image = synthetic_images(1, seed=3)[0]
    request = Request(image, ("detection", "segmentation"), score_threshold=0.0)
    result = Pipeline(model, runner)([request])[0]
    first = Pipeline(micro_model, CountingRunner(micro_model.network))([request])[0].detections
    canvas, size = model.config.image_size, (image.height, image.width)
    zoom = Zoom(model.config.zoom, model.config.zoom_context)
    codec = model.codecs["detection"]
    on_crops = []
    for box in first.boxes:  # each box's crop, from the box detection first gave
        window = zoom_window(box, size, canvas, zoom)
        if window is None:
            on_crops.append(None)
            continue
        batch = prepare_batch([image.crop(window)], canvas)
        memory = runner.encode(batch.images, batch.pad_mask)
        prompts = codec.prompts(1)
        logits = masked_decode(runner, memory, codec, prompts, torch.zeros(1).long(), [])
        on_crops.append(codec.decode(logits, prompts, [window_context(window, size, canvas)])[0])
    assert any(c is not None for c in on_crops)
    reread = codec.reread(first, on_crops, decode_context(image, canvas))
    assert not torch.equal(reread.boxes, first.boxes)  # the crops moved some box
    want = reread.select(codec.after_nms(reread, request))  # boxes brought together: NMS again
    assert result.detections is not None
    torch.testing.assert_close(result.detections.boxes, want.boxes)
    assert result.passes["detection"] == 2  # its pass on the images, then on the crops
    # The masks are prompted by the re-read boxes, each on the crop the box first had: the
    # crops detection read, not encoded again.
    windows = {zoom_window(box, size, canvas, zoom) for box in first.boxes} - {None}
    assert runner.encoded == 1 + 2 * len(windows)  # the pipeline's, then the hand decoding's
    masks = [m for m in result.masks if m is not None]
    assert len(masks) == len(want)


def test_nms_runs_again_on_boxes_the_re_read_brought_together(micro_model):
    codec = micro_model.codecs["detection"]
    context = DecodeContext((96, 96), 0.32, (200, 300))
    boxes = torch.tensor(
        [[10.0, 10.0, 50.0, 50.0], [20.0, 20.0, 60.0, 60.0], [100.0] * 2 + [140.0] * 2]
    )
    kept = codec.detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1]), context)
    request = Request(Image.new("RGB", (300, 200)), ("detection",), nms_iou=0.7)
    assert codec.after_nms(kept, request).tolist() == [0, 1, 2]  # IoU 0.39: both kept
    # Both of the first two re-read on their crops as the same object.
    same = codec.detections(
        torch.tensor([[12.0, 12.0, 55.0, 55.0]]), torch.tensor([0.9]), torch.tensor([1]), context
    )
    reread = codec.reread(kept, [same, same, None], context)
    assert codec.after_nms(reread, request).tolist() == [0, 2]
