"""Probes, metrics and the model's description."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from service.dependencies import ModelDep, StateDep, require_api_key
from service.metrics import CONTENT_TYPE
from service.schemas import ErrorResponse, Health, ModelDescription, Readiness

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the process answers and the model works",
    responses={503: {"model": Health, "description": "The model failed its self-test."}},
)
async def healthz(state: StateDep) -> Health | JSONResponse:
    problem = state.health.problem
    if problem is not None:
        return JSONResponse(Health(status="unhealthy", reason=problem).model_dump(), 503)
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    summary="Readiness: loaded, warm, working, not draining",
    responses={503: {"model": Readiness, "description": "Loading, unhealthy or draining."}},
)
async def readyz(state: StateDep) -> Readiness | JSONResponse:
    status, reason = state.readiness()
    if status != "ready":
        body = Readiness(status=status, reason=reason).model_dump(exclude_none=True)
        return JSONResponse(body, 503)
    return Readiness(status="ready")


# HEAD too, for probes and uptime checkers that want the status alone (out of the OpenAPI
# document, where a second operation of the same function would repeat its operationId).
for path, probe in (("/healthz", healthz), ("/readyz", readyz)):
    router.add_api_route(
        path,
        probe,
        methods=["HEAD"],
        include_in_schema=False,
        response_model=None,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get(
    "/v1/model",
    response_model=ModelDescription,
    summary="What is being served",
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def model_description(model: ModelDep) -> ModelDescription:
    return model.description
