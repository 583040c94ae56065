"""`mad export`: a checkpoint -> ONNX graphs (+ TensorRT engines) and a manifest."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from model.startup import StartupError, check_output_dir


def replace_whole(out: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """`write` an export into a new directory beside `out`, then put it in `out`'s place
    (no graph or engine of an export there before stays): a failed or interrupted export
    leaves what was there whole. -> write's manifest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-new-", dir=out.parent))
    try:
        manifest = write(staging)
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            out.rename(aside / out.name)
            staging.rename(out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it took out's place
    return manifest


def export(
    checkpoint: Path = typer.Option(..., help="Checkpoint directory."),
    format: str = typer.Option("onnx", "--format", help="onnx, or tensorrt (ONNX + engines)."),
    out: Path = typer.Option(
        ...,
        help="Export directory to write: new, empty, or an export written before (replaced "
        "whole; --format tensorrt into an export of the same checkpoint adds its engines).",
    ),
    opset: int = typer.Option(17, min=17, help="ONNX opset."),
    simplify: bool = typer.Option(False, "--simplify/--no-simplify", help="Run onnxslim."),
    exporter: str = typer.Option("torchscript", help="torchscript or dynamo (needs onnxscript)."),
    quantize: str | None = typer.Option(
        None,
        help="int8: quantise the graphs (static int8 encoder convolutions calibrated on "
        "synthetic images, dynamic int8 decoder linear layers), checked against fp32.",
    ),
    max_batch: int = typer.Option(8, min=1, help="TensorRT: most images per call."),
    max_sequences: int = typer.Option(
        0, min=0, help="TensorRT: most sequences per call (0: auto)."
    ),
    device: int = typer.Option(0, min=0, help="TensorRT: CUDA device to build for."),
) -> None:
    """Export the image encoder and the per-task decoders as ONNX graphs (dynamic batch,
    sequences, length, image size), checked and verified against PyTorch; optionally build
    FP16 TensorRT engines from them, or quantise them to int8 for CPUs. --format tensorrt
    into an export of the same checkpoint (same options) keeps its graphs and adds this GPU's
    engines beside those already there."""
    if format not in ("onnx", "tensorrt"):
        raise typer.BadParameter(f"unknown format {format!r}; choose onnx or tensorrt")
    from export.quantize import QUANTIZATIONS

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise typer.BadParameter(
            f"unknown quantisation {quantize!r}; choose {', '.join(QUANTIZATIONS)}"
        )
    if quantize is not None and format != "onnx":
        raise typer.BadParameter("--quantize applies to --format onnx (TensorRT builds fp16)")
    if not (checkpoint / "config.json").is_file():
        raise StartupError(
            f"no checkpoint at {checkpoint} (config.json missing); check --checkpoint"
        )
    if out.resolve() == checkpoint.resolve():
        raise StartupError(f"--out {out} is the checkpoint itself: export to another directory")
    check_output_dir(out, "--out")
    from runtime.manifest import is_export

    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise StartupError(
            f"--out {out} holds something other than an export `mad export` wrote (a "
            "checkpoint?): give a new or empty directory"
        )
    if format == "tensorrt":
        from runtime.tensorrt_runner import import_tensorrt

        import_tensorrt()  # fail before minutes of export work, not after
    from export.onnx_export import export_onnx
    from model.checkpoint import checkpoint_digest
    from runtime.manifest import export_of

    # TensorRT into an export of this checkpoint (another GPU type's engines, say): its graphs
    # are reused, so the engines already built there stay listed in its manifest.
    reused = format == "tensorrt" and export_of(
        out, checkpoint_digest(checkpoint), opset, simplify, exporter
    )

    def write(target: Path) -> dict[str, Any]:
        if quantize is None:
            return export_onnx(
                checkpoint, target, opset=opset, simplify=simplify, exporter=exporter
            )
        from export.quantize import quantize_export

        with tempfile.TemporaryDirectory(prefix="mad-fp32-") as fp32:
            export_onnx(checkpoint, fp32, opset=opset, simplify=simplify, exporter=exporter)
            return quantize_export(fp32, target)

    manifest = reused or replace_whole(out, write)
    summary = {
        "out": str(out),
        "precision": manifest["precision"],
        "graphs": [manifest["graphs"]["encoder"]["file"]]
        + [g["file"] for g in manifest["graphs"]["decoders"].values()],
        "verification": manifest["verification"],
    }
    if quantize is not None:
        summary["quantization_check"] = manifest["quantization"]["check"]
    if format == "tensorrt":
        from export.tensorrt import Profile, build_engines

        entry = build_engines(
            out, Profile(max_batch=max_batch, max_sequences=max_sequences), device
        )
        summary["tensorrt"] = entry["engines"]
    typer.echo(json.dumps(summary, indent=2))
