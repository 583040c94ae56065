"""The one thread that runs everything torch does in the server (load, warm-up, batches).

A `concurrent.futures.Executor`, so the event loop hands it work with `run_in_executor`. Unlike
`ThreadPoolExecutor` its thread is a daemon: a shutdown does not wait for what the thread is
doing. That matters when the server is told to stop while the model is still loading (an ONNX
export or a TensorRT build takes minutes) or while a batch overran the drain: the standard
pool's workers are joined at interpreter exit, so the process would outlive its stop deadline
by the rest of that work. A server process that stopped while such a call runs then ends with
`exit_now_if_running`, skipping the interpreter's teardown: C++ destructors run under a thread
still inside torch abort the process ("terminate called without an active exception", status
134). Work is only ever cut short this way at exit, and what it leaves is never taken for
whole: an export lands by rename (service/model_cache.py) and TensorRT engines are listed in
the manifest only once all are built; the next start does that work again.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")
_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_THREADS: weakref.WeakSet[ModelThread] = weakref.WeakSet()


class ModelThread(Executor):
    """One daemon thread running submitted calls in order."""

    def __init__(self, name: str = "mad-model") -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # submit vs shutdown: nothing slips in after the end
        self.running = False  # inside a call
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        _THREADS.add(self)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the model thread has shut down")
            self._work.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work. The thread ends after the call it is running (and, unless
        `cancel_futures`, the calls queued); `wait` joins it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        work = self._work.get_nowait()
                    except queue.Empty:
                        break
                    if work is not None:
                        work[0].cancel()
            self._work.put(None)
        if wait:
            self._thread.join()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            self.running = True  # from the moment it is taken: a shutdown can no longer cancel it
            try:
                self._run(*work)
            finally:
                self.running = False
                # Not held (with its images) while the thread waits for the next call.
                del work

    @staticmethod
    def _run(
        future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # the caller's to handle, as in the standard pool
            future.set_exception(exc)
        else:
            future.set_result(result)


def exit_now_if_running(status: int = 0) -> None:
    """For a server whose stop is done: if a model thread is still inside a call (one the
    stop did not wait for), end the process now with `status`, before the interpreter's
    teardown aborts it; else return. Only servers call this: elsewhere (a test run, say) the
    process's own exit status must stand."""
    if any(thread.running for thread in list(_THREADS)):
        logging.shutdown()  # flush the log's last lines ("stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
