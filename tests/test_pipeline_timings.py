"""Decoding a task's outputs (boxes, masks, keypoints, words) from its logits: timed as that
task's stage, in the final result and in every partial one (the service reports these stages
per request), and done once for a task whose passes are over."""

from __future__ import annotations

import time

import pytest
import torch

from mad.bench.workload import synthetic_image
from model.inference_io import Request
from model.pipeline import Pipeline
from model.task_groups import TaskGroup
from runtime.torch_runner import TorchRunner
from tests.helpers import Recorder

DECODE_S = 0.05  # what every decoding of outputs takes here, far above a micro model's pass


@pytest.fixture
def slow_decoding(monkeypatch) -> dict[str, int]:
    """Every TaskGroup.decode takes DECODE_S longer; -> its calls per task."""
    calls: dict[str, int] = {}
    decode = TaskGroup.decode

    def slow(self, images, contexts):
        calls[self.task] = calls.get(self.task, 0) + 1
        time.sleep(DECODE_S)
        return decode(self, images, contexts)

    monkeypatch.setattr(TaskGroup, "decode", slow)
    return calls


def test_decoding_the_outputs_is_timed_under_each_task(micro_model, slow_decoding):
    pipeline = Pipeline(micro_model, TorchRunner(micro_model.required_network()))
    tasks = tuple(micro_model.config.tasks)
    recorder = Recorder()
    request = Request(synthetic_image((96, 96)), tasks, {"caption": 2}, 0.0, 3, progress=recorder)
    start = time.perf_counter()
    [result] = pipeline([request])
    wall = time.perf_counter() - start
    assert sum(result.timings.values()) <= wall  # consecutive stages: nothing counted twice
    assert "caption" in slow_decoding and "detection" in slow_decoding
    for task, calls in slow_decoding.items():
        assert result.timings[task] >= calls * DECODE_S, (task, result.timings)
    # round 1 partial; round 2 is the final result
    draft, refined, final = [reported for _, _, reported in recorder.events]
    assert final.passes == result.passes and refined.passes["caption"] == 2
    # Each snapshot's timings include decoding that snapshot's outputs.
    assert draft.timings["caption"] >= DECODE_S and draft.timings["detection"] >= DECODE_S


def test_a_streamed_request_decodes_a_finished_task_once(micro_model, slow_decoding):
    """A snapshot after every round decodes the tasks still refining; a task whose passes
    are over keeps the outputs it decoded (its logits no longer change)."""
    pipeline = Pipeline(micro_model, TorchRunner(micro_model.required_network()))
    tasks = ("detection", "segmentation", "caption")
    request = Request(synthetic_image((96, 96)), tasks, {"caption": 2}, 0.0, 3, progress=Recorder())
    [plain] = pipeline([Request(synthetic_image((96, 96)), tasks, {"caption": 2}, 0.0, 3)])
    slow_decoding.clear()
    [streamed] = pipeline([request])
    # Segmentation (no refinement) at the draft only; caption at the draft, round 1, the end.
    assert slow_decoding == {"detection": 1, "segmentation": 1, "caption": 3}
    assert streamed.caption == plain.caption and len(streamed.masks or []) == 3
    assert all(
        torch.equal(a.full(), b.full())
        for a, b in zip(streamed.masks or [], plain.masks or [], strict=True)
    )
