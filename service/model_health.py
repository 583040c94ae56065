"""Whether the model still works, judged from the requests it runs.

A failure of one request says little (a bad input, a transient out-of-memory error), so the
engine's outcomes are counted: after MAX_CONSECUTIVE_FAILURES failures in a row, with no
success between them, the model runs a self-test (the warm-up request, through the same
pipeline). If the self-test passes, the failures belonged to those requests and counting starts
again. If it fails too, the model is broken (a lost GPU, a corrupted CUDA context): `problem`
says why, and from then on /healthz and /readyz answer 503, so that an orchestrator takes the
server out of service and restarts it, and /predict answers 503 at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("mad.service")


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ModelHealth:
    def __init__(self, max_consecutive_failures: int) -> None:
        self.max_consecutive_failures = max_consecutive_failures  # 0: never self-test
        self.failures_in_a_row = 0
        self.problem: str | None = None  # set once the self-test has failed; never cleared
        self.self_test: Callable[[], Awaitable[object]] | None = None  # set once loaded
        self._checking: asyncio.Task[None] | None = None

    def record(self, error: BaseException | None) -> None:
        """One request's outcome from the engine: None, or what the model raised."""
        if error is None:
            self.failures_in_a_row = 0
            return
        self.failures_in_a_row += 1
        if (
            self.max_consecutive_failures
            and self.failures_in_a_row >= self.max_consecutive_failures
            and self.problem is None
            and self._checking is None
            and self.self_test is not None
        ):
            self._checking = asyncio.create_task(
                self._check(self.self_test, error), name="mad-self-test"
            )

    async def _check(self, self_test: Callable[[], Awaitable[object]], last: BaseException) -> None:
        count = self.failures_in_a_row
        try:
            await self_test()
        except Exception as exc:
            self.problem = (
                f"{count} requests failed in a row (last: {describe(last)}) "
                f"and the self-test failed too ({describe(exc)})"
            )
            log.error(
                "model unhealthy: %s; /healthz and /readyz answer 503 from now on, so that the "
                "orchestrator restarts the server",
                self.problem,
                extra={"failures_in_a_row": count},
            )
        else:
            self.failures_in_a_row = 0  # before the log line, which a watcher may act on
            log.warning(
                "%d requests failed in a row, but the self-test passed: the failures belong "
                "to those requests",
                count,
                extra={"failures_in_a_row": count, "last_error": describe(last)},
            )
        finally:
            self._checking = None
