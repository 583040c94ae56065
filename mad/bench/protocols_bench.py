"""Native POST /predict vs the Open Inference Protocol (KServe v2) over REST and over gRPC:
one `mad serve` on loopback (HTTP and MAD_GRPC_PORT, dynamic batching on), the same image and
request, closed-loop clients at each concurrency level -> p50 latency and throughput per
protocol.

Clients: httpx multipart for /predict (as the http section), tritonclient's asyncio HTTP
client (image and outputs as binary data) and gRPC client. The v2 requests ask for every
tensor output but `json` (boxes, scores, labels, masks_rle, keypoints, caption, ...): what a
v2 client uses; /predict answers the same content as JSON. Every client decodes what it gets
back. Needs tritonclient[http,grpc] (the dev extra).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mad.bench.http_bench import RequestFailed, closed_loop, form_fields
from mad.bench.serve_process import Server, free_port
from mad.bench.stats import median, ratio

PROTOCOLS = ("native", "v2_rest", "v2_grpc")
LEVELS = (1, 4)
Send = Callable[[], Awaitable[None]]


def v2_parameters(fields: dict[str, str]) -> dict[str, Any]:
    """The /predict form as v2 request parameters (typed as tritonclient sends them)."""
    return {
        "tasks": fields["tasks"],
        "score_threshold": float(fields["score_threshold"]),
        "nms_iou": float(fields["nms_iou"]),
        "max_detections": int(fields["max_detections"]),
        **({"refine_steps": fields["refine_steps"]} if "refine_steps" in fields else {}),
    }


@dataclass(frozen=True)
class Target:
    """The server under test and the request every protocol sends it."""

    server: Server
    grpc_port: int
    model: str
    payload: bytes
    fields: dict[str, str]  # the /predict form
    outputs: list[str]  # the v2 outputs asked for


@asynccontextmanager
async def client(protocol: str, target: Target, concurrency: int) -> AsyncIterator[Send]:
    """One request of `protocol`, as a coroutine function, over a client kept open."""
    import tritonclient.grpc as grpc_client
    import tritonclient.grpc.aio as grpc_aio
    import tritonclient.http as http_client
    import tritonclient.http.aio as http_aio

    server, model, payload, fields, outputs = (
        target.server,
        target.model,
        target.payload,
        target.fields,
        target.outputs,
    )
    images = np.array([payload], dtype=np.object_)
    parameters = v2_parameters(fields)
    if protocol == "native":
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits) as native:

            async def send_native() -> None:
                files = {"image": ("bench.jpg", payload, "image/jpeg")}
                response = await native.post(f"{server.url}/predict", data=fields, files=files)
                response.json()  # parsing is part of what a client pays
                if response.status_code != 200:
                    raise RequestFailed(str(response.status_code))

            yield send_native
    elif protocol == "v2_rest":
        rest = http_aio.InferenceServerClient(f"127.0.0.1:{server.port}", conn_limit=concurrency)

        async def send_rest() -> None:
            tensor = http_client.InferInput("image", [1], "BYTES").set_data_from_numpy(images)
            wanted = [http_client.InferRequestedOutput(o, binary_data=True) for o in outputs]
            result = await rest.infer(model, [tensor], outputs=wanted, parameters=parameters)
            for name in outputs:
                result.as_numpy(name)

        try:
            yield send_rest
        finally:
            await rest.close()
    else:
        remote = grpc_aio.InferenceServerClient(f"127.0.0.1:{target.grpc_port}")

        async def send_grpc() -> None:
            tensor = grpc_client.InferInput("image", [1], "BYTES").set_data_from_numpy(images)
            wanted = [grpc_client.InferRequestedOutput(o) for o in outputs]
            result = await remote.infer(model, [tensor], outputs=wanted, parameters=parameters)
            for name in outputs:
                result.as_numpy(name)

        try:
            yield send_grpc
        finally:
            await remote.close()


async def run_level(
    protocol: str, target: Target, concurrency: int, max_requests: int, seconds: float
) -> dict[str, Any]:
    async with client(protocol, target, concurrency) as send:
        return await closed_loop(send, concurrency, max_requests, seconds)


def protocols_benchmark(
    checkpoint: Path,
    backend: str,
    device: str,
    payload: bytes,
    tasks: list[str],
    kept: int,
    refine: dict[str, int],
    max_requests: int,
    duration_s: float,
    warmup: int,
    levels: tuple[int, ...] = LEVELS,
    export_dir: Path | None = None,
    echo: Callable[[str], object] = print,
) -> dict[str, Any]:
    fields = form_fields(tasks, kept, refine)
    grpc_port = free_port()
    env = {"MAD_GRPC_PORT": str(grpc_port), "MAD_QUEUE_SIZE": str(4 * max(levels))}
    echo(f"  starting mad serve (MAD_GRPC_PORT={grpc_port})")
    results: dict[str, dict[str, Any]] = {}
    with Server(checkpoint, backend, device, env, export_dir) as server:
        model = httpx.get(f"{server.url}/v1/model", timeout=10).json()["name"]
        metadata = httpx.get(f"{server.url}/v2/models/{model}", timeout=10).json()
        outputs = [o["name"] for o in metadata["outputs"] if o["name"] != "json"]
        args = Target(server, grpc_port, model, payload, fields, outputs)
        for protocol in PROTOCOLS:
            asyncio.run(run_level(protocol, args, 1, max(warmup, 1), 60.0))  # first-call costs
            results[protocol] = {}
            for c in levels:
                result = asyncio.run(run_level(protocol, args, c, max_requests, duration_s))
                echo(
                    f"    {protocol:<8} concurrency {c}: {result['throughput_rps']:.2f} req/s, "
                    f"p50 {median(result['latency']) or float('nan'):.1f} ms, "
                    f"{sum(result['errors'].values())} errors"
                )
                results[protocol][str(c)] = result
    native = results["native"].get("1", {}).get("latency")
    return {
        "form": fields,
        "v2_outputs": outputs,
        "levels": results,
        # p50 of each v2 transport over native /predict's, at concurrency 1 (>1: slower).
        "p50_vs_native": {
            p: ratio(median(results[p].get("1", {}).get("latency")), median(native))
            for p in PROTOCOLS[1:]
        },
    }
