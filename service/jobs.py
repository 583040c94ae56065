"""Waiting for an engine job on behalf of an HTTP request: until its result, its deadline, or
its client leaving, whichever comes first.

Every route that runs the model waits through `wait_for_job`, so a request nobody waits for
any more never reaches the model (or has its result dropped when it already runs); the request
is counted as 499, not 200 (service/middleware.py).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import Receive

from model.pipeline import Result
from service.engine import Job


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def disconnected(receive: Receive) -> None:
    """Return once the client has gone. Only once the body has been read: after it, receive()
    has nothing left to give but the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def wait_for_job(job: Job, request: Request, timeout_s: float) -> Result:
    """The job's Result. Raises TimeoutError after `timeout_s`, ClientGone when the client
    leaves first, or what the job failed with (engine.InferenceFailed, engine.Draining). In
    every case but a result the job is cancelled: the engine drops it while it waits and
    discards its result if it is running.

    Call it after the request body has been read (FastAPI reads forms and JSON bodies before
    the endpoint runs)."""
    client_left = asyncio.ensure_future(disconnected(request.receive))
    try:
        done, _ = await asyncio.wait(
            (job.future, client_left),
            timeout=max(timeout_s, 0.0),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if client_left in done:
            raise ClientGone
        if job.future in done:
            return job.future.result()
        raise TimeoutError
    finally:
        client_left.cancel()
        job.future.cancel()  # nothing when it has a result
