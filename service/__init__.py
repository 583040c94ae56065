"""The HTTP inference service (FastAPI)."""
