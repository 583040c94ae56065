"""ONNX export and the onnx runtime backend, on CPU: graphs, manifest, dynamic shapes,
logit and end-to-end parity with eager PyTorch, the export cache, start-up errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

from export import graphs
from export.onnx_export import export_onnx
from mad.bench.backends_bench import compare_backends
from model.checkpoint import MAD, checkpoint_digest, load_checkpoint, save_checkpoint
from model.feature_cache import FeatureCache
from model.inference_io import Request
from model.pipeline import Pipeline
from model.startup import StartupError
from runtime.backends import create_runner
from runtime.manifest import MANIFEST, export_of, read_manifest
from runtime.onnx_runner import OnnxRunner
from runtime.torch_runner import TorchRunner
from service.model_cache import (
    STALE_STAGING_S,
    load_runner,
    remove_stale_staging,
    write_into_place,
)
from tests.helpers import ALL_TASKS, synthetic_images

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "mad-tiny"


@pytest.fixture(scope="module")
def exported(micro_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(micro_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def runners(micro_checkpoint, exported):
    mad, _ = load_checkpoint(micro_checkpoint)
    return mad, TorchRunner(mad.network), OnnxRunner(exported, threads=2)


def test_manifest_describes_the_export(exported, micro_checkpoint):
    manifest = read_manifest(exported)
    assert manifest["opset"] >= 17 and manifest["precision"] == "fp32"
    assert manifest["checkpoint"]["sha256"] == checkpoint_digest(micro_checkpoint)
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-3
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert (exported / "config.json").is_file() and (exported / "tokenizer.model").is_file()
    encoder = manifest["graphs"]["encoder"]
    assert [i["name"] for i in encoder["inputs"]] == list(graphs.ENCODER_INPUTS)
    assert [o["name"] for o in encoder["outputs"]] == list(graphs.ENCODER_OUTPUTS)
    assert encoder["inputs"][0]["shape"] == ["batch", 3, "height", "width"]
    assert encoder["outputs"][0]["shape"][1:4:2] == ["batch", "features"]
    assert set(manifest["graphs"]["decoders"]) == set(ALL_TASKS)
    for task, graph in manifest["graphs"]["decoders"].items():
        start, stop = graph["vocab_slice"]
        assert [i["name"] for i in graph["inputs"]] == list(graphs.DECODER_INPUTS)
        assert graph["outputs"][0]["shape"] == ["sequences", "length", stop - start], task
        model = onnx.load(str(exported / graph["file"]))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == manifest["opset"]
        single = graph["single_image"]  # batch fixed at 1, sequences folded per image
        assert single["inputs"][0]["shape"][1] == 1
        assert single["outputs"][0]["shape"] == ["sequences", "length", stop - start], task


@pytest.mark.parametrize(
    "batch, size, sequences", [(3, (80, 112), 5), (1, (96, 96), 1), (1, (64, 128), 4)]
)
def test_logits_match_at_other_shapes(runners, batch, size, sequences):
    """Batch, sequence count, length and image size all differ from the tracing example
    (2 images at the canvas size, 3 sequences of 7 tokens); size 1 hits the Python branches
    that tracing froze, and batch 1 uses the single-image graphs."""
    mad, torch_runner, onnx_runner = runners
    generator = torch.Generator().manual_seed(batch)
    images = torch.rand(batch, 3, *size, generator=generator)
    pad = torch.zeros(batch, *size, dtype=torch.bool)
    pad[-1, :, size[1] // 2 :] = True
    torch_memory = torch_runner.encode(images, pad)
    onnx_memory = onnx_runner.encode(images, pad)
    for task, codec in mad.codecs.items():
        tokens = torch.randint(0, mad.vocab.size, (sequences, codec.seq_len), generator=generator)
        index = torch.randint(0, batch, (sequences,), generator=generator)
        expected = torch_runner.decode(torch_memory, tokens, index, codec.vocab_slice())
        got = onnx_runner.decode(onnx_memory, tokens, index, codec.vocab_slice())
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max() < 1e-3, task


def assert_same_results(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert a.tasks == b.tasks and a.passes == b.passes
        assert torch.equal(a.detections.tokens, b.detections.tokens)
        assert torch.equal(a.detections.labels, b.detections.labels)
        assert torch.allclose(a.detections.boxes, b.detections.boxes)
        assert torch.allclose(a.detections.scores, b.detections.scores, atol=1e-4)
        assert len(a.masks) == len(b.masks) == len(a.keypoints) == len(b.keypoints)
        for x, y in zip(a.masks, b.masks, strict=True):  # masks are exact
            assert (x is None and y is None) or torch.equal(x.full(), y.full())
        for x, y in zip(a.keypoints, b.keypoints, strict=True):
            # keypoints carry a float confidence beside their binned x, y
            assert (x is None and y is None) or torch.allclose(x.float(), y.float(), atol=1e-4)
        assert a.caption == b.caption


@pytest.mark.parametrize("steps", [0, 2])
def test_pipeline_results_match(runners, steps, monkeypatch):
    """Same boxes, classes, masks, keypoints and captions from both backends, with K = 0 and
    K = 2 refinement steps on every task. A zero score threshold keeps the random model's
    detections, so segmentation is really decoded; that model only ever finds one class, so
    the keypoints codec is told that class is the person, or keypoints would never run."""
    mad, torch_runner, onnx_runner = runners
    images = synthetic_images(2)
    found = Pipeline(mad, torch_runner)([Request(images[0], ("detection",), score_threshold=0)])
    label = int(found[0].detections.labels[0])
    monkeypatch.setattr(type(mad.codecs["keypoints"]), "person_label", property(lambda _: label))
    requests = [
        Request(image, ALL_TASKS, dict.fromkeys(ALL_TASKS, steps), score_threshold=0.0)
        for image in images
    ]
    expected = Pipeline(mad, torch_runner)(requests)
    got = Pipeline(mad, onnx_runner)(requests)
    assert all(len(r.detections) > 0 and "keypoints" in r.passes for r in got)
    assert_same_results(expected, got)
    assert got[0].passes["caption"] == 1 + steps


def test_pipeline_results_match_on_zoomed_crops(runners, monkeypatch):
    """The crops (model.zoom) and their mirror images split and join as the ONNX runner's
    features: the same results as torch's."""
    mad, torch_runner, onnx_runner = runners
    options = {"zoom": 4.0, "zoom_context": 1.5, "keypoints_flip": True}
    options |= dict.fromkeys(("detection_zoom", "segmentation_zoom", "keypoints_zoom"), True)
    for option, value in options.items():
        monkeypatch.setattr(mad.config, option, value)
    images = synthetic_images(2)
    found = Pipeline(mad, torch_runner)([Request(images[0], ("detection",), score_threshold=0)])
    label = int(found[0].detections.labels[0])
    monkeypatch.setattr(type(mad.codecs["keypoints"]), "person_label", property(lambda _: label))
    requests = [Request(image, ALL_TASKS, score_threshold=0.0) for image in images]
    encoded = []
    encode = onnx_runner.encode
    monkeypatch.setattr(onnx_runner, "encode", lambda *a: encoded.append(len(a[0])) or encode(*a))
    got = Pipeline(mad, onnx_runner)(requests)
    assert len(encoded) > 1 and sum(encoded) > 4  # images and their mirrors, then crops
    assert_same_results(Pipeline(mad, torch_runner)(requests), got)


def test_onnx_features_split_and_join_for_the_feature_cache(runners):
    """A cached image decodes to what it decodes freshly encoded, in a batch with a new one."""
    mad, _, onnx_runner = runners
    a, b = synthetic_images(2, seed=4)
    plain = Pipeline(mad, onnx_runner)
    cache: FeatureCache = FeatureCache(2**24, "v")
    cached = Pipeline(mad, onnx_runner, features=cache)
    cached([Request(a, ("caption",), image_key="a")])
    mixed = cached(
        [Request(b, ("caption",), image_key="b"), Request(a, ("caption",), image_key="a")]
    )
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2) and cache.bytes > 0
    expected = plain([Request(b, ("caption",)), Request(a, ("caption",))])
    assert [r.caption for r in mixed] == [r.caption for r in expected]


def test_portrait_images_run_on_the_transposed_canvas(runners):
    """The graphs take any image size: with a 64x96 canvas, a portrait image runs at 96x64
    through ONNX Runtime with the same results as PyTorch."""
    mad, torch_runner, onnx_runner = runners
    landscape = dataclasses.replace(
        mad, config=dataclasses.replace(mad.config, image_size=(64, 96))
    )
    portrait = synthetic_images(1)[0].resize((60, 90))
    request = Request(portrait, ALL_TASKS, score_threshold=0.0)
    expected = Pipeline(landscape, torch_runner)
    assert expected.canvas(request) == (96, 64)
    got = Pipeline(landscape, onnx_runner)([request])
    assert len(got[0].detections) > 0
    assert_same_results(expected([request]), got)


def test_load_runner_exports_once_into_the_cache(micro_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MAD_CACHE_DIR", str(tmp_path))
    mad, runner = load_runner("onnx", micro_checkpoint)
    digest = checkpoint_digest(micro_checkpoint)
    target = tmp_path / digest[:16] / "onnx"
    assert runner.export_dir == target and (target / MANIFEST).is_file()
    stamp = (target / MANIFEST).stat().st_mtime_ns
    info = runner.describe()
    assert info["backend"] == "onnx" and info["device"] == "cpu"
    assert info["providers"] == ["CPUExecutionProvider"] and info["precision"] == "fp32"
    assert runner.device == torch.device("cpu") and mad.network is None
    results = Pipeline(mad, runner)([Request(synthetic_images(1)[0], ALL_TASKS)])
    assert results[0].caption is not None and results[0].detections is not None

    leftover = target.with_name("onnx.staging-killed01")  # a start stopped mid-export
    leftover.mkdir()
    past = time.time() - STALE_STAGING_S - 60
    os.utime(leftover, (past, past))
    _, again = load_runner("onnx", micro_checkpoint)  # reused, not exported again
    assert again.export_dir == target and (target / MANIFEST).stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [digest[:16]]
    assert [p.name for p in target.parent.iterdir()] == ["onnx"]  # the leftover swept
    _, direct = create_runner("onnx", target)  # an export dir given as the checkpoint
    assert direct.export_dir == target


def test_a_killed_starts_staging_is_removed_once_stale_and_the_rest_is_kept(tmp_path):
    target = tmp_path / "onnx"
    old, fresh = tmp_path / "onnx.staging-old12345", tmp_path / "onnx.staging-new12345"
    for leftover in (old, fresh, tmp_path / "onnx-int8"):
        leftover.mkdir()
    past = time.time() - STALE_STAGING_S - 60
    os.utime(old, (past, past))
    os.utime(tmp_path / "onnx-int8", (past, past))  # another export, however old: kept

    def write(staging: Path) -> None:
        assert staging.name.startswith("onnx.staging-")
        (staging / MANIFEST).write_text("{}")

    remove_stale_staging(target)
    assert write_into_place(target, write) == target and (target / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "onnx",
        "onnx-int8",
        "onnx.staging-new12345",  # perhaps a start under way
    ]


def test_an_export_is_found_again_only_with_the_same_checkpoint_and_options(
    exported, micro_checkpoint, tmp_path
):
    digest = checkpoint_digest(micro_checkpoint)
    manifest = read_manifest(exported)
    assert export_of(exported, digest, manifest["opset"], False) == manifest
    assert export_of(exported, digest, manifest["opset"], False, manifest["exporter"])
    assert export_of(exported, "0" * 64, manifest["opset"], False) is None
    assert export_of(exported, digest, manifest["opset"] + 1, False) is None
    assert export_of(exported, digest, manifest["opset"], True) is None
    assert export_of(exported, digest, manifest["opset"], False, "another") is None
    assert export_of(micro_checkpoint, digest, manifest["opset"], False) is None
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / MANIFEST).write_text("{not json")
    assert export_of(damaged, digest, manifest["opset"], False) is None


def test_tensorrt_into_an_export_of_the_same_checkpoint_keeps_its_graphs(
    exported, micro_checkpoint, tmp_path, monkeypatch
):
    """`mad export --format tensorrt` once per GPU type into one directory: the graphs (and
    so the manifest's engines of other GPUs) stay; TensorRT itself is faked here."""
    import export.onnx_export
    import export.tensorrt
    import runtime.tensorrt_runner
    from mad.cli import app as mad_cli

    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    manifest = read_manifest(copy)
    exports, builds = [], []
    monkeypatch.setattr(runtime.tensorrt_runner, "import_tensorrt", lambda: None)
    monkeypatch.setattr(
        export.tensorrt,
        "build_engines",
        lambda out, profile, device: builds.append(out) or {"engines": {"encoder": "e"}},
    )

    def fake_export(checkpoint, out, **options):
        shutil.copytree(exported, out, dirs_exist_ok=True)
        exports.append(out)
        return manifest

    monkeypatch.setattr(export.onnx_export, "export_onnx", fake_export)
    args = ["export", "--checkpoint", str(micro_checkpoint), "--format", "tensorrt"]
    result = CliRunner().invoke(mad_cli, [*args, "--out", str(copy)])
    assert result.exit_code == 0, result.output
    assert exports == [] and builds == [copy]  # graphs kept, engines built beside them
    # Other options, or graphs missing: exported again, replacing the export whole.
    (copy / "stale.onnx").write_bytes(b"")
    result = CliRunner().invoke(mad_cli, [*args, "--out", str(copy), "--opset", "18"])
    assert result.exit_code == 0 and len(exports) == 1, result.output
    assert not (copy / "stale.onnx").exists()
    (copy / manifest["graphs"]["encoder"]["file"]).unlink()
    result = CliRunner().invoke(mad_cli, [*args, "--out", str(copy)])
    assert result.exit_code == 0 and len(exports) == 2, result.output


def test_runtime_runs_only_ready_exports(micro_checkpoint, tmp_path, monkeypatch):
    """Making an export is the caller's decision: runtime refuses a bare checkpoint."""
    monkeypatch.setenv("MAD_CACHE_DIR", str(tmp_path))
    with pytest.raises(StartupError, match="runs an ONNX export"):
        create_runner("onnx", micro_checkpoint)
    assert not any(tmp_path.iterdir())


def test_cache_dir_setting(tmp_path, monkeypatch):
    from service.settings import DEFAULT_CACHE_DIR, Settings

    monkeypatch.setenv("MAD_CACHE_DIR", str(tmp_path))
    assert Settings().cache_dir == tmp_path
    monkeypatch.setenv("MAD_CACHE_DIR", "")
    assert Settings().cache_dir == DEFAULT_CACHE_DIR


def test_export_dir_of_another_checkpoint_is_refused(exported, micro_model, tmp_path):
    other = MAD.build(micro_model.config, micro_model.tokenizer)
    other.network.load_state_dict(micro_model.network.state_dict())
    with torch.no_grad():
        other.network.head.logit_scale.add_(1.0)
    path = save_checkpoint(other, tmp_path / "other")
    with pytest.raises(StartupError, match="exported from checkpoint"):
        create_runner("onnx", path, export_dir=exported)


def test_unavailable_devices_fail_at_startup(micro_checkpoint, exported):
    import onnxruntime as ort

    with pytest.raises(StartupError, match="unknown backend"):
        create_runner("tflite", micro_checkpoint)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(StartupError, match="CUDAExecutionProvider"):
            create_runner("onnx", micro_checkpoint, device="cuda", export_dir=exported)
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(StartupError, match="TensorRT is not installed"):
            create_runner("tensorrt", micro_checkpoint, device="cuda", export_dir=exported)


def test_a_failed_export_leaves_the_one_there_whole(
    exported, micro_checkpoint, tmp_path, monkeypatch
):
    """Exports are written beside --out and then put in its place: one that fails halfway
    leaves the export already there as it was, and no staging directory behind."""
    import export.onnx_export
    from mad.cli import app as mad_cli

    copy = tmp_path / "export"
    shutil.copytree(exported, copy)
    before = sorted(p.name for p in copy.iterdir())

    def failing_export(checkpoint, out, **options):
        (Path(out) / "encoder.onnx").write_bytes(b"half")
        raise StartupError("the export failed")

    monkeypatch.setattr(export.onnx_export, "export_onnx", failing_export)
    args = ["export", "--checkpoint", str(micro_checkpoint), "--out", str(copy)]
    result = CliRunner().invoke(mad_cli, args)
    assert result.exit_code == 3 and "the export failed" in result.stderr
    assert sorted(p.name for p in copy.iterdir()) == before
    assert read_manifest(copy)  # still an export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_cli_export_simplified(micro_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from mad.cli import app

    out = tmp_path / "slim"
    result = CliRunner().invoke(
        app, ["export", "--checkpoint", str(micro_checkpoint), "--out", str(out), "--simplify"]
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["simplified"] and manifest["verification"]["max_abs_logit_diff"] < 1e-3
    if importlib.util.find_spec("tensorrt") is None:
        result = CliRunner().invoke(
            app,
            [
                "export",
                "--checkpoint",
                str(micro_checkpoint),
                "--out",
                str(tmp_path / "trt"),
                "--format",
                "tensorrt",
            ],
        )
        assert result.exit_code == 3 and "TensorRT is not installed" in result.stderr
        assert not (tmp_path / "trt").exists()  # refused before any export work


@pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None,
    reason="the dynamo exporter needs onnxscript, not installed",
)
def test_dynamo_exporter(micro_checkpoint, tmp_path):
    manifest = export_onnx(micro_checkpoint, tmp_path / "dynamo", exporter="dynamo", opset=18)
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-3


def test_compare_backends_reports_both(micro_checkpoint, exported):
    report = compare_backends(
        micro_checkpoint,
        synthetic_images(1),
        ("detection",),
        repeats=2,
        warmup=0,
        export_dir=exported,
        threads=2,
    )
    assert set(report["backends"]) == {"torch", "onnx"}
    for name, stats in report["backends"].items():
        assert stats["describe"]["backend"] == name
        assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    onnx_ms = report["backends"]["onnx"]["median_ms"]
    assert report["ratio"] == pytest.approx(report["backends"]["torch"]["median_ms"] / onnx_ms)


@pytest.mark.skipif(
    not (BUNDLED / "model.safetensors").is_file(), reason="checkpoints/mad-tiny is not there (yet)"
)
def test_bundled_model_parity(tmp_path):
    """The shipped model: same results from ONNX Runtime as from PyTorch, all tasks, K > 0."""
    checkpoint = tmp_path / "mad-tiny"
    shutil.copytree(BUNDLED, checkpoint)  # a snapshot: training may rewrite it meanwhile
    mad, torch_runner = create_runner("torch", checkpoint)
    export_onnx(checkpoint, tmp_path / "onnx")
    _, onnx_runner = create_runner("onnx", checkpoint, export_dir=tmp_path / "onnx")
    requests = [
        Request(image, ALL_TASKS, {"caption": 2, "keypoints": 1})
        for image in synthetic_images(3, seed=1)
    ]
    expected = Pipeline(mad, torch_runner)(requests)
    assert_same_results(expected, Pipeline(mad, onnx_runner)(requests))


def test_an_export_reports_the_version_of_its_checkpoint(micro_checkpoint, exported):
    """Served from its export dir, a model has the same version as its checkpoint (the
    training step and the weights digest), not `stepN-none`."""
    from service.state import model_version

    version = model_version(exported)
    assert version == model_version(micro_checkpoint)
    assert version == f"step0-{checkpoint_digest(micro_checkpoint)[:12]}"
