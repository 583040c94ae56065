"""GPU readiness checked on the CPU: presets run end to end, the CUDA-graph bucketing and
padding logic, batch-independent decoding, the device-aware stopwatch, and the one-shot GPU
check itself (its --device cpu --quick run, as CI does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mad.bench.model_bench import ModelBench, schedules
from mad.bench.workload import random_tokenizer, synthetic_image
from model.checkpoint import MAD
from model.config import COCO_CLASS_NAMES, PRESETS, get_preset
from model.decoding import masked_decode
from model.inference_io import Request
from model.pipeline import Pipeline
from model.preprocess import letterbox, pil_to_tensor, prepare_batch
from model.startup import StartupError
from model.stopwatch import Stopwatch
from runtime.cuda_graphs import PaddedLayout, bucket, memory_signature
from runtime.torch_runner import TorchRunner
from tests.helpers import fit_detection_decoder

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("detection", "segmentation", "keypoints", "caption")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_all_four_tasks(preset, synth_data):
    """Each preset's own backbone and sequence language, with a narrow transformer and a small
    canvas so the test stays fast; its decoder fitted to two images' detections, so it
    decodes boxes with an area."""
    config = get_preset(
        preset,
        image_size=(224, 224),
        d_model=64,
        n_heads=4,
        encoder_layers=1,
        decoder_layers=1,
        ffn_dim=128,
        num_slots=10,
        text_vocab_size=64,
    )
    mad = MAD.build(config, random_tokenizer(64))
    fit_detection_decoder(mad, synth_data, steps=60, images=2)
    runner = TorchRunner(mad.network)
    image = synthetic_image((180, 240))
    result = Pipeline(mad, runner)([Request(image, TASKS, score_threshold=0.0, max_detections=2)])[
        0
    ]
    assert len(result.detections) == 2 and len(result.masks) == 2
    assert result.keypoints is not None and isinstance(result.caption, str)
    # Keypoints for certain: the bench prompts them with person boxes.
    bench = ModelBench(mad, runner, [image], kept=2, ratios=schedules(mad, {}))
    assert set(TASKS) <= set(bench.run())


def test_paper_presets_carry_coco_names():
    for name in ("r50", "swin-b", "vit-b"):
        config = get_preset(name)
        assert config.class_names == COCO_CLASS_NAMES and len(config.class_names) == 80
        assert config.class_names.index(config.person_class) == 0


def test_sequence_buckets():
    assert [bucket(n) for n in (0, 1, 2, 3, 7, 8, 9, 128)] == [1, 1, 2, 4, 8, 8, 16, 128]
    assert bucket(129) is None
    assert bucket(5, (4, 6)) == 6


def test_padded_layout_places_each_image_in_its_own_rows():
    layout = PaddedLayout.of(torch.tensor([1, 0, 1, 1, 2]), batch=3)
    assert layout is not None and layout.per_image == 4  # image 1 has 3 sequences -> bucket 4
    assert layout.rows.tolist() == [4, 0, 5, 6, 8]
    groups = layout.groups(torch.device("cpu"))
    assert groups.image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert groups.rank.tolist() == [0, 1, 2, 3] * 3
    # Every real row lands on a padded row of its own image and rank.
    assert groups.image_index[layout.rows].tolist() == [1, 0, 1, 1, 2]
    assert PaddedLayout.of(torch.zeros(200, dtype=torch.long), batch=1) is None


def test_padded_decoding_equals_unpadded(micro_model):
    """What a graph replays: sequences scattered into bucketed rows, decoded with the static
    folded layout, gathered back: the same logits as the direct pass."""
    network = micro_model.network.eval()
    codec = micro_model.codecs["keypoints"]
    images = torch.rand(2, 3, *micro_model.config.image_size)
    with torch.inference_mode():
        memory = network.encode(images)
        tokens = torch.randint(0, micro_model.vocab.size, (3, codec.seq_len))
        index = torch.tensor([1, 0, 1])
        direct = network.decode(memory, tokens, index, codec.vocab_slice())
        layout = PaddedLayout.of(index, 2)
        assert layout is not None
        padded = torch.zeros(2 * layout.per_image, codec.seq_len, dtype=torch.long)
        padded[layout.rows] = tokens
        groups = layout.groups(torch.device("cpu"))
        out = network.decode(
            memory, padded, groups.image_index, codec.vocab_slice(), groups=groups
        )[layout.rows]
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    assert memory_signature(memory)[1][0] == 2


def test_answers_do_not_depend_on_batch_mates(micro_model):
    """Random re-masking (captions) draws one noise row per step for every sequence: an
    image's caption logits are the same alone and beside another image."""
    runner = TorchRunner(micro_model.network)
    codec = micro_model.codecs["caption"]
    images = torch.rand(2, 3, *micro_model.config.image_size)
    ratios = [0.8, 0.5]
    alone = masked_decode(
        runner,
        runner.encode(images[:1], torch.zeros(1, 96, 96, dtype=bool)),
        codec,
        codec.prompts(1),
        torch.tensor([0]),
        ratios,
    )
    together = masked_decode(
        runner,
        runner.encode(images, torch.zeros(2, 96, 96, dtype=bool)),
        codec,
        codec.prompts(2),
        torch.tensor([0, 1]),
        ratios,
    )
    torch.testing.assert_close(together[0], alone[0], atol=1e-4, rtol=1e-4)


def test_stopwatch_laps_accumulate():
    watch = Stopwatch("cpu", start=0.0)
    watch.lap("a")
    watch.lap("b")
    watch.lap("a")
    assert set(watch.times) == {"a", "b"}
    assert watch.total() == pytest.approx(sum(watch.times.values()))


def test_prepare_batch_is_the_letterbox():
    images = [synthetic_image((60, 90), seed=1), synthetic_image((90, 40), seed=2)]
    batch = prepare_batch(images, (64, 64))
    for i, image in enumerate(images):
        canvas, pad, scale = letterbox(pil_to_tensor(image), (64, 64))
        assert torch.equal(batch.images[i], canvas) and torch.equal(batch.pad_mask[i], pad)
        assert batch.contexts[i].scale == scale
        assert batch.contexts[i].image_size == (image.height, image.width)
    assert not batch.images.is_pinned()  # pinned only for a CUDA device


def test_cuda_graphs_need_cuda(micro_model):
    with pytest.raises(StartupError, match="CUDA graphs need a CUDA device"):
        TorchRunner(micro_model.network, "cpu", cuda_graphs=True)


@pytest.mark.slow
def test_gpu_check_quick_on_cpu(tmp_path):
    """The command a GPU window runs, in its CPU smoke form: every section completes and the
    report holds what docs/performance.md's GPU rows are read from."""
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu-check"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("gpu-check-*-cpu.json")).read_text())
    assert report["errors"] == {} and report["device"]["name"] == "cpu" and report["finished"]
    assert report["parity"]["fp32_pass"] and report["parity"]["fp32"]["same_decoded"] == 2
    # On the CPU, bf16 is CPU autocast against fp32, with the margins that explain its flips.
    bf16 = report["parity"]["bf16"]["logits"]
    assert set(bf16) == {"detection", "segmentation", "keypoints", "caption"}
    assert all(0.9 < v["argmax_agreement"] <= 1 and v["margin_median"] > 0 for v in bf16.values())
    assert report["r50"]["batches"]["2"]["fp32"]["total"]["n"] == 2
    assert report["bundled"]["mad_vs_ar"]["ratios"]["ar_cache_vs_mad_schedule"] > 1
    assert set(report["http"]["modes"]) == {"batching_off", "batching_2"}
    markdown = next(tmp_path.glob("gpu-check-*-cpu.md")).read_text()
    assert "## Targets" in markdown and "## Parity with the CPU" in markdown
    assert "| bf16 | keypoints |" in markdown and "fp32 top-2 margin" in markdown


def test_logit_difference_reports_the_margins_of_changed_tokens():
    from mad.bench.gpu_parity import logit_difference

    want = torch.tensor([[[3.0, 0.0, 0.0], [1.0, 0.9, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 5.0]]])
    got = want.clone()
    got[0, 1] = torch.tensor([0.9, 1.0, 0.0])  # a near-tie flips; the wide margins hold
    out = logit_difference(want, got)
    assert out["argmax_agreement"] == pytest.approx(0.75)
    assert out["flipped_margin_median"] == pytest.approx(0.1)
    assert out["margin_median"] == pytest.approx(2.0)  # torch's median: the lower middle
    assert out["max_abs_diff"] == pytest.approx(0.1)
    assert logit_difference(want, want)["flipped_margin_median"] is None


def test_parity_pairs_detections_that_swapped_places():
    """Two near-tied scores may sort the other way on another device: the same objects."""
    from mad.bench.gpu_parity import compare_results
    from model.codecs.detection import Detections
    from model.inference_io import Result

    def result(order: list[int], shift: float = 0.0) -> Result:
        boxes = torch.tensor([[10.0, 10, 50, 50], [60, 60, 90, 90], [5, 60, 30, 95]])[order]
        labels = torch.tensor([1, 1, 2])[order]
        detections = Detections(
            boxes + shift, boxes / 100, torch.tensor([0.9, 0.8, 0.7]), labels, torch.zeros(3, 5)
        )
        keypoints = [torch.full((17, 3), float(i)) for i in order]
        outputs = {"detection": detections, "keypoints": keypoints, "caption": "a red circle"}
        return Result((100, 100), ("detection", "keypoints", "caption"), outputs)

    swapped = compare_results(result([0, 1, 2]), result([1, 0, 2]), tolerance_px=1.0)
    assert swapped["same"] and swapped["box_max_px"] == 0 and swapped["keypoint_max_px"] == 0
    moved = compare_results(result([0, 1, 2]), result([1, 0, 2], shift=3.0), tolerance_px=1.0)
    assert not moved["same"] and moved["box_max_px"] == pytest.approx(3.0)
    identical = compare_results(result([0, 1, 2]), result([0, 1, 2]), tolerance_px=1.0)
    assert identical["same"]
    other = result([0, 1, 2])
    other.outputs["detection"].labels[2] = 1  # another class for one object
    assert not compare_results(result([0, 1, 2]), other, tolerance_px=1.0)["labels_equal"]
    # Two objects that traded classes: the same boxes, but no same-class pair matches.
    traded = result([0, 1, 2])
    traded.outputs["detection"].labels[:] = torch.tensor([2, 1, 1])
    compared = compare_results(result([0, 1, 2]), traded, tolerance_px=1.0)
    assert compared["labels_equal"] and not compared["same"] and compared["box_max_px"] > 40


def test_gpu_check_keeps_finished_sections_when_cut_off(tmp_path, monkeypatch):
    """A window's time limit stops the check from outside, mid-section: the report on disk
    already holds the sections before it and says that the run did not finish."""
    import mad.bench.workload
    from mad.bench.gpu_check import run_check

    def cut_off(*args, **kwargs):
        raise KeyboardInterrupt  # what the r50 section meets when the window ends

    monkeypatch.setattr(mad.bench.workload, "prepare_checkpoint", cut_off)
    with pytest.raises(KeyboardInterrupt):
        run_check("cpu", True, tmp_path, skip=("http",), echo=lambda text: None)
    report = json.loads(next(tmp_path.glob("gpu-check-*-cpu.json")).read_text())
    assert report["finished"] is False and report["parity"]["fp32_pass"]
    assert "r50" not in report and "bundled" not in report
    markdown = next(tmp_path.glob("gpu-check-*-cpu.md")).read_text()
    assert "cut off before the end" in markdown and "## Parity with the CPU" in markdown


@pytest.mark.slow
def test_gpu_window_dry_run_on_cpu(tmp_path):
    """The whole-window script in its CPU dry-run form: it trains within its budget and leaves
    a loadable float16 checkpoint and at most the 8 files a GPU window returns."""
    from model.checkpoint import load_checkpoint

    out = tmp_path / "out"
    dry_run = ["--check-s", "0", "--budget-s", "100", "--images", "32", "--batch-size", "4"]
    dry_run += ["--replay-v1", "8"]  # generated in the background (scripts/gpu-data), merged
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu-window"),
            "--out",
            str(out),
            "--device",
            "cpu",
            *dry_run,
        ],
        env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and "gpu-window.log" in files, files
    assert "data: 32 images of world v2 and 8 of v1" in (out / "gpu-window.log").read_text()
    assert {"checkpoint/model.safetensors", "checkpoint/train_log.csv"} <= set(files)
    load_checkpoint(out / "checkpoint")  # raises if the weights, config or tokenizer are off
    assert len((out / "checkpoint" / "train_log.csv").read_text().splitlines()) > 1
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["weights_dtype"] == "float16"


def test_gpu_train_refuses_data_options_with_a_ready_set(tmp_path):
    """--data trains on a set made before: an option that would have shaped a generated set
    is refused at once, not ignored."""
    script = str(ROOT / "scripts" / "gpu-train")
    done = subprocess.run(
        ["bash", script, "--out", str(tmp_path / "out"), "--data", str(tmp_path), "--images", "9"],
        env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "--data trains on a set made before; --images is for generating one" in done.stderr
