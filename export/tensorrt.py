"""TensorRT: FP16 engines built from the exported ONNX graphs (runtime/tensorrt_runner.py
runs them).

Engines are specific to a GPU model, a TensorRT version and the checkpoint, so each build
goes to its own `<export dir>/tensorrt/<key>-<build id>/` (key: `<gpu>-sm<cc>-trt<version>-
<checkpoint digest>`) and the manifest's entry for that key names it; a later start on the
same kind of machine loads them instead of building (minutes). A build never writes into
engines another process may be loading: it is recorded only once complete.
`tensorrt` is imported lazily: nothing here is needed unless engines are built.
"""

from __future__ import annotations

import glob
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.codecs import flip_options, zoom_options
from model.config import ModelConfig
from model.decoding import VERIFY_GROUPS
from model.startup import StartupError
from runtime.manifest import read_manifest, write_manifest
from runtime.tensorrt_runner import cache_key, import_tensorrt

ENGINE_DIR = "tensorrt"
Shape = tuple[int, ...]  # one input's dimensions


@dataclass
class Profile:
    """The shapes an engine accepts. Serving letterboxes every image to the canvas or, for a
    portrait image on a landscape canvas, to its transpose: the canvas is the optimum, both
    orientations are inside, smaller images (down to min_image) stay valid."""

    max_batch: int = 8  # images per encoder call (the service's max batch)
    opt_batch: int = 1
    # Sequences per decoder call; 0: max_batch x the most one image decodes at once (its
    # detections, or its caption candidates read back: model.decoding).
    max_sequences: int = 0
    opt_sequences: int = 0  # 0: num_slots (one image's detections)
    min_image: tuple[int, int] = (0, 0)  # 0: half the canvas's shorter side, both sides
    # Decoding options a server sets over the export's (MAD_DECODING): what the shapes follow.
    decoding: dict[str, Any] = field(default_factory=dict)

    def resolved(self, model: dict[str, Any]) -> Profile:
        """Zeros replaced by their defaults for this model (the manifest's "model" entry); a
        model that decodes on mirror images too (a task's `flip_option`) encodes two images per
        request, so its encoder batches are twice the requests', and one that zooms (a task's
        `zoom_option`, model.zoom) a crop per detection."""
        model = {**model, **self.decoding}
        canvas, slots = model["image_size"], model["num_slots"]
        views = 2 if any(model.get(option) for option in flip_options()) else 1
        images = self.max_batch * views
        # Up to 2 x slots detections fused from two views; each view's group decodes apart.
        detections = slots * (2 if model.get("detection_flip") else 1)
        zoom = model.get("zoom", ModelConfig.zoom)  # an export older than the option: default
        if zoom > 1 and any(model.get(option) for option in zoom_options()):
            # Crops (model.zoom): one per detection, encoded in one call and decoded on.
            images = max(images, self.max_batch * detections)
        per_image = max(detections, model.get("caption_candidates", 1) * VERIFY_GROUPS)
        max_sequences = self.max_sequences or self.max_batch * per_image
        min_h, min_w = self.min_image
        return Profile(
            images,
            min(self.opt_batch * views, images),
            max_sequences,
            min(self.opt_sequences or slots, max_sequences),
            (min_h, min_w) if min_h and min_w else (min(canvas) // 2, min(canvas) // 2),
        )


def covers(built: dict[str, Any], needed: Profile) -> bool:
    """Whether engines built with profile `built` (a manifest entry's, resolved) accept every
    shape the resolved profile `needed` does: serving asks for its batch size, and an export
    made with a larger --max-batch serves it as it is."""
    low_h, low_w = built["min_image"]
    need_h, need_w = needed.min_image
    return (
        built["max_batch"] >= needed.max_batch
        and built["max_sequences"] >= needed.max_sequences
        and low_h <= need_h
        and low_w <= need_w
    )


def union(built: dict[str, Any], needed: Profile) -> Profile:
    """A resolved profile accepting every shape of both: a rebuild for a larger batch keeps
    what the engines it replaces accepted (another server may share the directory)."""
    return Profile(
        max(built["max_batch"], needed.max_batch),
        needed.opt_batch,
        max(built["max_sequences"], needed.max_sequences),
        needed.opt_sequences,
        (
            min(built["min_image"][0], needed.min_image[0]),
            min(built["min_image"][1], needed.min_image[1]),
        ),
    )


def encoder_shapes(profile: Profile, model: dict[str, Any]) -> dict[str, list[Shape]]:
    """Encoder inputs -> [min, opt, max] shapes: one image down to min_image, opt_batch
    images at the canvas, max_batch images at up to the canvas's longer side in both
    dimensions, so the transposed canvas fits too (`profile` resolved)."""
    height, width = model["image_size"]
    (min_h, min_w), b = profile.min_image, profile
    longest = max(height, width)
    images: list[Shape] = [
        (1, 3, min_h, min_w),
        (b.opt_batch, 3, height, width),
        (b.max_batch, 3, longest, longest),
    ]
    return {"images": images, "pad_mask": [(s[0], *s[2:]) for s in images]}


def decoder_shapes(
    profile: Profile, memory: dict[str, int], features: list[int], seq_len: int
) -> dict[str, list[Shape]]:
    """A task's decoder inputs -> [min, opt, max] shapes. features: image features N the
    encoder gives at its min/opt/max shapes; a call has 1..max_sequences sequences of seq_len
    tokens (the minimum is one token, so any prefix length fits)."""
    b = profile
    batches = (1, b.opt_batch, b.max_batch)
    sequences = (1, b.opt_sequences, b.max_sequences)
    kv: list[Shape] = [
        (memory["layers"], n, memory["heads"], f, memory["head_dim"])
        for n, f in zip(batches, features, strict=True)
    ]
    return {
        "keys": kv,
        "values": kv,
        "mask": [(n, 1, 1, f) for n, f in zip(batches, features, strict=True)],
        "tokens": [(1, 1), (sequences[1], seq_len), (sequences[2], seq_len)],
        "image_index": [(s,) for s in sequences],
    }


def build_engines(
    export_dir: str | Path,
    profile: Profile | None = None,
    device_index: int = 0,
    workspace_gib: float = 4.0,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Build (or find cached) FP16 engines for this GPU -> the manifest's tensorrt entry.
    Engines already built for this GPU whose profile covers `profile` are reused."""
    trt = import_tensorrt()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    profile = (profile or Profile()).resolved(manifest["model"])
    key = cache_key(trt, device_index, manifest["checkpoint"]["sha256"])
    entry = manifest.get("tensorrt", {}).get(key)
    if (
        entry
        and not rebuild
        and covers(entry["profile"], profile)
        and all((export_dir / f).is_file() for f in entry["engines"].values())
    ):
        return entry
    if entry is not None and not rebuild:
        profile = union(entry["profile"], profile)
    out = export_dir / ENGINE_DIR / f"{key}-{uuid.uuid4().hex[:8]}"
    try:
        out.mkdir(parents=True)
    except OSError as exc:  # a read-only mount, or a tensorrt/ that is not ours
        raise StartupError(_unwritable(export_dir, entry, profile, exc)) from exc
    remove_unlisted_builds(export_dir, manifest, key)
    try:
        entry = _build_all(trt, export_dir, out, manifest, profile, device_index, workspace_gib)
    except BaseException:  # failed or interrupted: nothing half-built stays behind
        shutil.rmtree(out, ignore_errors=True)
        raise
    manifest = read_manifest(export_dir)  # re-read: another start may have recorded meanwhile
    current = manifest.get("tensorrt", {}).get(key)
    if not rebuild and current and covers(current["profile"], profile):
        shutil.rmtree(out, ignore_errors=True)  # theirs accepts all that ours does: one copy
        return current
    manifest.setdefault("tensorrt", {})[key] = entry
    manifest["formats"] = sorted(set(manifest["formats"]) | {"tensorrt"})
    write_manifest(export_dir, manifest)
    return entry


STALE_BUILD_S = 24 * 3600  # a replaced build may still be loading in another process


def remove_unlisted_builds(export_dir: Path, manifest: dict[str, Any], key: str) -> None:
    """Remove this key's engine directories that the manifest no longer names (replaced, or
    left by a killed build) once a day old: a process that read the manifest before it was
    replaced may still be loading them."""
    listed = {
        Path(e["engines"]["encoder"]).parent.name for e in manifest.get("tensorrt", {}).values()
    }
    for build in (export_dir / ENGINE_DIR).glob(f"{glob.escape(key)}*"):
        try:
            if build.name not in listed and time.time() - build.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(build, ignore_errors=True)
        except OSError:  # removed by another start meanwhile
            continue


def _build_all(
    trt: Any,
    export_dir: Path,
    out: Path,
    manifest: dict[str, Any],
    profile: Profile,
    device_index: int,
    workspace_gib: float,
) -> dict[str, Any]:
    """Build the encoder's and every decoder's engine into `out` -> their manifest entry."""
    torch.cuda.set_device(device_index)
    logger = trt.Logger(trt.Logger.WARNING)
    graphs = manifest["graphs"]
    shapes = encoder_shapes(profile, manifest["model"])
    engines = {
        "encoder": _build(
            trt,
            logger,
            export_dir / graphs["encoder"]["file"],
            out / "encoder.engine",
            shapes,
            workspace_gib,
        )
    }
    features = _feature_counts(trt, logger, out / "encoder.engine", shapes)
    for task, graph in graphs["decoders"].items():
        shapes = decoder_shapes(profile, manifest["memory"], features, graph["seq_len"])
        engines[task] = _build(
            trt,
            logger,
            export_dir / graph["file"],
            out / f"decoder_{task}.engine",
            shapes,
            workspace_gib,
        )
    return {
        "precision": "fp16",
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(device_index),
        "profile": _jsonable(profile),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engines": {name: str(path.relative_to(export_dir)) for name, path in engines.items()},
    }


def _unwritable(
    export_dir: Path, entry: dict[str, Any] | None, needed: Profile, error: OSError
) -> str:
    """Why engines cannot be built into a read-only export, and the command that would."""
    if entry is None:
        found = "has no engines for this GPU and TensorRT"
    else:
        built = entry["profile"]
        found = (
            f"has engines for up to {built['max_batch']} images and {built['max_sequences']} "
            f"sequences per call, and this server needs {needed.max_batch} and "
            f"{needed.max_sequences}"
        )
    return (
        f"the export {export_dir} {found}, and they cannot be built into it ({error.strerror}): "
        f"build them where it is writable (`mad export --format tensorrt --max-batch "
        f"{needed.max_batch}` on this kind of GPU) or lower MAD_MAX_BATCH_SIZE"
    )


def _jsonable(profile: Profile) -> dict[str, Any]:
    shapes = {k: v for k, v in asdict(profile).items() if k != "decoding"}  # resolved into them
    return {k: list(v) if isinstance(v, tuple) else v for k, v in shapes.items()}


def _build(
    trt: Any,
    logger: Any,
    onnx_path: Path,
    engine_path: Path,
    shapes: dict[str, list[Shape]],
    workspace_gib: float,
) -> Path:
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name}")
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def _feature_counts(
    trt: Any, logger: Any, engine_path: Path, shapes: dict[str, list[Shape]]
) -> list[int]:
    """Image features N at the min/opt/max image sizes, as the built encoder computes them
    (no stride arithmetic to get wrong for a new backbone)."""
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    counts = []
    for i in range(3):
        for name in ("images", "pad_mask"):
            context.set_input_shape(name, shapes[name][i])
        counts.append(int(context.get_tensor_shape("mask")[3]))
    return counts
