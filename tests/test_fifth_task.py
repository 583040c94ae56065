"""A fifth task is one file: a toy "count" codec, defined and registered here and nowhere
else, is trained, saved, evaluated, tuned, benchmarked and served over HTTP."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jsonschema
import pytest
import torch

from mad.bench.model_bench import ModelBench, schedules
from model.checkpoint import load_checkpoint
from model.codecs import (
    DecodeContext,
    JsonOptions,
    TaskCodec,
    TaskEvaluator,
    TrainSequences,
    register_codec,
)
from model.config import TASKS
from model.evaluate import GroundTruth
from model.inference_io import Result
from model.train import train
from model.train_start import TrainConfig
from model.tune import tune_schedules
from runtime.torch_runner import TorchRunner
from service.settings import Settings
from tests.helpers import MICRO_OVERRIDES as MICRO
from tests.helpers import encode, running_server, scene_image, synthetic_images


class CountAccuracy:
    """How often the predicted count is the number of annotated objects (at most num_slots)."""

    def __init__(self, truth: GroundTruth, task: str, name: str, most: int) -> None:
        self.truth, self.task, self.name, self.most = truth, task, name, most
        self.hits: list[bool] = []
        self.missing = None  # every data set has instances to count

    def add(self, image_id: int, result: Result) -> None:
        objects = len(self.truth.instances.getAnnIds(imgIds=[image_id]))
        self.hits.append(result.outputs[self.task] == min(objects, self.most))

    def summarize(self) -> dict[str, float]:
        return {self.name: sum(self.hits) / max(len(self.hits), 1)}


@register_codec
class CountCodec(TaskCodec):
    """Count: prompt [count] + one token, the number of objects in the image (0..num_slots).

    The prompt and the count tokens are ids the codec reserves for itself; its logits cover
    the count tokens only. One sequence per image; the response says `"count": n`.
    """

    name = "count"
    output_field = "count"
    output_schema: ClassVar[dict[str, Any]] = {"type": "integer", "minimum": 0}
    metrics = ("count_accuracy",)
    prompt_len = 1
    body_len = 1

    @classmethod
    def reserved_tokens(cls, config) -> int:
        return 1 + config.num_slots + 1  # the prompt, then counts 0..num_slots

    def vocab_slice(self) -> tuple[int, int]:
        start, stop = self.reserved_range()
        return start + 1, stop

    def body_ranges(self) -> list[tuple[int, int]]:
        return [self.vocab_slice()]

    def prompts(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size, 1), self.reserved_range()[0])

    def training_sequences(self, targets: list[dict], generator: torch.Generator) -> TrainSequences:
        counts = torch.tensor([min(len(t["labels"]), self.config.num_slots) for t in targets])
        prompt, body = self.prompts(len(targets)), self.vocab_slice()[0] + counts[:, None]
        inputs = torch.cat([prompt, torch.full_like(body, self.vocab.mask)], 1)  # fully masked
        weights = torch.tensor([[0.0, 1.0]]).repeat(len(targets), 1)
        targets_ = torch.cat([prompt, body], 1).unsqueeze(1)
        return TrainSequences(inputs, targets_, weights, torch.arange(len(targets)))

    def decode(
        self, logits: torch.Tensor, prompts: torch.Tensor | None, contexts: list[DecodeContext], **_
    ) -> list[int]:
        return logits[:, 0].argmax(-1).tolist()  # local id = the count

    def to_json(self, output: int, options: JsonOptions) -> int:
        return output

    def evaluator(self, truth: GroundTruth) -> TaskEvaluator:
        return CountAccuracy(truth, self.name, self.metric, self.config.num_slots)


TASKS_WITH_COUNT = [*TASKS, "count"]


@pytest.fixture(scope="module")
def count_checkpoint(synth_data, tmp_path_factory) -> Path:
    """A micro model of the four tasks and count, trained a few steps (and evaluated by the
    training loop at the end) on the synthetic data."""
    out = tmp_path_factory.mktemp("count") / "ckpt"
    train(
        TrainConfig(
            data=synth_data,
            out=out,
            steps=3,
            batch_size=2,
            workers=0,
            warmup_steps=1,
            log_every=1,
            save_every=100,
            eval_images=2,
            lr=1e-3,
            overrides={**MICRO, "tasks": TASKS_WITH_COUNT},
        )
    )
    return out


def test_count_trains_evaluates_and_owns_its_vocabulary(count_checkpoint):
    with open(count_checkpoint / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["count"]) for r in rows if r.get("count")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    accuracy = [float(r["val_count_accuracy"]) for r in rows if r.get("val_count_accuracy")]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0

    mad, _ = load_checkpoint(count_checkpoint)
    assert list(mad.codecs) == TASKS_WITH_COUNT
    vocab, count = mad.vocab, mad.codecs["count"]
    # Its ids come after everything the built-in tasks use, which did not move.
    assert (
        count.reserved_range()
        == (vocab.text_stop, vocab.size)
        == (vocab.text_stop, vocab.text_stop + 1 + 8 + 1)
    )
    assert mad.codecs["caption"].vocab_slice() == (vocab.text_start, vocab.text_stop)
    ids = {task: set(range(*codec.vocab_slice())) for task, codec in mad.codecs.items()}
    assert not ids["count"] & set().union(*(ids[t] for t in TASKS))
    assert vocab.text_stop not in ids["count"]  # its prompt is never predicted


def test_count_is_tuned_and_benchmarked_like_any_task(count_checkpoint, synth_data):
    mad, _ = load_checkpoint(count_checkpoint)
    trials = tune_schedules(mad, synth_data, tasks=("count",), limit=2, max_steps=1)
    assert list(trials) == ["count"] and len(trials["count"]) >= 2
    assert all(0.0 <= trial.score <= 1.0 for trial in trials["count"])

    bench = ModelBench(
        mad, TorchRunner(mad.network), synthetic_images(1), kept=2, ratios=schedules(mad, {})
    )
    assert bench.tasks == TASKS_WITH_COUNT
    assert {"encode", "count", "postprocess"} <= set(bench.run())


def test_count_is_served_over_http(count_checkpoint):
    settings = Settings(checkpoint=count_checkpoint, batch_delay_ms=2)
    with (
        running_server(settings) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        model = client.get("/v1/model").json()
        assert model["tasks"] == TASKS_WITH_COUNT
        assert model["default_refine_steps"]["count"] == 0

        def predict(tasks: str) -> httpx.Response:
            return client.post(
                "/predict",
                data={"tasks": tasks, "score_threshold": "0"},
                files={"image": ("scene.png", encode(scene_image()))},
            )

        alone = predict("count")
        assert alone.status_code == 200, alone.text
        body = alone.json()
        assert body["tasks"] == ["count"] and body["decoder_passes"] == {"count": 1}
        assert isinstance(body["count"], int) and 0 <= body["count"] <= 8
        assert "detections" not in body and "caption" not in body
        assert "count" in body["timings_ms"]

        together = predict("count,segmentation").json()
        assert together["tasks"] == ["detection", "segmentation", "count"]
        assert together["count"] == body["count"]
        assert all("mask" in det for det in together["detections"])

        unknown = predict("count,counting")
        assert unknown.status_code == 422
        message = unknown.json()["error"]["message"]
        assert "'counting'" in message and ", ".join(TASKS_WITH_COUNT) in message

        openapi = client.get("/openapi.json").json()
        components = openapi["components"]["schemas"]
        for name in ("PredictResponse", "ModelDescription"):
            assert components[name]["properties"]["tasks"]["items"]["enum"] == TASKS_WITH_COUNT
        assert components["PredictResponse"]["properties"]["count"]["type"] == "integer"
        for response in (body, together):
            schema = {
                "$ref": "#/components/schemas/PredictResponse",
                "components": openapi["components"],
            }
            jsonschema.Draft202012Validator(schema).validate(response)
