"""Request dependencies: the service state, readiness, and the optional API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine import BatchingEngine
from service.errors import APIError
from service.settings import Settings
from service.state import LoadedModel, ServiceState

bearer = HTTPBearer(auto_error=False, description="Needed when the server sets MAD_API_KEY.")


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service  # set by create_app
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def api_key_accepted(settings: Settings, given: str) -> bool:
    """True when the server has no key, or `given` (the bearer token sent) is it."""
    key = settings.api_key
    # Constant-time comparison: response timing must not leak the key prefix.
    return key is None or secrets.compare_digest(given.encode(), key.get_secret_value().encode())


def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], state: StateDep
) -> None:
    given = credentials.credentials if credentials is not None else ""
    if not api_key_accepted(state.settings, given):
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
