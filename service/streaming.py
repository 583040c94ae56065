"""Progressive results: one request's result after the draft, after each refinement round,
then the final answer, streamed as NDJSON (`Accept: application/x-ndjson`) or as Server-Sent
Events (`Accept: text/event-stream`).

Every object but the last has the response's shape plus `partial` ({stage, round}); the last
is exactly the non-streamed response. An error after the stream has begun (the deadline, the
model failing) is a last object `{"error": {...}}` (SSE: `event: error`), since the status
line has gone out already. A client that disconnects cancels the job: the model thread runs
no further pass for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from model.inference_io import Result
from service.engine import BatchingEngine, Draining, InferenceFailed, Job
from service.errors import error_body
from service.jobs import failure_error, not_done_within
from service.schemas import PredictResponse

Format = Literal["ndjson", "sse"]
MEDIA_TYPES: dict[Format, str] = {"ndjson": "application/x-ndjson", "sse": "text/event-stream"}
# (result, round) -> its response; round None: the final one
Respond = Callable[[Result, int | None], Awaitable[PredictResponse]]


def stream_format(accept: str) -> Format | None:
    """The streaming format an Accept header asks for, or None (a plain JSON answer).

    A stream is sent only when a streaming type is named (not through */*) with q > 0 and JSON
    is not preferred over it (application/json, application/* or */* with a higher q); of two
    streaming types, the higher q wins, then the one named first."""
    ranges = [media_range(part) for part in accept.split(",")]
    named = [
        (q, -i, name)
        for i, (media, q) in enumerate(ranges)
        for name, media_type in MEDIA_TYPES.items()
        if media == media_type and q > 0
    ]
    if not named:
        return None
    q, _, name = max(named)
    json_q = next(
        (
            q
            for wanted in ("application/json", "application/*", "*/*")
            for m, q in ranges
            if m == wanted
        ),
        None,
    )  # the most specific range that matches JSON
    return name if json_q is None or q >= json_q else None


def media_range(part: str) -> tuple[str, float]:
    """One element of an Accept header ("text/event-stream;q=0.5") -> (media type, q); a
    malformed q counts as 0."""
    media, *params = part.split(";")
    q = 1.0
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
    return media.strip().lower(), (q if 0.0 <= q <= 1.0 else 0.0)  # NaN and out of range: 0


class PartialResults:
    """What the engine hands over for one job, in order, on the event loop: (result, round)
    per partial result, then None once the job's future is done."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Result, int] | None] = asyncio.Queue()

    def put(self, result: Result, round: int) -> None:
        self.queue.put_nowait((result, round))

    def follow(self, job: Job) -> None:
        job.future.add_done_callback(lambda _: self.queue.put_nowait(None))


async def events(
    job: Job, partials: PartialResults, respond: Respond, deadline: float, timeout_s: float
) -> AsyncIterator[tuple[str, dict[str, Any] | PredictResponse]]:
    """(event name, object) until the final answer or an error."""
    while True:
        try:
            item = await asyncio.wait_for(
                partials.queue.get(), max(deadline - time.perf_counter(), 0.0)
            )
        except TimeoutError:
            yield "error", error_body(504, not_done_within(timeout_s), "timeout")
            return
        if item is not None:
            result, round = item
            yield ("draft" if round == 0 else "refine"), await respond(result, round)
            continue
        try:
            final = job.future.result()
        except (Draining, InferenceFailed) as exc:
            error = failure_error(exc)
            yield "error", error_body(error.status, error.message, error.code)
        else:
            yield "final", await respond(final, None)
        return


class JobStreamingResponse(StreamingResponse):
    """A stream of one job's results that cancels the job however the stream ends (the
    deadline, the client gone): a waiting job never runs, a running one gets no further
    passes. Here rather than in the body's generator, whose cleanup never runs when the
    client has gone by the time the response starts. (Starlette notices a disconnect before
    the first object only on the ASGI 2.3 path, uvicorn's; on 2.4 it notices at the first
    send.)"""

    def __init__(self, content: AsyncIterator[bytes], engine: BatchingEngine, job: Job, **kw: Any):
        super().__init__(content, **kw)
        self.engine, self.job = engine, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.job)  # a finished job: nothing to cancel


def encode(form: Format, event: str, body: dict[str, Any] | PredictResponse) -> bytes:
    """One object as an NDJSON line or an SSE message named `event`."""
    if isinstance(body, PredictResponse):
        text = body.model_dump_json(exclude_none=True)
    else:
        text = json.dumps(body)
    if form == "sse":
        return f"event: {event}\ndata: {text}\n\n".encode()
    return (text + "\n").encode()


def streaming_response(
    form: Format,
    engine: BatchingEngine,
    job: Job,
    partials: PartialResults,
    respond: Respond,
    deadline: float,
    timeout_s: float,
) -> StreamingResponse:
    partials.follow(job)

    async def body() -> AsyncIterator[bytes]:
        async for event, obj in events(job, partials, respond, deadline, timeout_s):
            yield encode(form, event, obj)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
    return JobStreamingResponse(body(), engine, job, media_type=MEDIA_TYPES[form], headers=headers)
