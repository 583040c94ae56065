"""Loading the served model: the runtime's runner, with the serving decisions made first.

The onnx, tensorrt and openvino backends run an export. Given only a checkpoint, the service
makes one at start-up into its cache (`Settings.cache_dir`, MAD_CACHE_DIR), once per
checkpoint content (onnx int8: then quantised once), and for tensorrt builds (or finds) the
engines for this GPU in it. This is the one
service module that imports export/: it writes exports; runtime/ only reads them.
"""

from __future__ import annotations

import contextlib
import glob
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.checkpoint import MAD, checkpoint_digest
from model.decoding import Runner
from model.startup import StartupError
from runtime.backends import check_options, create_runner, resolve_export_dir
from runtime.manifest import MANIFEST, export_of, is_export, read_manifest
from runtime.tensorrt_runner import cuda_device

if TYPE_CHECKING:
    from service.settings import Settings


def load_configured(settings: Settings) -> tuple[MAD, Runner[Any]]:
    """The model the settings describe (backend, checkpoint, device, precision, compile,
    CUDA graphs, threads, export dir, cache, decoding options): what `mad serve` and `mad
    predict` both run.
    TensorRT engines must take the service's batches: built (or reused) for at least
    `max_batch_size` images per call."""
    from service.settings import decoding_overrides

    decoding = decoding_overrides(settings.decoding)  # checked when the settings were made
    options: dict[str, Any] = {}
    if settings.backend == "tensorrt":
        from export.tensorrt import Profile

        options["profile"] = Profile(max_batch=settings.max_batch_size, decoding=decoding)
    mad, runner = load_runner(
        settings.backend,
        Path(settings.checkpoint),
        settings.device,
        cache_dir=settings.cache_dir,
        precision=settings.precision,
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        export_dir=settings.export_dir,
        threads=settings.threads,
        **options,
    )
    try:
        mad.set_decoding(decoding)
    except ValueError as exc:
        raise StartupError(f"MAD_DECODING: {exc}") from None
    return mad, runner


def load_runner(
    backend: str,
    checkpoint: str | Path | None,
    device: str = "cpu",
    *,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> tuple[MAD, Runner[Any]]:
    """-> (model bundle, runner), as `runtime.backends.create_runner`, except that onnx and
    tensorrt need no ready export: without export_dir, a checkpoint that is not an export is
    exported into `cache_dir` (default: Settings().cache_dir) and that export is run.

    Options: create_runner's, plus opset and simplify (of the cached export), and for
    tensorrt profile (export.tensorrt.Profile) and rebuild (of the engines).
    """
    if backend not in ("onnx", "tensorrt", "openvino") or checkpoint is None:
        return create_runner(backend, checkpoint, device, **options)
    check_options(backend, checkpoint, device, **options)  # before any export work
    export_dir = options.pop("export_dir", None)
    opset, simplify = options.pop("opset", 17), options.pop("simplify", False)
    if export_dir is None and not is_export(checkpoint):
        if cache_dir is None:
            from service.settings import Settings

            cache_dir = Settings().cache_dir
        # The cached export is the checkpoint's by construction: run it as the checkpoint.
        checkpoint = cached_export(checkpoint, cache_dir, opset, simplify)
        if backend == "onnx" and options.get("precision") == "int8":
            checkpoint = cached_int8_export(checkpoint)
    if backend == "tensorrt":
        from export.tensorrt import build_engines

        checkpoint = resolve_export_dir(checkpoint, export_dir, backend)
        export_dir = None
        index = cuda_device(device).index or 0
        options["engines"] = build_engines(
            checkpoint, options.pop("profile", None), index, rebuild=options.pop("rebuild", False)
        )
    return create_runner(backend, checkpoint, device, export_dir=export_dir, **options)


def cached_export(
    checkpoint: str | Path, cache_dir: str | Path, opset: int = 17, simplify: bool = False
) -> Path:
    """`<cache_dir>/<sha256[:16]>/onnx`: exported once per checkpoint content, reused after
    (written into place by `write_into_place`)."""
    from export.onnx_export import export_onnx

    digest = checkpoint_digest(checkpoint)
    target = Path(cache_dir) / digest[:16] / "onnx"
    remove_stale_staging(target)

    def current() -> bool:
        return export_of(target, digest, opset, simplify) is not None

    if current():
        return target
    discard(target, current)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_into_place(
        target, lambda staging: export_onnx(checkpoint, staging, opset=opset, simplify=simplify)
    )


STALE_STAGING_S = 24 * 3600  # staging this old is a killed start's (builds take minutes)


def staging_prefix(target: Path) -> str:
    return f"{target.name}.staging-"


def remove_stale_staging(target: Path) -> None:
    """Remove what starts killed mid-export left beside `target` (a stop does not wait for an
    export, service/model_thread.py) once it is a day old; on every start, cache hit or not."""
    for leftover in target.parent.glob(f"{glob.escape(staging_prefix(target))}*"):
        try:
            if time.time() - leftover.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # another start renamed or removed it meanwhile
            continue


def discard(target: Path, current: Callable[[], bool]) -> None:
    """Remove an export at `target` that is not `current()`, asked again just before: another
    start may have renamed a current one into place since the caller looked."""
    if not target.exists() or current():
        return
    aside = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    with contextlib.suppress(OSError):  # gone already
        target.rename(aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


def write_into_place(target: Path, write: Callable[[Path], object]) -> Path:
    """`write` an export into a new directory beside `target`, then rename it into place, so
    concurrent starts never see half an export (the loser of the race drops its copy)."""
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
    try:
        write(staging)
        staging.rename(target)
    except OSError:
        if not (target / MANIFEST).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cached_int8_export(fp32_export: Path) -> Path:
    """`<fp32 export>-int8` beside the cached fp32 export: quantised once per fp32 export,
    reused after."""
    from export.quantize import quantize_export

    target = fp32_export.with_name(fp32_export.name + "-int8")
    remove_stale_staging(target)
    source_created = read_manifest(fp32_export)["created"]

    def current() -> bool:
        try:
            manifest = read_manifest(target)
        except (StartupError, ValueError):
            return False
        return bool(manifest.get("quantization", {}).get("source_created") == source_created)

    if current():
        return target
    discard(target, current)
    return write_into_place(target, lambda staging: quantize_export(fp32_export, staging))
