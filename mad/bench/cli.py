"""`mad bench` (being written)."""


def bench():
    """Benchmarks (being written)."""
    raise SystemExit("mad bench: not available yet")
