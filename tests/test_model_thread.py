"""The model thread: calls run in order on one thread, and a stop never waits for a call
that is still running (a model load of minutes), in the server or at process exit."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

import service.app
from service.model_thread import ModelThread
from service.settings import Settings
from tests.helpers import running_server


def test_calls_run_in_order_on_one_named_thread():
    model_thread = ModelThread()
    seen: list[tuple[int, str]] = []
    futures = [
        model_thread.submit(lambda i: seen.append((i, threading.current_thread().name)), i)
        for i in range(5)
    ]
    failing = model_thread.submit(lambda: 1 / 0)
    for future in futures:
        future.result(5)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    assert seen == [(i, "mad-model") for i in range(5)]
    model_thread.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        model_thread.submit(print)


def test_a_shutdown_cancels_what_waits_and_does_not_wait_for_what_runs():
    model_thread = ModelThread()
    release, started = threading.Event(), threading.Event()

    def held() -> str:
        started.set()
        release.wait(30)
        return "done"

    running = model_thread.submit(held)
    waiting = model_thread.submit(lambda: "never")
    assert started.wait(5)
    tic = time.monotonic()
    model_thread.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - tic < 1
    assert waiting.cancelled()
    release.set()
    assert running.result(5) == "done"  # what ran finishes and is delivered


def test_a_stopped_server_exits_while_its_model_thread_is_busy():
    script = (
        "import threading, time; "
        "from service.model_thread import ModelThread, exit_now_if_running; "
        "began = threading.Event(); "
        "ModelThread().submit(lambda: (began.set(), time.sleep(60))); began.wait(30); "
        "print('exiting'); exit_now_if_running(0); print('not reached')"
    )
    tic = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 0 and done.stdout.strip() == "exiting", done.stderr
    assert time.monotonic() - tic < 20  # not the 60 s the thread is still sleeping


def test_elsewhere_a_busy_model_thread_leaves_the_exit_status_alone():
    script = (
        "import sys, threading, time; from service.model_thread import ModelThread; "
        "began = threading.Event(); "
        "ModelThread().submit(lambda: (began.set(), time.sleep(60))); began.wait(30); "
        "sys.exit(5)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=50)
    assert done.returncode == 5, done.stderr  # a failing test run stays failing


def test_the_server_stops_at_once_while_the_model_is_loading(micro_checkpoint, monkeypatch):
    release, loading = threading.Event(), threading.Event()

    def slow_load(settings):  # an ONNX export or TensorRT build at start-up takes minutes
        loading.set()
        release.wait(60)
        raise RuntimeError("released by the test")

    monkeypatch.setattr(service.app, "load_model", slow_load)
    try:
        with running_server(Settings(checkpoint=micro_checkpoint), ready=False) as server:
            assert loading.wait(30), "the load never started"
            tic = time.monotonic()
            server.stop(timeout_s=30)
            assert not server.thread.is_alive(), "the server waited for the load"
            assert time.monotonic() - tic < 10
    finally:
        release.set()
