"""MAD Serve: the `mad` command line."""

__version__ = "0.1.0"
