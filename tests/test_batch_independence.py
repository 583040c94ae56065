"""An answer must not depend on its batch mates: the bundled model decodes an image alone and
inside batches of 2 and 4 (with other images, at other positions) to the same results, for
every task (the service batches whoever is waiting together)."""

from __future__ import annotations

import pytest
import torch

from mad.bench.workload import BUNDLED_CHECKPOINT, synthetic_image
from model.checkpoint import load_checkpoint
from model.inference_io import Request, Result
from model.pipeline import Pipeline
from runtime.torch_runner import TorchRunner


def same(a: Result, b: Result) -> None:
    assert a.caption == b.caption
    assert a.detections is not None and b.detections is not None
    assert a.detections.labels.tolist() == b.detections.labels.tolist()
    torch.testing.assert_close(a.detections.boxes, b.detections.boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(a.detections.scores, b.detections.scores, atol=1e-4, rtol=0)
    for ma, mb in zip(a.masks or [], b.masks or [], strict=True):
        assert ma is not None and mb is not None
        assert (ma.full() != mb.full()).float().mean() < 1e-3
    for ka, kb in zip(a.keypoints or [], b.keypoints or [], strict=True):
        assert (ka is None) == (kb is None)
        if ka is not None and kb is not None:
            torch.testing.assert_close(ka[:, :2], kb[:, :2], atol=1e-3, rtol=0)


@pytest.mark.skipif(
    not (BUNDLED_CHECKPOINT / "config.json").is_file(), reason="no bundled checkpoint"
)
def test_results_do_not_depend_on_batch_mates():
    mad, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    pipeline = Pipeline(mad, TorchRunner(mad.network))
    tasks = tuple(mad.config.tasks)
    images = [synthetic_image((256, 256), seed=s) for s in (11, 12, 13, 14)]
    requests = [Request(image, tasks) for image in images]
    alone = pipeline(requests[:1])[0]
    assert alone.detections is not None and len(alone.detections) > 0
    same(alone, pipeline(requests[:2])[0])
    same(alone, pipeline([requests[2], requests[0]])[1])
    same(alone, pipeline([requests[1], requests[3], requests[0], requests[2]])[2])
    # Schedules differ per request: the image's own schedule holds inside a mixed batch.
    refined = Request(images[0], tasks, refine_steps={"caption": 2, "keypoints": 1})
    mixed = pipeline([requests[1], refined, requests[3]])[1]
    same(pipeline([refined])[0], mixed)
