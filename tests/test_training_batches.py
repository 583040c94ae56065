"""Training batches built in the loader's workers: a step's images and masked sequences are
the same whichever process builds them and whether the run was resumed."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from model.config import flip_pairs_from_names
from model.data.batching import (
    CanvasCollate,
    SeededDataset,
    StepBatchSampler,
    TrainingBatch,
    TrainingCollate,
    sequence_generator,
)
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import training_transforms


def _flat(batch: TrainingBatch) -> dict[str, torch.Tensor]:
    out = {"images": batch.images, "pads": batch.pads}
    for task, seqs in batch.sequences.items():
        fields = {
            "inputs": seqs.inputs,
            "targets": seqs.targets,
            "weights": seqs.weights,
            "image_index": seqs.image_index,
            **seqs.extra,
        }
        out.update({f"{task}.{name}": value for name, value in fields.items()})
    return out


def _same(a: TrainingBatch, b: TrainingBatch) -> bool:
    x, y = _flat(a), _flat(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def loader_parts(micro_model, synth_data):
    config = micro_model.config
    transforms = training_transforms(config, flip_pairs_from_names(config.keypoint_names))
    dataset = CocoMultiTaskDataset(synth_data, "train2017", transforms)
    collate = TrainingCollate(CanvasCollate.for_config(config), micro_model.codecs)
    return SeededDataset(dataset), collate


def _batches(loader_parts, workers: int, start_step: int = 0) -> list[TrainingBatch]:
    samples, collate = loader_parts
    sampler = StepBatchSampler(len(samples), 4, seed=3, start_step=start_step, total_steps=4)
    loader = DataLoader(samples, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
    return list(loader)


def test_workers_and_resumes_build_the_same_batches(loader_parts):
    in_process = _batches(loader_parts, workers=0)
    assert len(in_process) == 4 and set(in_process[0].sequences) == {
        "detection",
        "segmentation",
        "keypoints",
        "caption",
    }
    in_workers = _batches(loader_parts, workers=2)
    assert all(_same(a, b) for a, b in zip(in_process, in_workers, strict=True))
    resumed = _batches(loader_parts, workers=0, start_step=2)
    assert all(_same(a, b) for a, b in zip(in_process[2:], resumed, strict=True))


def test_sequences_do_not_replay_an_augmentation_stream():
    """torch seeds from the low 32 bits: the sequence generator must differ from the first
    sample's augmentation stream (and from any seed 2^32 apart)."""
    seed = 67 * 1_000_003 + 1234
    torch.manual_seed(seed)
    augmentation = torch.rand(8)
    sequences = torch.rand(8, generator=sequence_generator(seed))
    assert not torch.equal(sequences, augmentation)
    assert not torch.equal(sequences, torch.rand(8, generator=sequence_generator(seed + 2**32)))
    assert torch.equal(sequences, torch.rand(8, generator=sequence_generator(seed)))


def test_a_batch_needs_a_seed(loader_parts, synth_data):
    samples, collate = loader_parts
    plain = CocoMultiTaskDataset(synth_data, "train2017")
    with pytest.raises(ValueError, match="no seed"):
        collate([plain[0], plain[1]])
    twice = [collate([plain[0], plain[1]], seed=5) for _ in range(2)]
    assert _same(*twice)
    assert not _same(twice[0], collate([plain[0], plain[1]], seed=6))
    seeded = samples[(0, 11)]
    assert seeded[1]["seed"] == 11  # the sample carries its augmentation seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_copy_to_the_gpu(loader_parts):
    batch = _batches(loader_parts, workers=0)[0]
    samples, collate = loader_parts
    sampler = StepBatchSampler(len(samples), 4, seed=3, total_steps=1)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=collate, pin_memory=True)
    pinned = next(iter(loader))  # as `mad train` gets it on a GPU
    assert pinned.images.is_pinned() and pinned.sequences["detection"].inputs.is_pinned()
    on_gpu = pinned.to(torch.device("cuda"))
    torch.cuda.synchronize()
    assert on_gpu.images.is_cuda and torch.equal(on_gpu.pads.cpu(), batch.pads)
    assert torch.equal(on_gpu.sequences["caption"].inputs.cpu(), batch.sequences["caption"].inputs)


def test_loader_bench_times_each_part(micro_checkpoint, synth_data, monkeypatch, capsys):
    from mad.bench import train_data

    argv = ["train_data", "--data", str(synth_data), "--checkpoint", str(micro_checkpoint)]
    monkeypatch.setattr(
        "sys.argv", [*argv, "--batch-size", "2", "--batches", "2", "--step-s", "1e-4"]
    )
    train_data.main()
    out = capsys.readouterr().out
    for part in ("load", "canvas", "sequences", "per batch"):
        assert f"  {part} " in out
    assert int(out.split(" need ")[1].split()[0]) > 1  # 0.1 ms steps outrun one worker
    monkeypatch.setattr(
        "sys.argv", [*argv, "--batch-size", "2", "--batches", "1", "--step-s", "1e3"]
    )
    train_data.main()
    assert "need 1 worker\n" in capsys.readouterr().out  # one worker feeds 1000 s steps
    monkeypatch.setattr("sys.argv", [*argv, "--batches", "0"])
    with pytest.raises(SystemExit):
        train_data.main()
