"""The refinement loop as an iterator, and the pipeline's rounds built on it: partial results,
early answers, cancelled requests, early stop and the feature cache."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mad.bench.workload import BUNDLED_CHECKPOINT, synthetic_image
from model.checkpoint import load_checkpoint
from model.decoding import masked_decode, refinement
from model.feature_cache import FeatureCache
from model.inference_io import Request
from model.pipeline import Pipeline
from runtime.torch_runner import TorchRunner
from tests.helpers import Recorder, synthetic_images


class CountingRunner(TorchRunner):
    """Counts decoder passes (and encoded images), per vocabulary slice."""

    def __init__(self, network):
        super().__init__(network)
        self.decodes: list[tuple[int, int]] = []  # (vocab slice start, sequences)
        self.encoded = 0

    def encode(self, images, pad_mask):
        self.encoded += len(images)
        return super().encode(images, pad_mask)

    def decode(self, memory, tokens, image_index, vocab_slice):
        self.decodes.append((vocab_slice[0], len(tokens)))
        return super().decode(memory, tokens, image_index, vocab_slice)


def caption_setup(micro_model):
    runner = CountingRunner(micro_model.network)
    memory = runner.encode(torch.rand(2, 3, 96, 96), torch.zeros(2, 96, 96, dtype=torch.bool))
    codec = micro_model.codecs["caption"]
    return runner, memory, codec, codec.prompts(2), torch.tensor([0, 1])


def test_the_iterator_yields_every_pass_and_ends_where_masked_decode_does(micro_model):
    runner, memory, codec, prompts, index = caption_setup(micro_model)
    ratios = [0.8, 0.6, 0.4]
    passes, actives = [], []
    for state in refinement(runner, memory, codec, prompts, index, ratios):
        passes.append(state.passes.tolist())
        actives.append(state.active.tolist())
        last = state.logits.clone()
    assert passes == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert actives[0] == [True, True] and actives[-1] == [False, False]
    assert torch.equal(last, masked_decode(runner, memory, codec, prompts, index, ratios))


def test_stopped_sequences_get_no_more_passes(micro_model):
    runner, memory, codec, prompts, index = caption_setup(micro_model)
    steps = refinement(runner, memory, codec, prompts, index, [0.8, 0.6, 0.4])
    state = next(steps)
    state.stop(torch.tensor([1]))
    kept = state.logits[1].clone()
    runner.decodes.clear()
    for _ in steps:
        pass
    assert runner.decodes == [(codec.vocab_slice()[0], 1)] * 3  # only sequence 0 ran
    assert state.passes.tolist() == [4, 1]
    assert torch.equal(state.logits[1], kept)
    # Sequence 0 alone decodes to what it decodes beside sequence 1.
    alone = masked_decode(runner, memory, codec, prompts[:1], index[:1], [0.8, 0.6, 0.4])
    torch.testing.assert_close(state.logits[0], alone[0])


def test_early_stop_ends_a_sequence_whose_step_changed_no_token(micro_model):
    runner, memory, codec, prompts, index = caption_setup(micro_model)
    ratios = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.3]
    steps = refinement(runner, memory, codec, prompts, index, ratios, early_stop=True)
    state = next(steps)
    for _ in steps:
        pass
    passes = state.passes.tolist()
    assert all(2 <= p < 9 for p in passes), passes  # a random micro model settles soon
    for row, p in enumerate(passes):
        # Each sequence's tokens are those of the same loop cut after its last step, and
        # that step changed none of them.
        cut = masked_decode(runner, memory, codec, prompts, index, ratios[: p - 1])
        before = masked_decode(runner, memory, codec, prompts, index, ratios[: p - 2])
        assert torch.equal(state.logits[row].argmax(-1), cut[row].argmax(-1))
        assert torch.equal(cut[row].argmax(-1), before[row].argmax(-1))


def test_rounds_report_the_draft_then_each_step_and_finish_early(micro_model):
    runner = CountingRunner(micro_model.network)
    pipeline = Pipeline(micro_model, runner)
    image = synthetic_images(1)[0]
    quick, slow = Recorder(), Recorder()
    requests = [
        Request(image, ("caption",), {"caption": 0}, progress=quick),
        Request(image, ("caption",), {"caption": 3}, progress=slow),
    ]
    results = pipeline(requests)
    assert [(kind, r) for kind, r, _ in quick.events] == [("finished", -1)]
    assert [(kind, r) for kind, r, _ in slow.events] == [
        ("partial", 0),
        ("partial", 1),
        ("partial", 2),
        ("finished", -1),
    ]
    assert [res.passes["caption"] for _, _, res in slow.events] == [1, 2, 3, 4]
    assert slow.events[-1][2] is results[1] and results[1].refine_steps == {"caption": 3}
    # The draft is the one-pass answer; the final one is what no progress gives.
    plain = pipeline([Request(image, ("caption",), {"caption": 3})])[0]
    one_pass = pipeline([Request(image, ("caption",), {"caption": 0})])[0]
    assert slow.events[0][2].caption == one_pass.caption
    assert results[1].caption == plain.caption


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "config.json").is_file(), reason="no bundled checkpoint"
)
def test_partials_of_prompted_tasks_and_final_equal_the_plain_answer():
    mad, _ = load_checkpoint(BUNDLED_CHECKPOINT)  # it finds persons, so keypoints run
    pipeline = Pipeline(mad, TorchRunner(mad.network))
    image = synthetic_image((256, 256), seed=14)
    tasks = tuple(mad.config.tasks)
    steps = {"segmentation": 1, "keypoints": 2, "caption": 3}  # whatever the defaults are
    recorder = Recorder()
    streamed = pipeline([Request(image, tasks, steps, progress=recorder)])[0]
    plain = pipeline([Request(image, tasks, steps)])[0]
    assert [(kind, r) for kind, r, _ in recorder.events] == [
        ("partial", 0),
        ("partial", 1),
        ("partial", 2),
        ("finished", -1),
    ]
    draft = recorder.events[0][2]
    # The bundled model re-reads its boxes on zoomed crops (model.zoom): one more pass, run
    # before the boxes prompt anything.
    detection = 1 + int(mad.config.detection_zoom)
    assert draft.passes == {
        "detection": detection,
        "segmentation": 1,
        "keypoints": 1,
        "caption": 1,
    }
    assert recorder.events[2][2].passes == {
        "detection": detection,
        "segmentation": 2,
        "keypoints": 3,
        "caption": 3,
    }
    persons = [k is not None for k in plain.keypoints]
    assert any(persons) and [k is not None for k in draft.keypoints] == persons
    assert len(draft.masks) == len(plain.detections) > 0
    # The bundled model chooses among caption candidates (model.decoding): one pass more.
    choice = int(mad.config.caption_candidates > 1)
    assert streamed.passes == {
        "detection": detection,
        "segmentation": 2,
        "keypoints": 3,
        "caption": 4 + choice,
    }
    assert streamed.passes == plain.passes and streamed.caption == plain.caption
    for a, b in zip(streamed.masks, plain.masks, strict=True):
        assert torch.equal(a.full(), b.full())
    for a, b in zip(streamed.keypoints, plain.keypoints, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_cancelled_request_gets_no_further_passes(micro_model):
    runner = CountingRunner(micro_model.network)
    pipeline = Pipeline(micro_model, runner)
    image = synthetic_images(1)[0]
    gone, staying = Recorder(cancel_after=1), Recorder()
    results = pipeline(
        [
            Request(image, ("caption",), {"caption": 8}, progress=gone),
            Request(image, ("caption",), {"caption": 2}, progress=staying),
        ]
    )
    assert results[0].cancelled and not results[1].cancelled
    assert [kind for kind, _, _ in gone.events] == ["partial"]  # never finished
    assert staying.events[-1][0] == "finished" and results[1].passes["caption"] == 3
    # Two drafts, then the staying request's two steps: none of the 8 steps of the other.
    assert len(runner.decodes) == 4


def test_early_stop_per_request_reports_the_passes_run(micro_model):
    pipeline = Pipeline(micro_model, TorchRunner(micro_model.network))
    image = synthetic_images(1)[0]
    full = pipeline([Request(image, ("caption",), {"caption": 8})])[0]
    early = pipeline([Request(image, ("caption",), {"caption": 8}, early_stop=True)])[0]
    assert full.passes["caption"] == 9 and 2 <= early.passes["caption"] < 9
    assert early.refine_steps == {"caption": 8} and early.caption


def test_the_feature_cache_encodes_an_image_once_and_answers_the_same(micro_model):
    runner = CountingRunner(micro_model.network)
    cache: FeatureCache = FeatureCache(10 * 2**20, "v1")
    cached = Pipeline(micro_model, runner, features=cache)
    plain = Pipeline(micro_model, TorchRunner(micro_model.network))
    a, b = synthetic_images(2, seed=5)
    first = cached([Request(a, ("detection",), image_key="a")])[0]
    again = cached([Request(a, ("caption",), image_key="a")])[0]
    assert runner.encoded == 1 and (cache.hits, cache.misses) == (1, 1)
    assert again.caption == plain([Request(a, ("caption",))])[0].caption
    assert torch.equal(
        first.detections.boxes, plain([Request(a, ("detection",))])[0].detections.boxes
    )
    # A batch of one cached and one new image: only the new one is encoded, and both
    # answer as alone.
    mixed = cached(
        [Request(b, ("caption",), image_key="b"), Request(a, ("caption",), image_key="a")]
    )
    assert runner.encoded == 2 and len(cache) == 2
    assert mixed[1].caption == again.caption
    assert mixed[0].caption == plain([Request(b, ("caption",))])[0].caption
    # An image without a key is never cached.
    cached([Request(Image.new("RGB", (50, 40)), ("caption",))])
    assert len(cache) == 2 and runner.encoded == 3


def test_the_feature_cache_is_bounded_in_bytes_and_keyed_by_model_version():
    cache: FeatureCache = FeatureCache(100, "v1")
    cache.put("a", "features a", 60)
    cache.put("b", "features b", 30)
    assert cache.get("a") == "features a"  # a is now the most recent
    cache.put("c", "features c", 40)  # evicts b, the least recently used
    assert (cache.get("b"), cache.get("a"), cache.get("c")) == (None, "features a", "features c")
    assert cache.bytes == 100 and cache.evictions == 1
    cache.put("huge", "features", 101)  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.bytes == 100
    assert cache.key("a") == ("v1", "a")
    other = FeatureCache(100, "v2")
    assert other.key("a") != cache.key("a")
