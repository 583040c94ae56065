"""Requests in and out of the engine, as the HTTP status a client gets: queue them (503 when
the queue is full or the server stops) and wait for them within a deadline (504), cancelling
what is left on the way out (a client gone, a deadline passed). For requests of several
images, all of them or none.
"""

from __future__ import annotations

import asyncio

from model.pipeline import Request, Result
from service.anytime import BudgetTooSmall
from service.engine import BatchingEngine, Draining, Job, QueueFull
from service.errors import APIError


def submit_all(
    engine: BatchingEngine,
    requests: list[Request],
    budget_s: float | None = None,
    arrived: float | None = None,
) -> list[Job]:
    """Queue every image, or none (503 when the queue is full or the server is stopping;
    422 when the latency budget `budget_s`, from `arrived`, cannot hold one pass)."""
    jobs: list[Job] = []
    try:
        for request in requests:
            jobs.append(engine.submit(request, budget_s=budget_s, arrived=arrived))
    except BudgetTooSmall as exc:
        for job in jobs:
            job.future.cancel()
        raise APIError(422, "budget_too_small", str(exc)) from None
    except (QueueFull, Draining) as exc:
        for job in jobs:
            job.future.cancel()
        full = isinstance(exc, QueueFull)
        raise APIError(
            503,
            "queue_full" if full else "draining",
            "the server is at capacity; retry shortly" if full else "the server is shutting down",
            headers={"Retry-After": "1"},
        ) from None
    return jobs


async def wait_all(jobs: list[Job], remaining_s: float, limit_s: float) -> list[Result]:
    """Every job's Result, or an APIError; jobs not finished are cancelled either way."""
    try:
        waiting = asyncio.gather(*(asyncio.shield(job.future) for job in jobs))
        return list(await asyncio.wait_for(waiting, max(remaining_s, 0.0)))
    except TimeoutError:
        raise APIError(504, "timeout", f"not done within {limit_s:g} s") from None
    except Draining:
        raise APIError(
            503,
            "draining",
            "the server shut down before this request ran",
            headers={"Retry-After": "1"},
        ) from None
    except RuntimeError:
        raise APIError(500, "inference_failed", "the model failed on this request") from None
    finally:
        for job in jobs:  # still waiting: the engine skips it; running: its result is dropped
            if not job.future.done():
                job.future.cancel()
