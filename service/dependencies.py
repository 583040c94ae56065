"""Request dependencies: the service state, readiness, and the optional API key."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError
from service.state import ServiceState

bearer = HTTPBearer(auto_error=False, description="Needed when the server sets MAD_API_KEY.")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                    state: ServiceState = Depends(get_state)) -> None:
    key = state.settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    # Constant-time comparison: response timing must not leak the key prefix.
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise APIError(401, "unauthorized",
                       "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})


def get_ready_state(state: ServiceState = Depends(get_state)) -> ServiceState:
    """The state of a server with its model loaded. Not refused while draining: a request
    that reached us before the shutdown signal is in flight and must still be answered
    (the engine refuses new work only once uvicorn has finished its connections)."""
    if state.engine is None:
        raise APIError(503, "not_ready", "the model is still loading",
                       headers={"Retry-After": "1"})
    return state
