"""Start-up failures a user can fix, and the one place `--device auto` is resolved.

A `StartupError` is an expected failure of configuration or environment: a missing file, a
missing GPU or library, options that do not go together. Its message is one sentence that
names the problem and the fix; the command line prints it as one line (no traceback unless
`mad --debug` or MAD_DEBUG=1) and exits non-zero. Anything else that escapes is a bug.
"""

from __future__ import annotations


class StartupError(RuntimeError):
    """An expected start-up failure; the message names the problem and the fix."""


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a CUDA device, else "cpu"; anything else as given."""
    if device == "auto":
        import torch  # here: the command line imports this module and starts without torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def install_hint(extra: str) -> str:
    """How to install one of the optional dependency groups in pyproject.toml."""
    return f"`pip install 'mad-serve[{extra}]'`, or `pip install -e '.[{extra}]'` in a checkout"
