"""Dynamic batching: requests that arrive close together are run through the model together.

The event loop only queues and collects; the model runs on one dedicated thread
(service/model_thread.py: it owns the network, so no locking and no CUDA context juggling). The
batching window is adaptive: a request that finds the model idle and no company expected starts
at once; requests that arrive while the model is busy form the next batch, which starts when
the model is free. The model waits (at most `batch_delay` after it became free) only for a
batch that is partly full: fewer requests waiting than the recent batches held (the callers of
the batch that just ended are likely coming back). With `adaptive=False` the window is fixed: a
batch starts when it is full or when its oldest request has waited `batch_delay`. A batch holds
requests of one `batch_key` (the service's: the image's canvas, so portrait and landscape
images are not encoded together); the others wait for the next. Requests waiting for the model
count against a bounded queue, so overload answers at once (503) instead of piling up latency.

How many refinement steps each request gets (its latency budget, degradation under load) is
the planner's decision (service/anytime.py): on arrival and when its batch starts. The model
thread hands each request over as soon as its own last pass ran. A caller that stops
waiting (deadline, client gone) calls `engine.cancel(job)`: a waiting job leaves the queue at
once and never reaches the model; a running one gets no further passes and its result is
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from model.inference_io import Request, Result
from service.anytime import Admission, RefinementPlanner
from service.model_thread import ModelThread

log = logging.getLogger("mad.engine")

T = TypeVar("T")
RECENT_BATCHES = 4  # batches whose sizes say how much company to expect
Batch = Callable[[list[Request]], list[Result]]  # the pipeline: one Result per Request
P = TypeVar("P", bound=Batch)


class QueueFull(Exception):
    """The queue holds `queue_size` requests already."""


class Draining(Exception):
    """The engine is shutting down and takes no new work."""


class InferenceFailed(RuntimeError):
    """The model raised on this request, run on its own; `cause` is what it raised."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"inference failed: {type(cause).__name__}: {cause}")
        self.cause = cause

    @property
    def out_of_memory(self) -> bool:
        return is_out_of_memory(self.cause)


def is_out_of_memory(exc: BaseException) -> bool:
    """GPU (torch) or host memory exhausted: may pass on a retry, unlike other errors."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError)


@dataclass(eq=False)  # jobs are compared by identity (the queue removes a given one)
class Job:
    request: Request
    future: asyncio.Future[Result]
    enqueued: float = field(default_factory=time.perf_counter)
    queue_seconds: float = 0.0
    admission: Admission | None = None  # the planner's decisions (its plan once the batch starts)
    on_partial: Callable[[Result, int], None] | None = None  # called on the event loop


class JobProgress:
    """The pipeline's view of a job (model.inference_io.Progress), from the model thread: results
    go to the event loop; the job is cancelled once its future is done (the caller gave up).

    It holds its job weakly: the job's request holds it, and a cycle through the request
    would keep the image (hundreds of MB for a large photo) until Python's cyclic collector
    ran, requests later. A job no one holds any more is one no one waits for."""

    def __init__(
        self,
        job: Job,
        loop: asyncio.AbstractEventLoop,
        settle: Callable[[Job, Result], None],
    ) -> None:
        self._job, self.loop, self.settle = weakref.ref(job), loop, settle
        self.partials = job.on_partial is not None
        self.rounds_sent = -1  # a request retried alone after its batch failed repeats them

    def cancelled(self) -> bool:
        job = self._job()
        return job is None or job.future.done()

    def partial(self, result: Result, round: int) -> None:
        job = self._job()
        if job is not None and job.on_partial is not None and round > self.rounds_sent:
            self.rounds_sent = round
            self.loop.call_soon_threadsafe(job.on_partial, result, round)

    def finished(self, result: Result) -> None:
        job = self._job()
        if job is not None:
            self.loop.call_soon_threadsafe(self.settle, job, result)


class BatchingEngine:
    def __init__(
        self,
        pipeline: Batch | None = None,
        *,
        max_batch_size: int = 8,
        batch_delay_s: float = 0.005,
        queue_size: int = 64,
        on_batch: Callable[[int], None] | None = None,
        on_outcome: Callable[[BaseException | None], None] | None = None,
        batch_key: Callable[[Request], Hashable] | None = None,
        planner: RefinementPlanner | None = None,
        adaptive: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.batch_key: Callable[[Request], Hashable] = batch_key or (lambda request: None)
        self.planner = planner
        self.max_batch_size, self.batch_delay_s = max_batch_size, batch_delay_s
        self.adaptive = adaptive
        # The sizes of the last RECENT_BATCHES batches (how much company to expect) and when
        # the model last became free (what bounds its wait for company).
        self.recent_batches: deque[int] = deque(maxlen=RECENT_BATCHES)
        self.free_since = time.perf_counter()
        self.queue_size = queue_size
        self.on_batch = on_batch or (lambda size: None)
        # Once per request the model ran: None, or what it raised (service/model_health.py).
        self.on_outcome = on_outcome or (lambda error: None)
        self.waiting: deque[Job] = deque()
        self.running = 0  # requests inside the model right now
        self.draining = False
        self._arrived: asyncio.Event | None = None
        self._collector: asyncio.Task[None] | None = None
        self._executor = ModelThread()

    # --- lifecycle --------------------------------------------------------------------------
    async def load(self, factory: Callable[[], P]) -> P:
        """Build the pipeline on the model thread. On CPU this matters for speed: every
        thread that runs torch ops gets its own OpenMP team, and a second team (the loader's)
        made each request ~40% slower on 2 cores. -> the pipeline."""
        pipeline = await self.run_on_model_thread(factory)
        self.pipeline = pipeline
        return pipeline

    async def run_on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` where the model lives (warm-up, compilation) and wait for it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_alone(self, request: Request) -> Result:
        """Run one request now, outside the queue, and raise what the model raises (the
        self-test of service/model_health.py)."""
        [result] = await self.run_on_model_thread(self._infer, [request])
        return result

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._collector = asyncio.create_task(self._collect(), name="mad-batch-collector")

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking work, finish what was accepted. -> True when nothing was left over."""
        self.draining = True
        if self._arrived is not None:
            self._arrived.set()  # a batch waiting to fill goes now; an idle collector ends
        give_up = time.monotonic() + timeout_s
        while (self.waiting or self.running) and time.monotonic() < give_up:
            await asyncio.sleep(0.01)
        finished = not (self.waiting or self.running)
        if self._collector is not None:
            # With nothing left it ends by itself; cancelled only when the model overran. (Not
            # cancelled right after the event is set: Python 3.11's wait_for can swallow a
            # cancellation that coincides with its wait ending, and the collector would hang.)
            await asyncio.wait({self._collector}, timeout=1.0 if finished else 0.0)
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        for job in self.waiting:  # only after the timeout: nothing else fails them
            if not job.future.done():
                job.future.set_exception(Draining("the server shut down"))
        self.waiting.clear()
        # Not joined: a load (or a batch that overran) still on the model thread would hold
        # the stop up to its end; the thread is a daemon, so the process need not wait.
        self._executor.shutdown(wait=False, cancel_futures=True)
        return finished

    # --- requests ---------------------------------------------------------------------------
    def submit(
        self,
        request: Request,
        *,
        budget_s: float | None = None,
        arrived: float | None = None,
        on_partial: Callable[[Result, int], None] | None = None,
    ) -> Job:
        """Queue a request; await `job.future` for its Result. budget_s: its latency budget,
        counted from `arrived` (time.perf_counter(); default now); on_partial(result, round):
        called with its results after the draft and every refinement round. Raises QueueFull,
        Draining, or service.anytime.BudgetTooSmall."""
        if self.draining:
            raise Draining("the server is shutting down")
        if len(self.waiting) >= self.queue_size:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already")
        now = time.perf_counter()
        admission = None
        if self.planner is not None:
            admission = self.planner.admit(
                request.tasks,
                request.refine_steps,
                budget_s,
                now if arrived is None else arrived,
                now,
                len(self.waiting),
            )
        future = asyncio.get_running_loop().create_future()
        job = Job(request, future, now, 0.0, admission, on_partial)
        self.waiting.append(job)
        self._started().set()
        return job

    def cancel(self, job: Job) -> None:
        """Give up on a job: a waiting one leaves the queue now (it never runs), a running
        one's result is dropped. At once, not when the next batch forms or the loop next runs
        the future's callbacks: the queue bound and `mad_queue_depth` count only requests
        someone waits for, and a request refused for a full queue must leave none behind."""
        job.future.cancel()
        with contextlib.suppress(ValueError):  # running already, or finished
            self.waiting.remove(job)

    # --- the collector ----------------------------------------------------------------------
    def _started(self) -> asyncio.Event:
        """The event that wakes the collector; it exists from `start()` on."""
        if self._arrived is None:
            raise RuntimeError("the engine is not started: call start() first")
        return self._arrived

    def _loaded(self) -> Batch:
        if self.pipeline is None:
            raise RuntimeError("the engine has no pipeline: pass one or call load() first")
        return self.pipeline

    def _infer(self, requests: list[Request]) -> list[Result]:
        """One model call, on the model thread."""
        try:
            return self._loaded()(requests)
        except torch.OutOfMemoryError:
            # Hand torch's cached blocks back, so a retry with fewer images can fit.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise

    async def _collect(self) -> None:
        while not (self.draining and not self.waiting):
            batch = await self._next_batch()
            if batch:
                await self._run(batch)
            del batch  # not held (with its images) while waiting for the next one

    async def _next_batch(self) -> list[Job]:
        arrived = self._started()
        self._discard_abandoned()
        while not self.waiting:
            if self.draining:
                return []
            arrived.clear()
            await arrived.wait()
            self._discard_abandoned()
        target, deadline = self.window()
        while len(self.waiting) < target and not self.draining:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), remaining)
        self._discard_abandoned()
        return self._take_batch()

    def window(self) -> tuple[int, float]:
        """-> (how many requests to wait for, until when at the latest).

        Fixed: a full batch, until the oldest request has waited `batch_delay`. Adaptive: as
        many as the largest recent batch (1 when requests came one at a time: no wait at all),
        until `batch_delay` after the model became free; after a long idle spell that has
        passed, so a lone request starts at once."""
        if not self.adaptive:
            return self.max_batch_size, self.waiting[0].enqueued + self.batch_delay_s
        expected = max(self.recent_batches, default=1)
        return min(expected, self.max_batch_size), self.free_since + self.batch_delay_s

    def _take_batch(self) -> list[Job]:
        """Up to max_batch_size waiting jobs with the oldest one's batch key, oldest first."""
        if not self.waiting:
            return []
        key = self.batch_key(self.waiting[0].request)
        batch: list[Job] = []
        rest: deque[Job] = deque()
        for job in self.waiting:
            fits = len(batch) < self.max_batch_size and self.batch_key(job.request) == key
            (batch if fits else rest).append(job)
        self.waiting = rest
        return batch

    def _discard_abandoned(self) -> None:
        """Drop requests whose caller gave up (deadline passed, client gone)."""
        if any(job.future.done() for job in self.waiting):
            self.waiting = deque(job for job in self.waiting if not job.future.done())

    def _prepare(self, job: Job, batch: list[Job], now: float) -> None:
        """Fix the job's refinement steps (the planner's plan) and let the pipeline report to
        it."""
        request, admission = job.request, job.admission
        if self.planner is not None and admission is not None:
            batch_tasks = tuple(dict.fromkeys(t for mate in batch for t in mate.request.tasks))
            encoded = sum(self.planner.views(mate.request.tasks) for mate in batch)
            admission.plan = self.planner.plan(
                request.tasks,
                request.refine_steps,
                admission,
                len(batch),
                now,
                batch_tasks,
                encoded,
            )
            request = replace(request, refine_steps=admission.plan.steps)
        progress = JobProgress(job, asyncio.get_running_loop(), self._settle)
        job.request = replace(request, progress=progress)

    async def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            job.queue_seconds = started - job.enqueued
            self._prepare(job, batch, started)
        self.running = len(batch)
        self.on_batch(len(batch))
        try:
            results = await self.run_on_model_thread(self._infer, [j.request for j in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._failed(batch[0], exc)
            else:
                # One bad request must not fail its batch mates, and a batch too big for the
                # free GPU memory may fit one image at a time: retry each on its own.
                log.warning(
                    "batch of %d failed (%s); retrying one by one", len(batch), type(exc).__name__
                )
                for job in batch:
                    if not job.future.done():  # answered before the failure, or gone
                        await self._run_alone(job)
        else:
            for job, result in zip(batch, results, strict=True):
                self._settle(job, result)
        finally:
            self.running = 0
            self.recent_batches.append(len(batch))
            self.free_since = time.perf_counter()

    async def _run_alone(self, job: Job) -> None:
        if job.future.done():  # its caller gave up while the batch ran
            return
        try:
            [result] = await self.run_on_model_thread(self._infer, [job.request])
        except Exception as exc:
            self._failed(job, exc)
        else:
            self._settle(job, result)

    def _failed(self, job: Job, exc: Exception) -> None:
        log.error("inference failed", exc_info=exc)
        self._settle(job, InferenceFailed(exc))

    def _settle(self, job: Job, outcome: Result | InferenceFailed) -> None:
        # A job handed over early (service/engine.JobProgress) is settled twice: its success
        # is recorded twice, which changes nothing (model_health counts failures in a row).
        self.on_outcome(outcome.cause if isinstance(outcome, InferenceFailed) else None)
        if job.future.done():  # handed over already, or the caller gave up meanwhile
            return
        if isinstance(outcome, Exception):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
