"""Start-up failures a user can fix, and the one place `--device auto` is resolved.

A `StartupError` is an expected failure of configuration or environment: a missing file, a
missing GPU or library, options that do not go together. Its message is one sentence that
names the problem and the fix; the command line prints it as one line (no traceback unless
`mad --debug` or MAD_DEBUG=1) and exits non-zero. Anything else that escapes is a bug.
"""

from __future__ import annotations

import os
from pathlib import Path


class StartupError(RuntimeError):
    """An expected start-up failure; the message names the problem and the fix."""


# What a --device option (MAD_DEVICE) may say; a value outside it is a usage error (exit 2).
DEVICE_PATTERN = r"^(cpu|auto|cuda(:\d+)?)$"
DEVICES = "cpu, cuda, cuda:N or auto (CUDA when present, else CPU)"


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a CUDA device, else "cpu"; anything else as given."""
    if device == "auto":
        import torch  # here: the command line imports this module and starts without torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def install_hint(extra: str) -> str:
    """How to install one of the optional dependency groups in pyproject.toml."""
    return f"`pip install 'mad-serve[{extra}]'`, or `pip install -e '.[{extra}]'` in a checkout"


def output_file(path: Path, option: str) -> Path:
    """A file a command will write, its directory made now: a one-line error before the work
    rather than a traceback after it."""
    if path.is_dir():
        raise StartupError(f"{option} {path} is a directory; give a file path")
    output_dir(path.parent, option)
    return path


def output_dir(path: Path, option: str) -> Path:
    """A directory a command will write into, made now (with its parents)."""
    check_output_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"{option} {path} cannot be made ({exc.strerror})") from None
    return path


def check_output_dir(path: Path, option: str) -> None:
    """That a command could make and write the directory `path`, without making it (for a
    command whose own later checks may still refuse to start)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StartupError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK):
        raise StartupError(f"{option} {path}: {existing} is not writable")
