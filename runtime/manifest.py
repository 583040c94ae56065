"""The export manifest: `manifest.json` in an export directory, written by `export/` and read
by the runtimes. Its fields are documented in docs/export.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.startup import StartupError

MANIFEST = "manifest.json"
FORMAT = "mad-export/1"


def is_export(directory: str | Path) -> bool:
    """Whether `directory` holds an export (a manifest), as opposed to a checkpoint."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StartupError(
            f"{directory} is not a MAD export: {MANIFEST} missing (make one with `mad export`)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise StartupError(
            f"{path}: unsupported export format {manifest.get('format')!r}; "
            "re-export it with `mad export`"
        )
    return manifest


def export_of(
    directory: str | Path, digest: str, opset: int, simplify: bool, exporter: str | None = None
) -> dict[str, Any] | None:
    """The manifest of the complete fp32 export in `directory` (every graph it lists there)
    when it was made from the checkpoint with this content digest with these options (any
    exporter when None), else None."""
    if not is_export(directory):
        return None
    try:
        manifest = read_manifest(directory)
        graphs = manifest["graphs"]
        files = [graphs["encoder"]["file"], *(g["file"] for g in graphs["decoders"].values())]
        same = (
            manifest["checkpoint"]["sha256"] == digest
            and manifest["opset"] == opset
            and manifest["simplified"] == simplify
            and manifest["precision"] == "fp32"
            and exporter in (None, manifest["exporter"])
            and all((Path(directory) / name).is_file() for name in files)
        )
    except (StartupError, ValueError, LookupError, TypeError, AttributeError):
        return None  # another format, a damaged manifest: not this export
    return manifest if same else None


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)  # readers never see a half-written manifest


def encoder_batch_axes(manifest: dict[str, Any]) -> dict[str, int]:
    """Which axis of each encoder output is the image (the dynamic axis named "batch"), for
    taking a batch's features apart and putting them together (a feature cache)."""
    outputs = manifest["graphs"]["encoder"]["outputs"]
    axes = {o["name"]: o["shape"].index("batch") for o in outputs if "batch" in o["shape"]}
    if len(axes) != len(outputs):
        raise StartupError("the export's manifest names no batch axis for every encoder output")
    return axes
