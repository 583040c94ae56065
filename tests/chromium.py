"""Headless Chromium driven over the DevTools protocol, for tests of the pages the server
serves: open a page, run JavaScript in it (as a user's clicks and typing would), wait for a
condition. No library needed: `--remote-debugging-pipe` speaks JSON messages, each ended by a
NUL byte, on file descriptors 3 (commands in) and 4 (replies and events out).

The network is blocked but for the loopback (a dead proxy; names resolve nowhere), so what a
page needs must come from the server, as on a machine without internet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OFFLINE = [
    "--proxy-server=127.0.0.1:9",  # loopback bypasses proxies; everything else goes nowhere
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    *OFFLINE,
]


class Browser:
    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        # Chromium expects the pipe ends at fds 3 and 4: bash moves them there (dash cannot
        # name fds above 9).
        move = f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}'
        args = [*FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        self.process = subprocess.Popen(
            ["bash", "-c", move, CHROMIUM, *args],
            pass_fds=(commands_read, replies_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def close(self) -> None:
        self.process.kill()
        self.process.wait(30)
        os.close(self._commands)
        os.close(self._replies)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, method: str, timeout_s: float = 60, **params: Any) -> dict[str, Any]:
        """One protocol command, on the open page's session once there is one."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        give_up = time.monotonic() + timeout_s
        while True:
            reply = self._read(give_up)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def _read(self, give_up: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > give_up:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        reply = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        """Poll `expression` until it is truthy; -> its value."""
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the page is not there yet (navigating)
                value = None
            if value:
                return value
            if time.monotonic() > give_up:
                raise TimeoutError(f"never true: {expression}")
            time.sleep(0.1)
