"""`mad serve` (HTTP) and `mad predict` (the same pipeline, no HTTP).

Options left out fall back to MAD_* environment variables, then to the defaults in
service/settings.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from model.request_spec import (
    RequestError,
    check_max_detections,
    check_nms_iou,
    check_score_threshold,
    parse_refine_steps,
    parse_tasks,
)
from model.startup import StartupError, output_file
from service.setting_options import (
    MODEL_SETTINGS,
    settings_from_options,
    usage_error,
    with_setting_options,
)
from service.settings import Settings

if TYPE_CHECKING:
    from service.schemas import PredictResponse

log = logging.getLogger("mad.service")


def check_settings(settings: Settings) -> None:
    """The start-up checks that need no model (runtime.backends.check_options): a wrong
    option, a missing GPU or library fails in milliseconds, as one line."""
    from runtime.backends import check_options

    if settings.backend == "torch" and settings.export_dir is not None:
        raise StartupError(
            "--export-dir (MAD_EXPORT_DIR) is an export for the onnx, tensorrt or openvino "
            "backend, which the torch backend would ignore: choose one with --backend, or "
            "unset it to run --checkpoint"
        )
    check_options(
        settings.backend,
        settings.checkpoint,
        settings.device,
        precision=settings.precision,
        cuda_graphs=settings.cuda_graphs,
        export_dir=settings.export_dir,
    )


def request_error(
    command: str, exc: RequestError, options: dict[str, str] | None = None
) -> NoReturn:
    """A value outside the request grammar: one line on stderr naming the option (`options`
    maps a request field to it; default --field-name), exit status 2 (a usage error)."""
    option = (options or {}).get(exc.field, "--" + exc.field.replace("_", "-"))
    typer.echo(f"mad {command}: {option}: {exc.problem}", err=True)
    raise typer.Exit(2)


@with_setting_options()
def serve(**options: Any) -> None:
    """Serve the model over HTTP: POST /predict, the KServe v2 API under /v2 (and over gRPC
    with --grpc-port), docs at /docs, a demo page at /.

    Every option is also a MAD_* variable (docs/service.md, "Configuration"); an option
    given here wins over the variable."""
    from service.logging import configure, log_config
    from service.server import listen

    settings = settings_from_options("serve", options)
    check_settings(settings)
    # Before the model loads: a port in use fails now.
    sock = listen(settings.host, settings.port, "on", "another --port (MAD_PORT)")
    configure(settings.log_level)
    host, port = sock.getsockname()[:2]
    log.info("listening", extra={"url": f"http://{host}:{port}"})  # the port, if 0 was asked
    logs = log_config(settings.log_level)
    if settings.workers > 1:
        from service.workers import serve_workers

        serve_workers(settings, sock, logs)
        return
    import uvicorn

    from service.app import create_app
    from service.server import DrainingServer, uvicorn_options

    app = create_app(settings)
    config = uvicorn.Config(app, **uvicorn_options(settings), log_config=logs)
    server = DrainingServer(config, app.state.service)
    server.run(sockets=[sock])  # listens at once; the model loads meanwhile
    error = app.state.service.startup_error
    if error is not None:  # the model did not load: the server stopped
        raise StartupError(error)
    from service.model_thread import exit_now_if_running

    exit_now_if_running(0)  # stopped as asked while the model was still loading


RENDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def render_paths(render: Path, images: list[Path]) -> dict[int, Path]:
    """Image index -> the file its drawing goes to: `render` for one image, else
    OUT-<image name> with its suffix, numbered where two images share a name; the directory
    made now."""
    if render.suffix.lower() not in RENDER_SUFFIXES:
        raise typer.BadParameter(
            f"{render} is not one of {', '.join(RENDER_SUFFIXES)}", param_hint="--render"
        )
    output_file(render, "--render")
    if len(images) == 1:
        return {0: render}
    stems = [path.stem for path in images]
    return {
        i: render.with_name(
            f"{render.stem}-{stem}{f'-{i}' if stems.count(stem) > 1 else ''}{render.suffix}"
        )
        for i, stem in enumerate(stems)
    }


@with_setting_options(MODEL_SETTINGS)
def predict(
    images: list[Path] = typer.Argument(
        ..., exists=True, dir_okay=False, metavar="IMAGE", help="Image files."
    ),
    tasks: list[str] = typer.Option(
        [], help="Tasks, comma-separated or repeated (default: all the model has)."
    ),
    refine_steps: list[str] = typer.Option(
        [], help="Refinement steps: K for every task, or task:K (default: the model's)."
    ),
    refine_early_stop: bool | None = typer.Option(
        None,
        "--refine-early-stop/--no-refine-early-stop",
        help="Stop refining once a step changes no token (default: MAD_REFINE_EARLY_STOP).",
    ),
    score_threshold: float = typer.Option(0.5, min=0.0, max=1.0),
    max_detections: int | None = typer.Option(None, min=1, help="Keep at most this many."),
    nms_iou: float | None = typer.Option(
        None, help="Class-wise NMS IoU, 0..1 (1: off; default: the model's)."
    ),
    mask_format: str = typer.Option("rle", metavar="rle|polygon", help="Masks in --json."),
    render: Path | None = typer.Option(
        None,
        help=f"Draw the result into this image ({', '.join(RENDER_SUFFIXES)}; several images: "
        "OUT-<image name>.<suffix>).",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print POST /predict's JSON response, one line per image."
    ),
    **options: Any,
) -> None:
    """Run the model on image files, without a server. The model options are also MAD_*
    variables, as for `mad serve`."""
    from model.inference_io import Request as ModelRequest
    from model.pipeline import Pipeline
    from service.errors import APIError
    from service.images import decode_image
    from service.model_cache import load_configured
    from service.postprocess import respond
    from service.render import render as draw
    from service.state import describe_model

    if mask_format not in ("rle", "polygon"):
        usage_error("predict", f"--mask-format: {mask_format!r}: expected rle or polygon")
    settings = settings_from_options("predict", options)
    check_settings(settings)
    mad, runner = load_configured(settings)
    config = mad.config
    try:
        task_names = parse_tasks(tasks, config.tasks)
        steps = parse_refine_steps(refine_steps, config.tasks, mad.tasks_to_run(task_names))
        score_threshold = check_score_threshold(score_threshold)
        max_detections = check_max_detections(max_detections, config.num_slots)
        nms_iou = check_nms_iou(nms_iou)
    except RequestError as exc:
        request_error("predict", exc)
    drawings = render_paths(render, images) if render is not None else {}
    description = describe_model(mad, runner, settings)
    model_ref = description.ref()
    pipeline, failed = Pipeline(mad, runner), 0
    for i, path in enumerate(images):
        arrived = time.perf_counter()
        try:
            image = decode_image(path.read_bytes(), settings.max_image_pixels)
        except APIError as exc:
            typer.echo(f"mad predict: {path}: {exc.message}", err=True)  # the others go on
            failed += 1
            continue
        decode_seconds = time.perf_counter() - arrived
        [result] = pipeline(
            [
                ModelRequest(
                    image,
                    task_names,
                    steps,
                    score_threshold,
                    max_detections,
                    nms_iou,
                    early_stop=(
                        settings.refine_early_stop
                        if refine_early_stop is None
                        else refine_early_stop
                    ),
                )
            ]
        )
        response = respond(
            result,
            model_ref,
            mad.codecs,
            mask_format,
            arrived=arrived,
            queue_seconds=0.0,  # no queue: the images run one after another
            decode_seconds=decode_seconds,
        )
        if json_output:
            typer.echo(response.model_dump_json(exclude_none=True))
        else:
            typer.echo(summary(path, response))
        if render is not None:
            out = drawings[i]
            try:
                draw(image, response, config.skeleton).save(out)
            except OSError as exc:  # the checks before the work cannot foresee every file system
                raise StartupError(
                    f"--render {out} cannot be written ({exc.strerror or exc})"
                ) from None
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
