"""Anytime serving over HTTP: latency budgets, degradation under load, streamed progressive
results (with a real streaming client), early stop and the feature cache."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from model.checkpoint import write_decoding
from service.settings import Settings
from service.streaming import stream_format
from tests.helpers import encode, running_server, scene_image, until
from tests.test_service import delta, metric_samples

IMAGE = encode(scene_image())


@pytest.fixture(scope="module")
def server_settings(micro_checkpoint):
    # The micro model refines keypoints once and captions three times by default.
    return Settings(checkpoint=micro_checkpoint, batch_delay_ms=2, feature_cache_mb=16)


def post(client, image=IMAGE, headers=None, **fields) -> httpx.Response:
    return client.post(
        "/predict",
        files={"image": ("scene.png", image, "image/png")},
        data={k: v for k, v in fields.items() if v is not None},
        headers=headers or {},
    )


def comparable(body: dict) -> dict:
    """A response without what differs between two runs of the same request."""
    return {k: v for k, v in body.items() if k not in ("timings_ms", "budget")}


# The estimated cost of the encoder and of one caption pass in the budget tests: seconds, so
# that the time a loaded machine takes to receive a request and start its batch (subtracted
# from its budget) stays far below the half pass of slack each test leaves.
PASS_MS = 5000


@pytest.fixture
def measured_costs(server):
    """For a test that sets the server's costs: the costs it measured come back after it
    (estimates of seconds per pass would cut the steps of later requests without a budget)."""
    costs = server.state.costs
    with costs.lock:
        kept = copy.deepcopy((costs.averages, costs.recent, costs.errors))
    yield
    with costs.lock:
        costs.averages, costs.recent, costs.errors = kept


def set_costs(server, **stages_ms: float) -> None:
    """Make the server's cost estimates these (batch size 1), as if measured."""
    costs = server.state.costs
    costs.clear()
    for stage, ms in stages_ms.items():
        costs.observe(stage, 1, ms / 1000)


# --- latency budgets --------------------------------------------------------------------------
def test_a_generous_budget_keeps_the_default_steps(client):
    body = post(client, tasks="caption", latency_budget_ms="600000").json()
    assert body["refine_steps_applied"] == {"caption": 3}
    assert body["decoder_passes"] == {"caption": 4}
    assert body["budget"]["latency_budget_ms"] == 600000 and body["budget"]["cut"] is False
    assert 0 < body["budget"]["estimated_ms"] < 600000
    plain = post(client, tasks="caption").json()
    assert "budget" not in plain and plain["refine_steps_applied"] == {"caption": 3}


@pytest.mark.usefixtures("measured_costs")
def test_a_budget_cuts_steps_to_fit_the_estimates(client, server):
    # A draft of two passes and one pass per caption step: 3.5 passes buy one step (unless
    # receiving the request took over half a pass).
    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    before = metric_samples(client)
    body = post(client, tasks="caption", latency_budget_ms=str(3.5 * PASS_MS)).json()
    assert body["refine_steps_applied"] == {"caption": 1}
    assert body["decoder_passes"] == {"caption": 2}
    assert body["budget"]["cut"] is True and body["budget"]["estimated_ms"] <= 3.5 * PASS_MS
    after = metric_samples(client)
    assert delta(before, after, "mad_budget_cut_requests_total") == 1
    assert delta(before, after, "mad_refinement_steps_applied_sum", task="caption") == 1
    # Explicit steps win over the budget.
    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    budget = str(2.5 * PASS_MS)
    body = post(client, tasks="caption", refine_steps="caption:2", latency_budget_ms=budget).json()
    assert body["refine_steps_applied"] == {"caption": 2} and body["budget"]["cut"] is False


@pytest.mark.usefixtures("measured_costs")
def test_the_header_gives_a_budget_and_the_form_field_wins(client, server):
    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    header = {"X-Latency-Budget-Ms": str(2.5 * PASS_MS)}
    body = post(client, tasks="caption", headers=header).json()
    assert body["budget"]["latency_budget_ms"] == 2.5 * PASS_MS
    assert body["refine_steps_applied"] == {"caption": 0}
    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    body = post(client, tasks="caption", latency_budget_ms="600000", headers=header).json()
    assert body["budget"]["latency_budget_ms"] == 600000


@pytest.mark.usefixtures("measured_costs")
def test_a_budget_too_small_for_one_pass_is_refused_at_once(client, server):
    set_costs(server, preprocess=1, encode=100, caption=100, postprocess=1)
    before = metric_samples(client)
    response = post(client, tasks="caption", latency_budget_ms="50")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "budget_too_small"
    assert "latency_budget_ms=50" in error["message"] and "encode 100.0" in error["message"]
    after = metric_samples(client)
    assert delta(before, after, "mad_decoder_passes_total", task="caption") == 0
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "field, headers, says",
    [
        ({"latency_budget_ms": "0"}, {}, "latency_budget_ms"),
        ({"latency_budget_ms": "-3"}, {}, "latency_budget_ms"),
        ({"latency_budget_ms": "soon"}, {}, "latency_budget_ms"),
        ({}, {"X-Latency-Budget-Ms": "soon"}, "'soon' is not a number of milliseconds"),
        ({}, {"X-Latency-Budget-Ms": "0"}, "0 is outside 0 < ms"),
        ({"refine_early_stop": "maybe"}, {}, "refine_early_stop"),
    ],
)
def test_bad_budgets_and_flags_are_422(client, field, headers, says):
    response = post(client, tasks="caption", headers=headers, **field)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


@pytest.mark.usefixtures("measured_costs")
def test_the_kserve_v2_protocol_takes_a_budget_and_early_stop(client, server):
    """Parameters of a v2 inference request, as POST /predict's fields."""
    name = client.get("/v1/model").json()["name"]
    image = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(IMAGE).decode()],
    }

    def infer(**parameters) -> httpx.Response:
        body = {
            "inputs": [image],
            "outputs": [{"name": "json"}],
            "parameters": {"tasks": "caption", **parameters},
        }
        return client.post(f"/v2/models/{name}/infer", json=body)

    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    response = infer(latency_budget_ms=3.5 * PASS_MS)
    assert response.status_code == 200, response.text
    answer = json.loads(response.json()["outputs"][0]["data"][0])
    assert answer["refine_steps_applied"] == {"caption": 1} and answer["budget"]["cut"] is True
    # The answer's own stage times joined the estimates: set them again.
    set_costs(server, preprocess=0, encode=PASS_MS, caption=PASS_MS, postprocess=0)
    refused = infer(latency_budget_ms="50")
    assert refused.status_code == 422 and "latency_budget_ms=50" in refused.json()["error"]
    early = infer(refine_steps=8, refine_early_stop=True)
    answer = json.loads(early.json()["outputs"][0]["data"][0])
    assert 2 <= answer["decoder_passes"]["caption"] < 9
    assert infer(latency_budget_ms=-1).status_code == 400  # the v2 routes' bad request


def test_a_model_with_caption_candidates_plans_and_counts_the_choosing_pass(
    micro_checkpoint, tmp_path
):
    checkpoint = tmp_path / "candidates"
    shutil.copytree(micro_checkpoint, checkpoint)
    write_decoding(checkpoint, {"caption_candidates": 2}, {})
    with running_server(Settings(checkpoint=checkpoint)) as server:
        engine = server.app.state.service.engine
        assert engine.planner.closing_passes["caption"] == 1
        assert engine.planner.closing_passes["detection"] == 0
        with httpx.Client(base_url=server.url, timeout=30) as c:
            body = post(c, tasks="caption", refine_steps="3").json()
            one_pass = post(c, tasks="caption", refine_steps="0").json()
    assert body["decoder_passes"] == {"caption": 5} and body["caption"]
    assert one_pass["decoder_passes"] == {"caption": 1}


# --- early stop and the feature cache ---------------------------------------------------------
def test_early_stop_reports_the_passes_that_ran(client):
    full = post(client, tasks="caption", refine_steps="8").json()
    early = post(client, tasks="caption", refine_steps="8", refine_early_stop="true").json()
    assert full["decoder_passes"] == {"caption": 9}
    assert 2 <= early["decoder_passes"]["caption"] < 9
    assert early["refine_steps_applied"] == {"caption": 8} and early["caption"]


def test_a_second_task_on_the_same_image_skips_the_encoder(client):
    image = encode(scene_image(150, 110))
    before = metric_samples(client)
    first = post(client, image, tasks="detection", score_threshold="0").json()
    second = post(client, image, tasks="caption").json()
    after = metric_samples(client)
    assert delta(before, after, "mad_feature_cache_misses_total") == 1
    assert delta(before, after, "mad_feature_cache_hits_total") == 1
    assert after[("mad_feature_cache_bytes", ())] > 0
    # The same pixels in other bytes are another entry, and answer the same.
    other = post(client, encode(scene_image(150, 110), compress_level=1), tasks="caption").json()
    assert other["caption"] == second["caption"] and "detections" in first
    assert delta(after, metric_samples(client), "mad_feature_cache_misses_total") == 1
    # The v2 protocol shares the cache: the same upload's features are found.
    name = client.get("/v1/model").json()["name"]
    tensor = {
        "name": "image",
        "shape": [1],
        "datatype": "BYTES",
        "data": [base64.b64encode(image).decode()],
    }
    before = metric_samples(client)
    body = {"inputs": [tensor], "outputs": [{"name": "json"}], "parameters": {"tasks": "caption"}}
    assert client.post(f"/v2/models/{name}/infer", json=body).status_code == 200
    assert delta(before, metric_samples(client), "mad_feature_cache_hits_total") == 1


# --- progressive results ----------------------------------------------------------------------
def stream_lines(client, accept: str, **fields) -> list[str]:
    with client.stream(
        "POST",
        "/predict",
        files={"image": ("scene.png", IMAGE, "image/png")},
        data=fields,
        headers={"Accept": accept},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(accept)
        return list(response.iter_lines())


def test_ndjson_streams_draft_then_each_step_then_the_plain_answer(client):
    fields = {"tasks": "detection,keypoints,caption", "score_threshold": "0", "nms_iou": "1"}
    lines = stream_lines(client, "application/x-ndjson", **fields)
    objects = [json.loads(line) for line in lines if line]
    assert [o.get("partial") for o in objects] == [
        {"stage": "draft", "round": 0},
        {"stage": "refine", "round": 1},
        {"stage": "refine", "round": 2},
        None,
    ]
    assert [o["decoder_passes"]["caption"] for o in objects] == [1, 2, 3, 4]
    # Threshold 0: every slot whose box has an area (up to the micro model's 6).
    assert objects[0]["decoder_passes"]["detection"] == 1
    assert 0 < len(objects[0]["detections"]) <= 6
    plain = post(client, **fields).json()
    assert comparable(objects[-1]) == comparable(plain)
    assert set(objects[-1]["timings_ms"]) == set(plain["timings_ms"])


def test_server_sent_events_name_each_stage(client):
    lines = stream_lines(client, "text/event-stream", tasks="caption", refine_steps="2")
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert events == ["draft", "refine", "final"]
    assert "partial" not in data[-1] and data[-1]["decoder_passes"] == {"caption": 3}


def test_a_request_answered_in_one_pass_streams_only_the_final_object(client):
    lines = stream_lines(client, "application/x-ndjson", tasks="caption", refine_steps="0")
    assert len([line for line in lines if line]) == 1 and "partial" not in json.loads(lines[0])


def test_disconnecting_stops_the_remaining_steps(client, server):
    """The second pass waits until the client has gone and the server has seen it; after
    that pass no further one runs for the request (8 steps asked: 9 passes otherwise)."""
    engine = server.state.engine
    runner = engine.pipeline.runner
    passes, jobs = [], []
    gone = threading.Event()
    original_decode, original_submit = runner.decode, engine.submit

    def gated_decode(*args, **kwargs):
        passes.append(len(passes))
        if len(passes) == 2:
            assert gone.wait(30), "the server never saw the client leave"
        return original_decode(*args, **kwargs)

    def recording_submit(*args, **kwargs):
        jobs.append(original_submit(*args, **kwargs))
        return jobs[-1]

    runner.decode, engine.submit = gated_decode, recording_submit
    try:
        with client.stream(
            "POST",
            "/predict",
            files={"image": ("scene.png", IMAGE, "image/png")},
            data={"tasks": "caption", "refine_steps": "8"},
            headers={"Accept": "application/x-ndjson"},
        ) as response:
            draft = json.loads(next(response.iter_lines()))
            until(lambda: len(passes) == 2, "the second pass never began")  # it waits on `gone`
        assert draft["partial"]["round"] == 0
        until(lambda: jobs[0].future.cancelled(), "the disconnect did not cancel the job")
        gone.set()
        until(lambda: engine.running == 0, "the model did not stop")
        assert len(passes) == 2  # the draft and the pass under way when the client left
    finally:
        del runner.decode, engine.submit
    assert post(client, tasks="caption").status_code == 200


# --- degradation under load ------------------------------------------------------------------
def test_a_deep_queue_degrades_new_requests_before_refusing_them(micro_checkpoint):
    # A 5 s batch window holds the burst in the queue: depths 0, 1, 2, 3 on arrival. The
    # watermark is 2 of 4: the request finding 3 waiting gets floor(3 x 1/2) caption steps.
    settings = Settings(
        checkpoint=micro_checkpoint,
        queue_size=4,
        degrade_queue_depth=2,
        batch_delay_ms=5000,
        batch_window="fixed",
        max_batch_size=8,
    )
    with running_server(settings) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        engine = server.state.engine
        with ThreadPoolExecutor(4) as pool:
            queued = []
            for depth in range(4):  # one after the other, all inside the first one's window
                queued.append(pool.submit(post, c, tasks="caption"))
                until(lambda d=depth: len(engine.waiting) == d + 1, "a request never queued")
            refused = post(c, tasks="caption")  # finds the queue full
            responses = [refused] + [future.result() for future in queued]
        # Which request found which depth is the server's arrival order.
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 200, 503], statuses
        bodies = [r.json() for r in responses if r.status_code == 200]
        outcomes = sorted((b["refine_steps_applied"]["caption"], "degraded" in b) for b in bodies)
        assert outcomes == [(1, True), (3, False), (3, False), (3, False)]
        assert all(b["degraded"] is True for b in bodies if "degraded" in b)
        metrics = metric_samples(c)
        assert metrics[("mad_degraded_requests_total", ())] == 1
        # Drained: full quality again.
        again = post(c, tasks="caption").json()
        assert again["refine_steps_applied"] == {"caption": 3} and "degraded" not in again


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/x-ndjson", "ndjson"),
        ("text/event-stream", "sse"),
        ("application/json, application/x-ndjson", "ndjson"),  # named: asked for
        ("application/x-ndjson, text/event-stream", "ndjson"),  # the first named
        ("text/event-stream;q=0.5, application/x-ndjson;q=0.9", "ndjson"),  # the higher q
        ("application/json, application/x-ndjson;q=0", None),  # q=0: refused
        ("application/json;q=1, text/event-stream;q=0.5", None),  # JSON preferred
        ("*/*;q=0.1, text/event-stream", "sse"),
        ("*/*", None),  # a stream only when named
        ("application/x-ndjson;q=high", None),  # a malformed q counts as 0
        ("", None),
    ],
)
def test_accept_header_chooses_the_stream(accept, expected):
    assert stream_format(accept) == expected


def test_a_server_reading_mirror_images_prices_the_encoder_per_view(micro_checkpoint):
    settings = Settings(checkpoint=micro_checkpoint, decoding="keypoints_flip=true")
    with running_server(settings) as server:
        planner = server.app.state.service.engine.planner
        assert planner.views(("keypoints",)) == 2 and planner.views(("caption",)) == 1
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/v1/model").json()["decoding"]["keypoints_flip"] is True
            body = post(c, tasks="keypoints", score_threshold="0").json()
    assert body["decoder_passes"]["keypoints"] >= 1
