"""The TensorRT engine cache on the CPU: which engines a start reuses, what it builds and
where, with TensorRT and the GPU faked (tests/test_export_gpu.py builds real engines)."""

from __future__ import annotations

import os
import time
import types
from pathlib import Path

import pytest

import export.tensorrt as trt_export
import service.model_cache
from export.tensorrt import Profile, _jsonable, build_engines, covers
from model.startup import StartupError
from runtime.manifest import FORMAT, read_manifest, write_manifest
from service.settings import Settings


def test_engines_built_for_larger_batches_serve_smaller_ones(micro_checkpoint, monkeypatch):
    """An export made with `--max-batch 16` serves MAD_MAX_BATCH_SIZE 8 as it is (a rebuild
    in place would fail on a read-only /models), and a server batching 16 asks for 16."""
    model = {"image_size": [256, 256], "num_slots": 6}
    built = _jsonable(Profile(max_batch=16).resolved(model))
    assert covers(built, Profile(max_batch=8).resolved(model))
    assert covers(built, Profile(max_batch=16).resolved(model))
    assert not covers(built, Profile(max_batch=32).resolved(model))
    assert not covers(built, Profile(max_batch=16, min_image=(64, 64)).resolved(model))
    asked = {}

    def load_runner(*args, **options):
        asked.update(options)
        return types.SimpleNamespace(set_decoding=lambda overrides: None), None

    monkeypatch.setattr(service.model_cache, "load_runner", load_runner)
    settings = Settings(checkpoint=micro_checkpoint, backend="tensorrt", max_batch_size=16)
    service.model_cache.load_configured(settings)
    assert asked["profile"] == Profile(max_batch=16)
    asked.clear()
    service.model_cache.load_configured(settings.model_copy(update={"backend": "onnx"}))
    assert "profile" not in asked


def fake_tensorrt_build(monkeypatch) -> list[dict]:
    """build_engines on the CPU: TensorRT, the GPU and the engine builder faked; -> the
    shapes each build asked for (its encoder's)."""

    class Logger:
        WARNING = 0

        def __init__(self, level: int) -> None:
            pass

    builds: list[dict] = []
    fake = types.SimpleNamespace(__version__="10.0", Logger=Logger)
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_export, "cache_key", lambda trt, index, sha: f"fake-sm90-{sha[:4]}")
    monkeypatch.setattr(trt_export.torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(trt_export.torch.cuda, "get_device_name", lambda index: "Fake GPU")
    monkeypatch.setattr(trt_export, "_feature_counts", lambda *a: [4, 16, 16])

    def build(trt, logger, onnx_path, engine_path, shapes, workspace_gib):
        if engine_path.name == "encoder.engine":
            builds.append(shapes)
        engine_path.write_bytes(b"engine")
        return engine_path

    monkeypatch.setattr(trt_export, "_build", build)
    return builds


def test_engines_are_reused_when_they_cover_and_rebuilt_for_both_profiles_else(
    tmp_path, monkeypatch
):
    """A smaller batch reuses the engines as they are; a larger one builds new engines into
    a new directory for the union of both profiles, and the old directory goes a day later;
    a failed build leaves nothing; a read-only export that needs new engines refuses with
    the command to run."""
    builds = fake_tensorrt_build(monkeypatch)
    manifest = {
        "format": FORMAT,
        "formats": ["onnx"],
        "checkpoint": {"sha256": "abcdef"},
        "model": {"image_size": [64, 64], "num_slots": 6},
        "memory": {"layers": 2, "heads": 2, "head_dim": 8},
        "graphs": {
            "encoder": {"file": "encoder.onnx"},
            "decoders": {"detection": {"file": "decoder_detection.onnx", "seq_len": 30}},
        },
    }
    write_manifest(tmp_path, manifest)
    first = build_engines(tmp_path, Profile(max_batch=16, max_sequences=50))
    assert len(builds) == 1 and first["profile"]["max_batch"] == 16
    assert build_engines(tmp_path, Profile(max_batch=8)) == first  # 8 x 6 sequences fit 50
    assert len(builds) == 1
    second = build_engines(tmp_path, Profile(max_batch=12))  # 72 sequences: not covered
    assert len(builds) == 2
    assert second["profile"]["max_batch"] == 16 and second["profile"]["max_sequences"] == 72
    assert builds[1]["images"][2][0] == 16  # the union: 16 images stay accepted
    assert read_manifest(tmp_path)["tensorrt"]["fake-sm90-abcd"] == second
    assert all((tmp_path / f).is_file() for f in second["engines"].values())
    # The replaced engines stay a day (another process may be loading them), then go.
    first_dir, second_dir = (
        tmp_path / Path(e["engines"]["encoder"]).parent for e in (first, second)
    )
    assert first_dir.is_dir()
    os.utime(first_dir, (time.time() - 2 * 86400,) * 2)

    # A build that fails leaves nothing behind; the swept old build is gone all the same.
    def broken(*args):
        raise RuntimeError("TensorRT failed to build an engine")

    monkeypatch.setattr(trt_export, "_build", broken)
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engines(tmp_path, Profile(max_batch=64))
    assert [d.name for d in (tmp_path / "tensorrt").iterdir()] == [second_dir.name]

    # An export that cannot be written (a read-only mount; root writes through chmod).
    def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(StartupError, match=r"Read-only file system.*--max-batch 32"):
        build_engines(tmp_path, Profile(max_batch=32))
    assert build_engines(tmp_path, Profile(max_batch=4)) == second  # covered: still served
