"""Requests in and out of the engine, as the HTTP status a client gets: queue them (503 when
the queue is full or the server stops) and wait for them until their results, their deadline
(504), or their client leaving (499), whichever comes first. For requests of several images,
all of them or none.

Every route that runs the model goes through here (POST /predict, the v2 protocol over REST
and gRPC), so whatever ends the wait cancels the jobs left: the engine drops a job that still
waits (it never reaches the model) and discards the result of one that runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.types import Receive

from model.inference_io import Request, Result
from service.anytime import BudgetTooSmall
from service.engine import BatchingEngine, Draining, InferenceFailed, Job, QueueFull
from service.errors import CLIENT_CLOSED, APIError


def submit_all(
    engine: BatchingEngine,
    requests: list[Request],
    budget_s: float | None = None,
    arrived: float | None = None,
    on_partial: Callable[[Result, int], None] | None = None,
) -> list[Job]:
    """Queue every image, or none (503 when the queue is full or the server is stopping;
    422 when the latency budget `budget_s`, from `arrived`, cannot hold one pass).
    on_partial: as BatchingEngine.submit's, for every job."""
    jobs: list[Job] = []
    try:
        for request in requests:
            job = engine.submit(request, budget_s=budget_s, arrived=arrived, on_partial=on_partial)
            jobs.append(job)
    except BudgetTooSmall as exc:
        for job in jobs:
            engine.cancel(job)
        raise APIError(422, "budget_too_small", str(exc)) from None
    except (QueueFull, Draining) as exc:
        for job in jobs:
            engine.cancel(job)
        full = isinstance(exc, QueueFull)
        raise APIError(
            503,
            "queue_full" if full else "draining",
            "the server is at capacity; retry shortly" if full else "the server is shutting down",
            headers={"Retry-After": "1"},
        ) from None
    return jobs


def not_done_within(limit_s: float) -> str:
    """A 504's message: seconds, or milliseconds for a deadline under a second."""
    return (
        f"not done within {limit_s:g} s"
        if limit_s >= 1
        else f"not done within {limit_s * 1000:g} ms"
    )


def failure_error(exc: Draining | InferenceFailed) -> APIError:
    """What a client gets when its job's future raised: 503 when the server shut down before
    it ran or the model ran out of memory (a retry may pass), 500 when the model failed."""
    if isinstance(exc, Draining):
        return APIError(
            503,
            "draining",
            "the server shut down before this request ran",
            headers={"Retry-After": "1"},
        )
    if exc.out_of_memory:
        return APIError(
            503, "out_of_memory", "the model ran out of memory", headers={"Retry-After": "1"}
        )
    return APIError(500, "inference_failed", "the model failed on this request")


async def disconnected(receive: Receive) -> None:
    """Return once the client has gone. Only once the body has been read: after it, receive()
    has nothing left to give but the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_all(
    engine: BatchingEngine,
    jobs: list[Job],
    remaining_s: float,
    limit_s: float,
    client: HTTPRequest | None = None,
) -> list[Result]:
    """Every job's Result, or an APIError: 504 after `remaining_s`, 499 when `client` (an
    HTTP request whose body has been read) disconnects first, 503 when the server shut down
    or the model ran out of memory, 500 when the model failed. Jobs not finished are
    cancelled either way (also when the caller is cancelled: a gRPC client gone)."""
    results = asyncio.gather(*(asyncio.shield(job.future) for job in jobs))
    client_left = asyncio.ensure_future(disconnected(client.receive)) if client else None
    try:
        waited: set[asyncio.Future[Any]] = {results}
        if client_left is not None:
            waited.add(client_left)
        done, _ = await asyncio.wait(
            waited, timeout=max(remaining_s, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
        if client_left in done:
            raise APIError(CLIENT_CLOSED, "client_closed_request", "the client went away")
        if results not in done:
            raise APIError(504, "timeout", not_done_within(limit_s))
        return list(results.result())
    except (Draining, InferenceFailed) as exc:
        raise failure_error(exc) from None
    finally:
        if client_left is not None:
            client_left.cancel()
        results.cancel()
        # Retrieved, so that asyncio does not log it: nobody waits for it any more.
        results.add_done_callback(lambda f: f.cancelled() or f.exception())
        for job in jobs:  # still waiting: the engine drops it; running: its result is dropped
            engine.cancel(job)
