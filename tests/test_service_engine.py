"""Batching, back-pressure, deadlines and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from model.inference_io import Request, Result
from service.engine import BatchingEngine, Draining, InferenceFailed, QueueFull
from service.settings import Settings
from service.streaming import JobStreamingResponse
from tests.helpers import encode, running_server, scene_image, until


# --- the engine alone, with a stand-in pipeline --------------------------------------------
class RecordingPipeline:
    """Answers each request with a Result; fails any batch holding a request marked bad."""

    def __init__(self, seconds: float = 0.0):
        self.batches: list[int] = []
        self.seconds = seconds

    def __call__(self, requests: list[Request]) -> list[Result]:
        self.batches.append(len(requests))
        time.sleep(self.seconds)
        if any(r.score_threshold < 0 for r in requests):
            raise ValueError("bad request in batch")
        return [Result((1, 1), r.tasks) for r in requests]


def request(bad: bool = False) -> Request:
    return Request(Image.new("RGB", (4, 4)), ("caption",), score_threshold=-1 if bad else 0.5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_pipeline_is_built_and_run_on_the_one_model_thread():
    threads = []  # the thread of the build, then of every batch

    class ThreadRecordingPipeline(RecordingPipeline):
        def __init__(self):
            super().__init__()
            threads.append(threading.current_thread())

        def __call__(self, requests):
            threads.append(threading.current_thread())
            return super().__call__(requests)

    async def scenario():
        engine = BatchingEngine(max_batch_size=2, batch_delay_s=0.0, queue_size=4)
        await engine.load(ThreadRecordingPipeline)
        engine.start()
        await asyncio.gather(*(engine.submit(request()).future for _ in range(3)))
        await engine.drain(5)

    run(scenario())
    assert len(threads) >= 3 and len(set(threads)) == 1
    assert threads[0].name.startswith("mad-model")


def test_a_finished_request_leaves_no_reference_to_its_image():
    """Not the model thread's last call, not the engine's last batch, and no reference cycle
    (job -> request -> progress -> job), which only Python's cyclic collector would free,
    requests later: a large photo's pixels are hundreds of MB."""

    async def scenario():
        engine = BatchingEngine(max_batch_size=2, batch_delay_s=0.0, queue_size=4)
        await engine.load(RecordingPipeline)
        engine.start()
        image = Image.new("RGB", (4, 4))
        pixels = weakref.ref(image)
        job = engine.submit(Request(image, ("caption",)))
        del image
        await job.future
        del job
        for _ in range(100):  # the model thread lets go of its call after answering it
            if pixels() is None:
                break
            await asyncio.sleep(0.05)
        freed = pixels() is None
        await engine.drain(5)
        return freed

    collecting = gc.isenabled()
    gc.disable()  # only reference counts free the image
    try:
        assert run(scenario())
    finally:
        if collecting:
            gc.enable()


def test_requests_within_the_delay_share_a_batch_up_to_the_maximum():
    async def scenario():
        pipeline = RecordingPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=4, batch_delay_s=0.2, queue_size=16)
        engine.start()
        jobs = [engine.submit(request()) for _ in range(6)]
        results = await asyncio.gather(*(job.future for job in jobs))
        await engine.drain(5)
        return pipeline.batches, results, jobs

    batches, results, jobs = run(scenario())
    assert batches == [4, 2]
    assert all(isinstance(r, Result) for r in results)
    assert all(job.queue_seconds >= 0 for job in jobs)


def test_a_full_queue_refuses_at_once_and_draining_refuses_new_work():
    async def scenario():
        engine = BatchingEngine(
            RecordingPipeline(), max_batch_size=8, batch_delay_s=10, queue_size=2
        )
        engine.start()
        first, second = engine.submit(request()), engine.submit(request())
        with pytest.raises(QueueFull):
            engine.submit(request())
        drained = await engine.drain(5)  # flushes the waiting batch instead of waiting 10 s
        with pytest.raises(Draining):
            engine.submit(request())
        return drained, first.future.result(), second.future.result()

    drained, *results = run(scenario())
    assert drained and all(isinstance(r, Result) for r in results)


def test_a_failing_request_does_not_fail_its_batch_mates():
    async def scenario():
        pipeline = RecordingPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=8, batch_delay_s=0.1, queue_size=8)
        engine.start()
        good, bad, other = (
            engine.submit(request()),
            engine.submit(request(True)),
            engine.submit(request()),
        )
        outcomes = await asyncio.gather(
            good.future, bad.future, other.future, return_exceptions=True
        )
        await engine.drain(5)
        return pipeline.batches, outcomes

    batches, (good, bad, other) = run(scenario())
    assert batches == [3, 1, 1, 1]
    assert isinstance(good, Result) and isinstance(other, Result)
    assert isinstance(bad, InferenceFailed) and isinstance(bad.cause, ValueError)
    assert not bad.out_of_memory


def test_a_request_retried_alone_does_not_stream_its_rounds_twice():
    """A batch that fails after its draft was streamed is retried one request at a time:
    the retry runs the draft again, but its follower gets each round once."""

    class ReportingPipeline(RecordingPipeline):
        def __call__(self, requests):
            self.batches.append(len(requests))
            for r in requests:
                r.progress.partial(Result((1, 1), r.tasks), 0)
            if len(requests) > 1:
                raise ValueError("the batch failed after its draft")
            r.progress.partial(Result((1, 1), r.tasks), 1)
            return [Result((1, 1), r.tasks)]

    async def scenario():
        pipeline = ReportingPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=2, batch_delay_s=0.1, queue_size=4)
        engine.start()
        rounds: list[list[int]] = [[], []]
        jobs = [
            engine.submit(request(), on_partial=lambda _, n, i=i: rounds[i].append(n))
            for i in range(2)
        ]
        await asyncio.gather(*(job.future for job in jobs))
        await engine.drain(5)
        return pipeline.batches, rounds

    batches, rounds = run(scenario())
    assert batches == [2, 1, 1] and rounds == [[0, 1], [0, 1]]


def test_abandoned_requests_leave_the_queue_at_once_and_are_not_run():
    async def scenario():
        pipeline = RecordingPipeline()
        engine = BatchingEngine(
            pipeline, max_batch_size=8, batch_delay_s=0.1, queue_size=2, adaptive=False
        )
        engine.start()
        kept, dropped = engine.submit(request()), engine.submit(request())
        engine.cancel(dropped)  # what a handler does past its deadline or client
        waiting = len(engine.waiting)  # at once: no turn of the event loop in between
        engine.submit(request())  # the freed place is free again
        await kept.future
        await engine.drain(5)
        return pipeline.batches, waiting

    batches, waiting = run(scenario())
    assert waiting == 1
    assert batches == [2]


def test_drain_ends_promptly_after_the_last_waiting_request_left():
    """Its collector, waiting for a batch to fill, must end with the drain (a cancellation
    that coincides with the wake-up used to be lost, and the drain hung)."""

    async def scenario():
        engine = BatchingEngine(RecordingPipeline(), batch_delay_s=10, queue_size=4, adaptive=False)
        engine.start()
        job = engine.submit(request())
        await asyncio.sleep(0.05)  # the collector waits for the batch to fill
        engine.cancel(job)
        return await asyncio.wait_for(engine.drain(5), 3)

    assert asyncio.run(scenario()) is True


def test_a_stream_whose_client_left_before_its_first_object_cancels_its_job():
    """The body's generator never starts, so its own cleanup would never run: the response
    cancels the job, which leaves the queue and never reaches the model."""

    pipeline = RecordingPipeline()

    async def scenario():
        engine = BatchingEngine(pipeline, batch_delay_s=10, queue_size=4, adaptive=False)
        engine.start()
        job = engine.submit(request())

        async def body():
            await asyncio.Event().wait()  # no object before the client has gone
            yield b""

        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await JobStreamingResponse(body(), engine, job)(scope, receive, send)
        left = job.future.cancelled(), len(engine.waiting)
        await engine.drain(5)
        return left

    assert run(scenario()) == (True, 0)
    assert pipeline.batches == []


def test_a_batch_holds_requests_of_one_key_the_others_wait():
    """The service keys requests by canvas: portrait and landscape images never share an
    encoder batch; the oldest request's key goes first, order kept within a key."""

    def shaped(width: int, height: int) -> Request:
        return Request(Image.new("RGB", (width, height)), ("caption",))

    async def scenario():
        seen: list[list[tuple[int, int]]] = []

        def pipeline(requests: list[Request]) -> list[Result]:
            seen.append([r.image.size for r in requests])
            return [Result((1, 1), r.tasks) for r in requests]

        engine = BatchingEngine(
            pipeline,
            max_batch_size=2,
            batch_delay_s=0.2,
            queue_size=8,
            batch_key=lambda r: r.image.width >= r.image.height,
        )
        engine.start()
        sizes = [(8, 4), (4, 8), (9, 4), (4, 9), (10, 4)]
        jobs = [engine.submit(shaped(*size)) for size in sizes]
        await asyncio.gather(*(job.future for job in jobs))
        await engine.drain(5)
        return seen

    assert run(scenario()) == [[(8, 4), (9, 4)], [(4, 8), (4, 9)], [(10, 4)]]


# --- the adaptive window ---------------------------------------------------------------------
class GatedPipeline(RecordingPipeline):
    """Each batch blocks on the model thread until the test lets it finish: "the model is
    busy" is a state the test controls, not a duration."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def __call__(self, requests: list[Request]) -> list[Result]:
        self.started.release()
        self.release.acquire()
        return super().__call__(requests)


async def batch_started(pipeline: GatedPipeline) -> None:
    await asyncio.to_thread(pipeline.started.acquire)


def test_a_lone_request_on_an_idle_model_starts_without_waiting_for_company():
    """A 10 s window would hold it for 10 s if it were waited for; it is not."""

    async def scenario():
        pipeline = GatedPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=8, batch_delay_s=10, queue_size=8)
        engine.start()
        job = engine.submit(request())
        await batch_started(pipeline)  # reached the model with nobody else waiting
        waiting = len(engine.waiting)
        pipeline.release.release()
        await job.future
        await engine.drain(5)
        return pipeline.batches, waiting

    assert run(scenario()) == ([1], 0)


def test_requests_arriving_while_the_model_is_busy_form_the_next_batch():
    async def scenario():
        pipeline = GatedPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=4, batch_delay_s=10, queue_size=16)
        engine.start()
        first = engine.submit(request())
        await batch_started(pipeline)
        later = [engine.submit(request()) for _ in range(5)]  # the model is busy meanwhile
        pipeline.release.release()  # the first batch ends
        await batch_started(pipeline)  # the next: the first four waiting, at once
        pipeline.release.release()
        await batch_started(pipeline)  # the fifth: full batches of four came before
        pipeline.release.release()
        await asyncio.gather(first.future, *(job.future for job in later))
        await engine.drain(5)
        return pipeline.batches

    assert run(scenario()) == [1, 4, 1]


def test_after_batches_with_company_a_partly_full_batch_waits_for_its_callers():
    """Clients of a batch of three come back one by one: the first to return does not run
    alone (the model waits, bounded, while the recent batches held more); once the batches
    are single again, a lone request starts at once."""

    async def scenario():
        pipeline = RecordingPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=8, batch_delay_s=10, queue_size=8)
        engine.start()
        await asyncio.gather(*(engine.submit(request()).future for _ in range(3)))
        returning = []
        for _ in range(3):  # the same three callers, arriving one at a time
            returning.append(engine.submit(request()))
            await asyncio.sleep(0.01)
        await asyncio.gather(*(job.future for job in returning))
        await engine.drain(5)
        return pipeline.batches

    assert run(scenario()) == [3, 3]


def test_the_wait_for_company_is_bounded_by_the_delay_after_the_model_became_free():
    async def scenario():
        pipeline = RecordingPipeline()
        engine = BatchingEngine(pipeline, max_batch_size=8, batch_delay_s=0.05, queue_size=8)
        engine.start()
        await asyncio.gather(*(engine.submit(request()).future for _ in range(3)))
        after_company = engine.window(), engine.free_since
        for _ in range(4):  # single batches push the company of three out of memory
            await engine.submit(request()).future
        alone = engine.window(), engine.free_since
        await engine.drain(5)
        return after_company, alone

    ((target, deadline), freed), ((lone_target, _), _) = run(scenario())
    assert target == 3 and deadline == pytest.approx(freed + 0.05)
    assert lone_target == 1  # nothing to wait for: a lone request starts at once


def test_a_fixed_window_waits_for_a_full_batch_from_the_oldest_request():
    async def scenario():
        engine = BatchingEngine(
            RecordingPipeline(), max_batch_size=8, batch_delay_s=0.05, adaptive=False
        )
        engine.start()
        job = engine.submit(request())
        window = engine.window()
        await job.future
        await engine.drain(5)
        return window, job.enqueued

    (target, deadline), enqueued = run(scenario())
    assert target == 8 and deadline == pytest.approx(enqueued + 0.05)


# --- through HTTP ---------------------------------------------------------------------------
def post(url: str, tasks: str = "caption") -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post(
            "/predict", files={"image": ("s.png", encode(scene_image()))}, data={"tasks": tasks}
        )


def test_burst_beyond_the_queue_gets_503_and_the_rest_200(micro_checkpoint):
    # The first request opens a 5 s batch window; three fit in the queue, the rest are
    # refused on arrival, at once: before the batch starts.
    settings = Settings(
        checkpoint=micro_checkpoint,
        queue_size=3,
        batch_delay_ms=5000,
        batch_window="fixed",
        max_batch_size=8,
    )
    with running_server(settings) as server:
        engine = server.state.engine
        with ThreadPoolExecutor(3) as pool:
            accepted = [pool.submit(post, server.url) for _ in range(3)]
            until(lambda: len(engine.waiting) == 3, "the first three never queued")
            refused = [post(server.url) for _ in range(3)]
            assert len(engine.waiting) == 3 and not engine.running  # the batch has not begun
            statuses = [r.status_code for r in refused] + [f.result().status_code for f in accepted]
        assert statuses == [503, 503, 503, 200, 200, 200]
        for response in refused:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "queue_full"
        with httpx.Client(base_url=server.url) as client:
            metrics = client.get("/metrics").text
            assert client.get("/readyz").status_code == 200
        assert 'mad_requests_total{protocol="native",status="503",task="caption"} 3.0' in metrics
        assert 'mad_requests_total{protocol="native",status="200",task="caption"} 3.0' in metrics
        # One warm-up-free batch of three: the accepted requests were encoded together.
        assert "mad_batch_size_count 1.0" in metrics and "mad_batch_size_sum 3.0" in metrics


def test_request_past_its_deadline_gets_504(micro_checkpoint):
    # The body is in well before the deadline; the batch window outlasts it.
    settings = Settings(
        checkpoint=micro_checkpoint,
        request_timeout_s=1.0,
        batch_delay_ms=3000,
        batch_window="fixed",
    )
    with running_server(settings) as server:
        response = post(server.url)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/readyz").status_code == 200
