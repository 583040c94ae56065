"""Request dependencies: the service state, readiness, and the optional API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from service.engine import BatchingEngine
from service.errors import APIError
from service.state import LoadedModel, ServiceState

bearer = HTTPBearer(auto_error=False, description="Needed when the server sets MAD_API_KEY.")


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service  # set by create_app
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def key_matches(key: SecretStr, given: str) -> bool:
    # Constant-time comparison: response timing must not leak the key prefix.
    return secrets.compare_digest(given.encode(), key.get_secret_value().encode())


def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], state: StateDep
) -> None:
    key = state.settings.api_key
    if key is None:
        return
    if not key_matches(key, credentials.credentials if credentials is not None else ""):
        raise APIError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def not_ready() -> APIError:
    return APIError(503, "not_ready", "the model is still loading", headers={"Retry-After": "1"})


def get_model(state: StateDep) -> LoadedModel:
    """The loaded model; 503 while it is still loading."""
    if state.model is None:
        raise not_ready()
    return state.model


def get_engine(state: StateDep) -> BatchingEngine:
    """The engine of a server with its model loaded and warm; 503 before, and once the model
    is found broken (service/model_health.py). Not refused while draining: requests that
    arrive during the drain delay are served (the engine refuses new work only once uvicorn
    has finished its connections)."""
    if state.engine is None:
        raise not_ready()
    if state.health.problem is not None:
        raise APIError(
            503,
            "unhealthy",
            f"the model is not working ({state.health.problem}); retry on another server",
            headers={"Retry-After": "1"},
        )
    return state.engine


ModelDep = Annotated[LoadedModel, Depends(get_model)]
EngineDep = Annotated[BatchingEngine, Depends(get_engine)]
