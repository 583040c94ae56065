"""Masks and keypoints decoded on an image and its mirror image, the two views' probabilities
averaged (`segmentation_flip`, `keypoints_flip`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from model.checkpoint import MAD
from model.codecs.base import DecodeContext
from model.config import flip_pairs_from_names
from model.decoding import masked_decode
from model.inference_io import Request
from model.pipeline import Pipeline
from model.preprocess import decode_context, prepare_batch
from tests.helpers import Recorder, synthetic_images
from tests.test_refinement import CountingRunner

TASKS = ("detection", "segmentation", "keypoints")


def with_options(micro_model, **options) -> MAD:
    """The micro model with decoding options of its own (the codecs read its config)."""
    config = dataclasses.replace(micro_model.config, **options)
    codecs = {name: type(c)(config, c.vocab, c.tokenizer) for name, c in micro_model.codecs.items()}
    return dataclasses.replace(micro_model, config=config, codecs=codecs)


def one_hot_logits(indices: torch.Tensor, width: int) -> torch.Tensor:
    """[S, L] indices -> [S, L, width] logits all but certain of them."""
    return torch.nn.functional.one_hot(indices, width).float() * 30.0


# A letterboxed image: 150 x 100 pixels on a 96 x 96 canvas (scale 0.64, 64 canvas pixels
# high, so x's canvas span is 0.64 * 149 / 96 of it: not a whole number of bins).
CONTEXT = DecodeContext(canvas=(96, 96), scale=0.64, image_size=(100, 150))


def test_keypoints_read_on_the_mirror_image_land_on_the_mirrored_joint(micro_model):
    model = with_options(micro_model, coordinate_window=3)
    codec = model.codecs["keypoints"]
    K, n = model.config.num_keypoints, model.vocab.num_bins
    width = codec.vocab_slice()[1] - codec.vocab_slice()[0]
    # On the mirror image joint k sits at pixel x = 4 + 7k (y = 2k), visible for even k.
    x_pixels = 4.0 + 7.0 * torch.arange(K)
    bins = codec.vocab.quantize(
        CONTEXT.to_canvas(torch.stack([x_pixels, 2.0 * torch.arange(K)], 1))
    )
    bins -= codec.vocab_slice()[0]
    visibility = torch.where(torch.arange(K) % 2 == 0, n + 1, n + 2)  # local ids
    body = torch.stack([bins[:, 0], bins[:, 1], visibility], 1).flatten()[None]
    mirror_probs = one_hot_logits(body, width).softmax(-1)
    seen = codec.decode(mirror_probs.log(), None, [CONTEXT])[0]  # [K, 3] on the mirror image
    probs = codec.from_mirror(mirror_probs, [CONTEXT])
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 3 * K))  # still distributions
    read = codec.decode(probs.log(), None, [CONTEXT])[0]
    swap = list(range(K))
    for left, right in flip_pairs_from_names(model.config.keypoint_names):
        swap[left], swap[right] = right, left
    # Pixel x on the mirror image is W - 1 - x on the image (keypoints are pixel indices).
    torch.testing.assert_close(read[:, 0], 149.0 - seen[swap, 0], atol=1e-3, rtol=0)
    torch.testing.assert_close(read[:, 1:], seen[swap, 1:])


def test_a_mask_read_on_the_mirror_image_is_its_grid_mirrored(micro_model):
    codec = micro_model.codecs["segmentation"]
    m = micro_model.config.mask_size
    grid = torch.rand(2, m, m)
    probs = torch.stack([grid, 1 - grid], -1).reshape(2, m * m, 2)
    back = codec.from_mirror(probs, [CONTEXT, CONTEXT])
    assert torch.equal(back[..., 0].reshape(2, m, m), grid.flip(-1))
    # Fusing averages the two views' probabilities.
    fused = codec.fuse_mirror(probs.log(), probs.log(), [CONTEXT, CONTEXT]).exp()
    torch.testing.assert_close(fused, (probs + back) / 2)


def test_the_pipeline_averages_each_sequence_over_both_views(micro_model):
    model = with_options(micro_model, segmentation_flip=True, keypoints_flip=True)
    runner = CountingRunner(micro_model.network)
    # Two images of different sizes in one batch: letterboxed apart on one canvas.
    first, second = synthetic_images(2, seed=3)
    images = [first, second.resize((second.width * 3 // 4, second.height // 2))]
    requests = [Request(image, TASKS, score_threshold=0.0) for image in images]
    results = Pipeline(model, runner)(requests)
    # Both views decoded apart, here by hand: the mirror image's prompts are the boxes
    # mirrored in pixels (x -> W - x, the corners swapped).
    mirrors = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
    batch = prepare_batch([*images, *mirrors], model.config.image_size)
    memory = runner.encode(batch.images, batch.pad_mask)
    schedules = {task: model.config.schedules.get(task, []) for task in TASKS}
    checked = set()
    for i, (image, result) in enumerate(zip(images, results, strict=True)):
        detections = result.detections
        assert detections is not None and len(detections) > 0
        context = decode_context(image, model.config.image_size)
        x0, y0, x1, y1 = detections.boxes.unbind(1)
        flipped = torch.stack([image.width - x1, y0, image.width - x0, y1], 1)
        for task in ("segmentation", "keypoints"):  # each view refined apart, then fused
            codec = model.codecs[task]
            keep = codec.applies_to(detections.labels).nonzero().flatten()
            if not len(keep):
                continue
            checked.add(task)
            labels = model.vocab.class_token(detections.labels[keep])[:, None]
            mirrored = model.vocab.quantize(context.to_canvas(flipped[keep]).clamp(0, 1))
            views = []
            for tokens, image_index in (
                (detections.tokens[keep], i),  # the image's: its detections' own tokens
                (torch.cat([mirrored, labels], 1), len(images) + i),
            ):
                index = torch.full((len(keep),), image_index)
                prompts = codec.prompts(tokens)
                views.append(masked_decode(runner, memory, codec, prompts, index, schedules[task]))
            fused = codec.fuse_mirror(views[0], views[1], [context] * len(keep))
            boxes = {"boxes": list(detections.boxes[keep])} if task == "segmentation" else {}
            expected = codec.decode(fused, None, [context] * len(keep), **boxes)
            outputs = [result.outputs[task][j] for j in keep.tolist()]
            if task == "segmentation":
                for mask, want in zip(outputs, expected, strict=True):
                    assert torch.equal(mask.crop, want.crop)
                    assert mask.quality == pytest.approx(want.quality, abs=1e-5)
            else:
                torch.testing.assert_close(
                    torch.stack(outputs), torch.stack(expected), atol=1e-3, rtol=0
                )
            assert result.passes[task] == 1 + len(schedules[task])  # per view, counted once
    assert checked == {"segmentation", "keypoints"}


class MemoryCountingRunner(CountingRunner):
    """Also records how many images the memory of each decoder pass holds, per task."""

    def __init__(self, network, codecs):
        super().__init__(network)
        self.task_of = {codec.vocab_slice()[0]: name for name, codec in codecs.items()}
        self.memory_images: dict[str, list[int]] = {}

    def decode(self, memory, tokens, image_index, vocab_slice):
        task = self.task_of[vocab_slice[0]]
        self.memory_images.setdefault(task, []).append(memory.kv[0][0].shape[0])
        return super().decode(memory, tokens, image_index, vocab_slice)


def test_each_view_attends_over_its_own_images(micro_model):
    """Every pass attends over all the images of its memory: the images' passes get a
    memory without the mirror images, and the mirror images' passes one without the images.
    Here two requests of three read their mirror images."""
    model = with_options(micro_model, detection_flip=True, segmentation_flip=True)
    runner = MemoryCountingRunner(micro_model.network, model.codecs)
    images = synthetic_images(3, seed=8)
    tasks = [("detection", "segmentation"), ("detection", "segmentation"), ("caption",)]
    requests = [
        Request(image, asked, score_threshold=0.0)
        for image, asked in zip(images, tasks, strict=True)
    ]
    Pipeline(model, runner)(requests)
    assert runner.encoded == 5
    seen = runner.memory_images
    assert set(seen["caption"]) == {3}
    for task in ("detection", "segmentation"):  # each pass: the mirrors' (2), the images' (3)
        assert seen[task] == [2, 3] * (len(seen[task]) // 2) and seen[task], task


def test_views_are_encoded_once_decoded_as_pairs_and_timed_as_one(micro_model):
    model = with_options(micro_model, keypoints_flip=True)
    runner = CountingRunner(micro_model.network)
    seen = []
    pipeline = Pipeline(model, runner, observer=lambda *call: seen.append(call[:2]))
    images = synthetic_images(2, seed=4)
    requests = [Request(image, (*TASKS, "caption"), score_threshold=0.0) for image in images]
    results = pipeline(requests)
    assert runner.encoded == 4  # two images and their mirror images, in one batch
    assert ("encode", 4) in seen
    start = model.codecs["keypoints"].vocab_slice()[0]
    keypoint_rows = [rows for first, rows in runner.decodes if first == start]
    passes = 1 + len(model.config.schedules["keypoints"])
    assert keypoint_rows[0] > 0 and keypoint_rows == [keypoint_rows[0]] * 2 * passes  # 2 views
    assert seen.count(("keypoints", 2)) == passes  # each pass of the two views timed as one
    # Detection and masks read one view, and the caption is the one it gets without flips:
    # the later tasks decode on the images alone.
    plain = Pipeline(micro_model, CountingRunner(micro_model.network))(requests)
    for flipped, alone in zip(results, plain, strict=True):
        assert flipped.caption == alone.caption
        assert flipped.detections is not None and alone.detections is not None
        torch.testing.assert_close(flipped.detections.boxes, alone.detections.boxes)
        for mask, want in zip(flipped.masks, alone.masks, strict=True):
            assert (mask is None) == (want is None)
            assert mask is None or torch.equal(mask.crop, want.crop)
    # A request that runs no task reading mirror images encodes its own image alone.
    runner.encoded = 0
    pipeline([Request(images[0], ("detection", "segmentation"))])
    assert runner.encoded == 1


@pytest.mark.parametrize("option", ["segmentation_flip", "keypoints_flip"])
def test_a_request_answers_the_same_beside_batch_mates(micro_model, option):
    pipeline = Pipeline(
        with_options(micro_model, **{option: True}), CountingRunner(micro_model.network)
    )
    images = synthetic_images(3, seed=6)
    together = pipeline([Request(image, TASKS, score_threshold=0.0) for image in images])
    alone = pipeline([Request(images[1], TASKS, score_threshold=0.0)])[0]
    task = "segmentation" if option == "segmentation_flip" else "keypoints"
    pairs = zip(together[1].outputs[task], alone.outputs[task], strict=True)
    assert any(a is not None for a, _ in pairs)
    assert_same_outputs(task, together[1].outputs[task], alone.outputs[task])


def assert_same_outputs(task: str, got: list, want: list) -> None:
    """One image's masks or skeletons, detection by detection (None: none prompted)."""
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if task == "segmentation":
            assert (a.top, a.left) == (b.top, b.left) and torch.equal(a.crop, b.crop)
        else:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_a_streamed_request_gets_the_fused_skeletons_and_stops_when_both_views_do(micro_model):
    model = with_options(micro_model, keypoints_flip=True)
    pipeline = Pipeline(model, CountingRunner(micro_model.network))
    image = synthetic_images(1, seed=9)[0]
    tasks = ("detection", "keypoints")
    steps = {"keypoints": 2}
    plain = pipeline([Request(image, tasks, steps, score_threshold=0.0)])[0]
    recorder = Recorder()
    streamed = Request(image, tasks, steps, score_threshold=0.0, progress=recorder)
    pipeline([streamed])
    kinds = [kind for kind, _, _ in recorder.events]
    assert kinds == ["partial", "partial", "finished"]  # the draft, round 1, the answer
    final = recorder.events[-1][2]
    assert final.passes["keypoints"] == 3 == plain.passes["keypoints"]
    for a, b in zip(final.outputs["keypoints"], plain.outputs["keypoints"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    # A draft's skeletons are the two views' first passes fused, not the image's alone.
    alone = Pipeline(micro_model, CountingRunner(micro_model.network))
    draft_alone = alone([Request(image, tasks, {"keypoints": 0}, score_threshold=0.0)])[0]
    draft = recorder.events[0][2].outputs["keypoints"]
    assert any(
        a is not None and not torch.allclose(a, b)
        for a, b in zip(draft, draft_alone.outputs["keypoints"], strict=True)
    )
    # Cancelled after the draft: no further pass on either view.
    runner = CountingRunner(micro_model.network)
    cancelling = Recorder(cancel_after=1)
    Pipeline(model, runner)(
        [Request(image, tasks, steps, score_threshold=0.0, progress=cancelling)]
    )
    start = model.codecs["keypoints"].vocab_slice()[0]
    assert len([rows for first, rows in runner.decodes if first == start]) == 2  # the draft's
