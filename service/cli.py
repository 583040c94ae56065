"""`mad serve` (HTTP) and `mad predict` (the same pipeline, no HTTP).

Options left out fall back to MAD_* environment variables, then to the defaults in
service/settings.py.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from pydantic import ValidationError

from model.request_spec import (
    RequestError,
    check_max_detections,
    check_nms_iou,
    check_score_threshold,
    parse_refine_steps,
    parse_tasks,
)
from model.startup import StartupError
from service.settings import Settings

if TYPE_CHECKING:
    from service.schemas import PredictResponse

CHECKPOINT_HELP = "Checkpoint directory [env MAD_CHECKPOINT; default: the bundled mad-tiny]."


def load_settings(**options: Any) -> Settings:
    """Settings from the given options (None: not given), then MAD_*, then the defaults;
    pydantic validates the values."""
    try:
        return Settings(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None


def check_settings(settings: Settings) -> None:
    """The start-up checks that need no model (runtime.backends.check_options): a wrong
    option, a missing GPU or library fails in milliseconds, as one line."""
    from runtime.backends import check_options

    check_options(
        settings.backend,
        settings.checkpoint,
        settings.device,
        precision=settings.precision,
        cuda_graphs=settings.cuda_graphs,
    )


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use says so at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}; "
            "stop whatever uses it "
            "or choose another --port (MAD_PORT)"
        ) from None


def request_error(
    command: str, exc: RequestError, options: dict[str, str] | None = None
) -> NoReturn:
    """A value outside the request grammar: one line on stderr naming the option (`options`
    maps a request field to it; default --field-name), exit status 2 (a usage error)."""
    option = (options or {}).get(exc.field, "--" + exc.field.replace("_", "-"))
    typer.echo(f"mad {command}: {option}: {exc.problem}", err=True)
    raise typer.Exit(2)


def serve(
    checkpoint: Path | None = typer.Option(None, help=CHECKPOINT_HELP),
    backend: str | None = typer.Option(None, help="torch, onnx or tensorrt [MAD_BACKEND]."),
    device: str | None = typer.Option(
        None, help="cpu, cuda[:N] or auto (CUDA if present) [MAD_DEVICE; default cpu]."
    ),
    precision: str | None = typer.Option(None, help="fp32, bf16, fp16 [MAD_PRECISION]."),
    host: str | None = typer.Option(None, help="Bind address [MAD_HOST; default 0.0.0.0]."),
    port: int | None = typer.Option(None, help="Port [MAD_PORT; default 8000]."),
    workers: int | None = typer.Option(None, help="Processes, one model each [MAD_WORKERS]."),
) -> None:
    """Serve the model over HTTP (POST /predict, /docs, a demo page at /)."""
    import uvicorn

    from service.app import create_app
    from service.logging import configure, log_config
    from service.server import DrainingServer, uvicorn_options

    settings = load_settings(
        checkpoint=checkpoint,
        backend=backend,
        device=device,
        precision=precision,
        host=host,
        port=port,
        workers=workers,
    )
    check_settings(settings)
    sock = listen(settings.host, settings.port)
    configure(settings.log_level)
    options = {**uvicorn_options(settings), "log_config": log_config(settings.log_level)}
    if settings.workers > 1:
        sock.close()  # uvicorn's workers share a socket of its own
        # Each worker process builds its own app (and model) from the environment.
        os.environ.update(settings.env())
        uvicorn.run(
            "service.app:create_app_from_env", factory=True, workers=settings.workers, **options
        )
        return
    app = create_app(settings)
    server = DrainingServer(uvicorn.Config(app, **options), app.state.service)
    try:
        server.run(sockets=[sock])  # a failed start-up exits (status 3) from in here
    finally:
        error = app.state.service.startup_error
        if error is not None:  # an expected one: its line again, last, for the terminal
            raise StartupError(error)
    if not server.started:
        raise SystemExit(3)


def predict(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files."),
    tasks: list[str] = typer.Option(
        [], help="Tasks, comma-separated or repeated (default: all the model has)."
    ),
    refine_steps: list[str] = typer.Option([], help="K for every task, or task:K."),
    score_threshold: float = typer.Option(0.5, min=0.0, max=1.0),
    max_detections: int | None = typer.Option(None, min=1),
    nms_iou: float | None = typer.Option(
        None, help="Class-wise NMS IoU, 0..1 (1: off; default: the model's)."
    ),
    mask_format: str = typer.Option("rle", help="rle or polygon (for --json)."),
    render: Path | None = typer.Option(
        None, help="Draw the result into this PNG (several images: OUT-<image name>.png)."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print the API's JSON response, one line per image."
    ),
    checkpoint: Path | None = typer.Option(None, help=CHECKPOINT_HELP),
    backend: str | None = typer.Option(None, help="torch, onnx or tensorrt [MAD_BACKEND]."),
    device: str | None = typer.Option(
        None, help="cpu, cuda[:N] or auto (CUDA if present) [MAD_DEVICE]."
    ),
    precision: str | None = typer.Option(None, help="fp32, bf16, fp16 [MAD_PRECISION]."),
) -> None:
    """Run the model on image files, without a server."""
    from model.pipeline import Pipeline
    from model.pipeline import Request as ModelRequest
    from service.errors import APIError
    from service.images import decode_image
    from service.model_cache import load_configured
    from service.postprocess import build_response, request_stages
    from service.render import render as draw
    from service.state import describe_model

    if mask_format not in ("rle", "polygon"):
        raise typer.BadParameter("--mask-format must be rle or polygon")
    settings = load_settings(
        checkpoint=checkpoint, backend=backend, device=device, precision=precision
    )
    check_settings(settings)
    mad, runner = load_configured(settings)
    config = mad.config
    try:
        task_names = parse_tasks(tasks, config.tasks)
        steps = parse_refine_steps(refine_steps, config.tasks)
        score_threshold = check_score_threshold(score_threshold)
        max_detections = check_max_detections(max_detections, config.num_slots)
        nms_iou = check_nms_iou(nms_iou)
    except RequestError as exc:
        request_error("predict", exc)
    description = describe_model(mad, runner, settings)
    model_ref = description.ref()
    pipeline, failed = Pipeline(mad, runner), 0
    for path in images:
        try:
            image = decode_image(path.read_bytes(), settings.max_image_pixels)
        except APIError as exc:
            typer.echo(f"{path}: {exc.message}", err=True)
            failed += 1
            continue
        [result] = pipeline(
            [ModelRequest(image, task_names, steps, score_threshold, max_detections, nms_iou)]
        )
        response = build_response(
            result, model_ref, mad.codecs, mask_format, request_stages(result)
        )
        if json_output:
            typer.echo(json.dumps(response.model_dump(exclude_none=True)))
        else:
            typer.echo(summary(path, response))
        if render is not None:
            out = (
                render
                if len(images) == 1
                else render.with_name(f"{render.stem}-{path.stem}{render.suffix or '.png'}")
            )
            draw(image, response, config.skeleton).save(out)
            typer.echo(f"wrote {out}", err=True)
    if failed:
        sys.exit(1)


def summary(path: Path, response: PredictResponse) -> str:
    lines = [f"{path} ({response.image.width}x{response.image.height})"]
    for det in response.detections or []:
        box = ", ".join(f"{v:.0f}" for v in det.box)
        extra = " +mask" if det.mask is not None else ""
        extra += " +keypoints" if det.keypoints else ""
        extra += "".join(f" +{field}" for field in det.model_extra or {})
        lines.append(f"  {det.label:<12} {det.score:.2f}  [{box}]{extra}")
    if response.caption is not None:
        lines.append(f"  caption: {response.caption}")
    for field, value in (response.model_extra or {}).items():  # other tasks' outputs
        lines.append(f"  {field}: {json.dumps(value)}")
    return "\n".join(lines)
