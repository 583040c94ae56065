"""The Open Inference Protocol's gRPC service, `inference.GRPCInferenceService` (generated
from service/proto/grpc_predict_v2.proto), and the standard gRPC health service
(grpc.health.v1), on MAD_GRPC_PORT.

The server runs on the HTTP app's event loop (grpc.aio), so it shares the engine: requests
of both transports batch together and count against one queue, one deadline setting, one
API key (metadata `authorization: Bearer <key>`), one set of metrics (protocol="v2_grpc").
The protocol itself is service/v2_infer.py, shared with REST; its errors carry HTTP
statuses, mapped here to gRPC codes.

Life cycle: the port is bound at start-up, before the model loads (a port in use fails the
start at once), and serves from then on, as HTTP does: ServerReady false and health
NOT_SERVING until the model is warm. From the shutdown signal on, health says NOT_SERVING,
new calls are refused and calls in flight get REQUEST_TIMEOUT_S to finish, while the HTTP
side drains.

Import this module only when gRPC is on: a process can hold only one definition of the
`inference` protobuf package, and a client library (tritonclient.grpc) brings its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from model.startup import StartupError
from service import v2_infer
from service.dependencies import api_key_accepted
from service.errors import APIError
from service.logging import request_id_var
from service.middleware import REQUEST_ID
from service.proto import grpc_predict_v2_pb2 as pb
from service.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.server import listen
from service.state import ServiceState
from service.v2_infer import InferRequest, InferResponse, InputTensor
from service.v2_parameters import bad_request, check_tensor_parameters
from service.v2_tensors import TensorDataError, deserialize_bytes

log = logging.getLogger("mad.grpc")
T = TypeVar("T")

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# An APIError's HTTP status -> the gRPC code that means the same.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,  # a latency budget too small for one pass
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
QUIET_METHODS = ("ServerLive", "ServerReady", "ModelReady")  # probes: debug level only
STATE_POLL_S = 0.1  # how soon health and the drain follow the service's state


@dataclass
class Call:
    """One RPC, for its log line and metrics: status is the HTTP equivalent of its outcome."""

    method: str
    status: int = 200
    tasks: tuple[str, ...] = ()


# --- messages <-> the protocol ----------------------------------------------------------------
def parameter_value(name: str, parameter: pb.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    if kind is None:
        raise bad_request(f"parameter {name!r} has no value")
    return getattr(parameter, kind)


def parameters(entries: Any) -> dict[str, Any]:
    return {name: parameter_value(name, value) for name, value in entries.items()}


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise bad_request(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs"
        )
    inputs = []
    for i, tensor in enumerate(message.inputs):
        check_tensor_parameters("input", tensor.name, parameters(tensor.parameters))
        elements = None
        if tensor.datatype == "BYTES":
            if raw and tensor.HasField("contents"):
                raise bad_request(f"input {tensor.name!r} has both contents and raw_input_contents")
            try:
                contents = tensor.contents.bytes_contents
                elements = deserialize_bytes(raw[i]) if raw else list(contents)
            except TensorDataError as exc:
                raise bad_request(f"input {tensor.name!r}: {exc}") from None
        inputs.append(InputTensor(tensor.name, tensor.datatype, list(tensor.shape), elements))
    outputs = [v2_infer.requested_output(o.name, parameters(o.parameters)) for o in message.outputs]
    return InferRequest(
        message.model_name,
        message.model_version,
        message.id,
        parameters(message.parameters),
        inputs,
        outputs or None,  # none listed: every output
    )


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor, _ in response.outputs:  # gRPC always carries raw contents
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(tensor.raw())
    return message


def model_metadata(metadata: dict[str, Any]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=metadata["versions"],
        platform=metadata["platform"],
        inputs=[tensor(**t) for t in metadata["inputs"]],
        outputs=[tensor(**t) for t in metadata["outputs"]],
    )


# --- the service ------------------------------------------------------------------------------
class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServiceState, version: str) -> None:
        self.state, self.version = state, version

    async def answer(
        self, context: Any, call: Call, handler: Callable[[], Awaitable[T]], key: bool = True
    ) -> T:
        """Run `handler` as one RPC: request id, API key, errors as gRPC statuses, a log line."""
        start = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        incoming = str(metadata.get("x-request-id", ""))
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        request_id_var.set(request_id)
        await context.send_initial_metadata((("x-request-id", request_id),))
        try:
            if key and not api_key_accepted(self.state.settings, bearer_token(metadata)):
                raise APIError(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send metadata 'authorization: Bearer <key>'",
                )
            return await handler()
        except APIError as exc:
            call.status = exc.status
            await context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
            raise  # abort() raised already; this line only tells type checkers
        except asyncio.CancelledError:
            call.status = 499  # the client went away or its deadline passed
            raise
        except Exception:
            call.status = 500
            log.exception("unhandled error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            raise
        finally:
            level = logging.DEBUG if call.method in QUIET_METHODS else logging.INFO
            seconds = time.perf_counter() - start
            log.log(
                level,
                "grpc %s %d",
                call.method,
                call.status,
                extra={
                    "method": call.method,
                    "status": call.status,
                    "duration_ms": round(seconds * 1000, 3),
                },
            )

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Any:
        async def live() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=v2_infer.server_live(self.state))

        return await self.answer(context, Call("ServerLive"), live, key=False)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Any:
        async def ready() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=v2_infer.server_ready(self.state))

        return await self.answer(context, Call("ServerReady"), ready, key=False)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Any:
        async def ready() -> pb.ModelReadyResponse:
            v2_infer.served_model(self.state, request.name, request.version)
            return pb.ModelReadyResponse(ready=v2_infer.server_ready(self.state))

        return await self.answer(context, Call("ModelReady"), ready, key=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Any:
        async def metadata() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(**v2_infer.server_metadata(self.version))

        return await self.answer(context, Call("ServerMetadata"), metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Any:
        async def metadata() -> pb.ModelMetadataResponse:
            model = v2_infer.served_model(self.state, request.name, request.version)
            return model_metadata(v2_infer.model_metadata(model))

        return await self.answer(context, Call("ModelMetadata"), metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Any:
        arrived = time.perf_counter()
        call = Call("ModelInfer")

        async def infer() -> pb.ModelInferResponse:
            plan = v2_infer.plan(self.state, infer_request(request))
            call.tasks = plan.tasks
            remaining = context.time_remaining()  # None: the client set no deadline
            client_s = None if remaining is None else remaining + time.perf_counter() - arrived
            return infer_response(await v2_infer.run(self.state, plan, arrived, client_s))

        metrics = self.state.metrics
        metrics.inflight.inc()
        try:
            return await self.answer(context, call, infer)
        finally:
            metrics.inflight.dec()
            seconds = time.perf_counter() - arrived
            metrics.count_request(call.status, call.tasks, seconds, "v2_grpc")


def bearer_token(metadata: dict[str, Any]) -> str:
    scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class GrpcServer:
    """The gRPC server of one app: bound on construction, serving from `start()`, stopped
    by the shutdown signal (ServiceState.draining) or `stop()`."""

    def __init__(self, state: ServiceState, version: str) -> None:
        settings = state.settings
        self.state = state
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_upload_bytes),
                ("grpc.max_send_message_length", -1),
                # Several worker processes share the port (the kernel spreads connections);
                # one alone must not silently share it with a stray process.
                ("grpc.so_reuseport", int(settings.workers > 1)),
            ],
            # As over HTTP (service/guards.py): beyond it, calls get RESOURCE_EXHAUSTED.
            maximum_concurrent_rpcs=settings.limit_concurrency,
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(state, version), self.server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        if settings.grpc_port is None:
            raise ValueError("a gRPC server needs settings.grpc_port")
        address = f"{host}:{settings.grpc_port}"
        # Tried with a plain socket first: gRPC's own failure also logs a C-core line.
        # (Several workers share the port, each with SO_REUSEPORT, as gRPC binds it.)
        listen(
            settings.host,
            settings.grpc_port,
            "for gRPC on",
            "another MAD_GRPC_PORT",
            reuse_port=settings.workers > 1,
        ).close()
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc says no more than "Failed to bind"
            raise StartupError(
                f"cannot listen for gRPC on {address}: the address is in use or not "
                "available; stop whatever uses it or choose another MAD_GRPC_PORT"
            ) from None
        self._stopping: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        self._watcher = asyncio.create_task(self._follow_state(), name="mad-grpc-health")
        log.info("listening for gRPC", extra={"port": self.port})

    async def _follow_state(self) -> None:
        """Health follows readiness (SERVING once the model is warm, NOT_SERVING from the
        shutdown signal on); the end of the drain delay stops the server, as it closes the
        HTTP listener (service/server.py)."""
        serving: bool | None = None
        while not self.state.stopping:
            ready = v2_infer.server_ready(self.state)
            if ready != serving:
                serving = ready
                status = health_pb2.HealthCheckResponse
                for service in ("", SERVICE):
                    await self.health.set(
                        service, status.SERVING if serving else status.NOT_SERVING
                    )
            await asyncio.sleep(STATE_POLL_S)
        self.begin_stop(self.state.settings.request_timeout_s)

    def begin_stop(self, grace_s: float) -> asyncio.Task[None]:
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(grace_s), name="mad-grpc-stop")
        return self._stopping

    async def _stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()  # NOT_SERVING from now on
        await self.server.stop(grace_s)  # refuses new calls; those in flight get grace_s

    async def stop(self, grace_s: float) -> None:
        """Stop (or finish stopping): calls in flight get `grace_s` seconds."""
        await self.begin_stop(grace_s)
        if self._watcher is not None:
            self._watcher.cancel()
