"""The demo page and the API docs in a real headless Chromium (tests/chromium.py), with the
network blocked but for the loopback.

`/?demo=1` makes the page build a test scene on a canvas and submit it through the same code
path as a picked file; `runDemo()` does the same on demand. The tests act as a user would:
tick boxes, type a key (set the field and fire its change event), and read what the page
shows.
"""

from __future__ import annotations

import json

import httpx
import pytest

from model.checkpoint import read_checkpoint_config
from service.settings import BUNDLED_CHECKPOINT, Settings
from tests.chromium import CHROMIUM, Browser
from tests.helpers import running_server

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)"
)

STATUS = "document.getElementById('status')"
DONE = f"{STATUS}.dataset.state === 'done' && {STATUS}.textContent"


def predict_count(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mad_requests_total{")
    )


def type_key(browser: Browser, key: str) -> None:
    value = json.dumps(key)
    browser.evaluate(
        "(() => { const k = document.getElementById('key'); "
        f"k.value = {value}; k.dispatchEvent(new Event('change')); }})()"
    )


def test_demo_page_submits_an_image_and_draws_the_result(micro_checkpoint, tmp_path):
    with (
        running_server(Settings(checkpoint=micro_checkpoint)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/?demo=1&threshold=0")
        text = browser.wait_for(DONE)
        status = browser.evaluate(f"({{...{STATUS}.dataset}})")
        page = browser.evaluate(
            """(() => {
              const canvas = document.getElementById('canvas');
              const band = canvas.getContext('2d').getImageData(1, canvas.height - 2, 1, 1).data;
              return {height: canvas.height, width: canvas.width, band: [...band.slice(0, 3)],
                      labels: JSON.parse(canvas.dataset.labels),
                      json: document.getElementById('json').textContent,
                      model: document.getElementById('model').textContent,
                      timings: document.querySelector('#refined table').textContent,
                      download: document.getElementById('download').hidden};
            })()"""
        )
        downloaded = browser.evaluate(
            "fetch(document.getElementById('download').href).then(r => r.text())"
        )
        metrics = httpx.get(f"{server.url}/metrics").text
    # Threshold 0 keeps every slot of the micro model whose box has an area (up to 6); every
    # one was drawn on the canvas.
    found = status["detections"]
    assert 0 < int(found) <= 6 and status["drawnBoxes"] == found, status
    assert "caption" in status and f"{found} detections" in text
    assert '"decoder_passes"' in page["json"]  # the JSON response is shown beneath
    assert page["model"].startswith("tiny step0-")  # from /v1/model
    assert 'mad_requests_total{protocol="native",status="200",task="detection"} 1.0' in metrics
    # The caption is on a band below the 320x240 image; the labels are inside the image
    # and do not cover each other.
    assert page["width"] == 320 and page["height"] > 240 and page["band"] == [24, 24, 24]
    labels = page["labels"]
    assert len(labels) == int(found)
    for i, (x0, y0, x1, y1) in enumerate(labels):
        assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
        for a0, b0, a1, b1 in labels[i + 1 :]:
            assert not (x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1)
    # Per-stage timings, and the JSON to download.
    for stage in ("queue", "preprocess", "encode", "detection", "caption", "total"):
        assert stage in page["timings"]
    assert not page["download"] and json.loads(downloaded) == json.loads(page["json"])


def test_labels_give_each_masks_score(micro_checkpoint, tmp_path):
    with (
        running_server(Settings(checkpoint=micro_checkpoint)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/?demo=1&threshold=0&tasks=detection,segmentation")
        browser.wait_for(DONE)
        page = browser.evaluate(
            """(() => ({texts: JSON.parse(document.getElementById('canvas').dataset.labelTexts),
                        json: JSON.parse(document.getElementById('json').textContent)}))()"""
        )
    detections = sorted(page["json"]["detections"], key=lambda d: -d["score"])
    assert detections and len(page["texts"]) == len(detections)
    for text, det in zip(page["texts"], detections, strict=True):
        assert text == f"{det['label']} {det['score']:.2f}, mask {det['mask_score']:.2f}"


def test_no_task_ticked_asks_for_one(micro_checkpoint, tmp_path):
    with (
        running_server(Settings(checkpoint=micro_checkpoint)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/")
        browser.wait_for("document.querySelectorAll('input[name=task]').length > 0")
        before = predict_count(server.url)
        browser.evaluate(
            "document.querySelectorAll('input[name=task]').forEach(c => c.checked = false)"
        )
        browser.evaluate("runDemo()")
        state, text = browser.evaluate(f"[{STATUS}.dataset.state, {STATUS}.textContent]")
        assert (state, text) == ("error", "Choose at least one task.")
        assert predict_count(server.url) == before  # nothing was sent


def test_api_key_is_asked_for_and_the_error_clears_once_it_works(micro_checkpoint, tmp_path):
    settings = Settings(checkpoint=micro_checkpoint, api_key="s3cret")
    with running_server(settings) as server, Browser(tmp_path / "profile") as browser:
        browser.open(f"{server.url}/")
        asking = browser.wait_for(f"{STATUS}.dataset.state === 'needs-key' && {STATUS}.textContent")
        assert asking == "This server needs an API key: enter it under Options."
        colour = browser.evaluate(f"getComputedStyle({STATUS}).color")
        assert colour == "rgb(176, 0, 32)"  # shown in red
        type_key(browser, "wrong")
        refused = browser.wait_for(f"{STATUS}.textContent.includes('not accepted')")
        assert refused
        type_key(browser, "s3cret")
        browser.wait_for(f"{STATUS}.dataset.state === 'idle'")
        assert browser.evaluate(f"{STATUS}.textContent") == ""  # the error is gone
        assert browser.evaluate("document.getElementById('model').textContent").startswith("tiny")
        browser.evaluate("runDemo()")
        assert "detections in" in browser.wait_for(DONE)


def test_one_pass_and_refined_side_by_side(tmp_path):
    """With "compare" ticked the page asks for K = 0 and the model's default and shows both;
    the bundled model refines captions by default."""
    config = read_checkpoint_config(BUNDLED_CHECKPOINT)
    caption_steps = len(config["schedules"]["caption"])
    assert caption_steps > 0
    choice = int(config["model"].get("caption_candidates", 1) > 1)  # the candidates' pass
    with (
        running_server(Settings(checkpoint=BUNDLED_CHECKPOINT)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/?demo=1&compare=1&tasks=detection,caption")
        browser.wait_for(DONE)
        page = browser.evaluate(
            """(() => {
              const box = (id) => document.getElementById(id).getBoundingClientRect();
              return {onepass: !document.getElementById('onepass').hidden,
                      left: box('onepass').left, right: box('refined').left,
                      top: [box('onepass').top, box('refined').top],
                      json: JSON.parse(document.getElementById('json').textContent)};
            })()"""
        )
    assert page["onepass"] and page["left"] < page["right"] and page["top"][0] == page["top"][1]
    assert page["json"]["one_pass"]["decoder_passes"]["caption"] == 1
    assert page["json"]["refined"]["decoder_passes"]["caption"] == 1 + caption_steps + choice


def test_the_draft_is_drawn_first_then_each_refinement(micro_checkpoint, tmp_path):
    """The page reads the answer as a stream: the one-pass draft is drawn as soon as it
    exists, then each caption refinement (the micro model refines captions 3 times), then
    the final answer, which is the plain one."""
    with (
        running_server(Settings(checkpoint=micro_checkpoint)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/")
        browser.wait_for("document.querySelectorAll('input[name=task]').length > 0")
        # Record what the refined figure showed at each stage, as the page drew it.
        browser.evaluate(
            """(() => {
              window.seen = [];
              const caption = document.querySelector('#refined figcaption');
              new MutationObserver(() => window.seen.push(caption.textContent))
                .observe(caption, {childList: true, characterData: true, subtree: true});
            })()"""
        )
        browser.evaluate("runDemo()")
        browser.wait_for(DONE)
        stages = browser.evaluate(f"{STATUS}.dataset.stages")
        seen = browser.evaluate("window.seen")
        final = json.loads(browser.evaluate("document.getElementById('json').textContent"))
    assert stages == "draft,refine,refine,final"
    assert seen == [
        "Draft: one pass per task",
        "Refining: step 1",
        "Refining: step 2",
        "Refined (the model's default K)",
    ]
    assert "partial" not in final and final["decoder_passes"]["caption"] == 4


def test_api_docs_render_offline(micro_checkpoint, tmp_path):
    """Swagger UI (/docs) lists the operations and ReDoc (/redoc) renders them, from assets
    the server ships (fastapi-offline), not a CDN."""
    with (
        running_server(Settings(checkpoint=micro_checkpoint)) as server,
        Browser(tmp_path / "profile") as browser,
    ):
        browser.open(f"{server.url}/docs")
        paths = browser.wait_for(
            "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.dataset.path)"
        )
        assert {"/predict", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)
        browser.open(f"{server.url}/redoc")
        assert browser.wait_for(
            "document.querySelector('[data-section-id=\"operation/predict_predict_post\"]')"
            " !== null"
        )
        scripts = browser.evaluate("[...document.scripts].map(s => s.src).filter(Boolean)")
        assert scripts and all(src.startswith(server.url) for src in scripts)
