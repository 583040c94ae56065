"""`mad serve --workers N`: N server processes on one socket, each with its own model.

uvicorn's supervisor runs the workers and restarts one that dies, except one that exits
with its start-up failure status: then it stops them all. A worker whose model cannot load
exits with that status, after writing why to a file `mad serve` named, which `mad serve`
then prints as its one line.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from model.startup import StartupError
from service.app import create_app
from service.model_thread import exit_now_if_running
from service.server import uvicorn_options
from service.settings import Settings

ERROR_FILE_VARIABLE = "MAD_WORKER_ERROR_FILE"  # not a setting: serve_workers sets it


def create_worker_app() -> FastAPI:
    """Import-string factory for uvicorn's workers: each reads MAD_* itself."""
    from service.logging import configure

    settings = Settings()
    configure(settings.log_level)
    app = create_app(settings)
    app.state.service.stop_server = exit_worker
    # uvicorn runs this worker's server and then lets the process end: a model load still
    # under way then would abort the teardown (service/model_thread.py).
    atexit.register(exit_now_if_running, 0)
    return app


def exit_worker(message: str) -> NoReturn:
    """Hand the message to `mad serve` and exit with the start-up failure status, so that
    uvicorn stops the other workers instead of restarting this one forever."""
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if path:
        Path(path).write_text(message)
    for handler in logging.getLogger("mad").handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(STARTUP_FAILURE)  # nothing to finish: the model never served a request


def serve_workers(settings: Settings, sock: socket.socket, log_config: dict[str, Any]) -> None:
    """Run `settings.workers` workers on the bound `sock` until a signal stops them; a worker
    whose model failed to load ends it with a StartupError carrying the worker's message."""
    with tempfile.TemporaryDirectory(prefix="mad-serve-") as scratch:
        error_file = Path(scratch) / "worker-error"
        os.environ.update(settings.env())  # each worker rebuilds its settings from these
        os.environ[ERROR_FILE_VARIABLE] = str(error_file)
        config = uvicorn.Config(
            "service.workers:create_worker_app",
            factory=True,
            workers=settings.workers,
            **uvicorn_options(settings),
            log_config=log_config,
        )
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
        if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
            raise StartupError(
                error_file.read_text()
                if error_file.is_file()
                else "a worker failed to start; its log lines above say why"
            )
