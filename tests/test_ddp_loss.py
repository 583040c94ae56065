"""The training loss under DDP is a mean over every rank's tokens, not a mean of the ranks'
means, also when a task, or every task, has no sequences on one rank. Two gloo processes on
the CPU."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import load_checkpoint
from model.data.batching import CanvasCollate
from model.data.coco import CocoMultiTaskDataset
from model.data.transforms import build_transforms
from model.losses import masked_training_losses, token_losses, weighted_total
from tests.helpers import free_port

ALL = ["detection", "segmentation", "keypoints", "caption"]
Case = tuple[list[str], list[list[int]], set[int]]


def _cases(data: Path) -> list[Case]:
    """(tasks trained, each rank's images, the ranks whose captions are dropped)."""
    dataset = CocoMultiTaskDataset(data, "train2017")
    has_person = [bool(dataset[i][1]["has_keypoints"].any()) for i in range(len(dataset))]
    persons = [i for i, has in enumerate(has_person) if has]
    nobody = [i for i, has in enumerate(has_person) if not has]
    assert persons and nobody, has_person
    return [
        (ALL, [persons, nobody], set()),  # rank 1: no keypoint sequence
        (["detection", "keypoints"], [persons[:1], nobody], set()),
        (["caption"], [persons, nobody], {1}),  # rank 1: no sequence at all
        (["caption"], [persons, nobody], {0, 1}),  # no rank has one: ValueError on both
    ]


def _rank_batches(checkpoint: Path, data: Path, case: Case):
    """The model (eval mode: no dropout, fixed batch-norm statistics, so the ranks' gradients
    add up exactly) and each rank's (images, pads, sequences)."""
    tasks, images, uncaptioned = case
    mad = load_checkpoint(checkpoint)[0]
    codecs = {name: mad.codecs[name] for name in tasks}
    size = mad.config.image_size
    dataset = CocoMultiTaskDataset(data, "train2017", build_transforms(False, size[0]))
    batches = []
    for rank, indices in enumerate(images):
        pixels, pads, targets = CanvasCollate(size)([dataset[i] for i in indices])
        if rank in uncaptioned:
            targets = [{**target, "captions": []} for target in targets]
        generator = torch.Generator().manual_seed(rank)
        sequences = {n: c.training_sequences(targets, generator) for n, c in codecs.items()}
        batches.append((pixels, pads, sequences))
    return mad, codecs, batches


def _one_process(checkpoint: Path, data: Path, case: Case):
    """One process over both ranks' batches: each task's cross-entropy summed over both
    ranks' tokens and divided by their summed weight, per decoder layer -> (the flat gradient
    of the weighted total, each task's mean summed over layers)."""
    mad, codecs, batches = _rank_batches(checkpoint, data, case)
    network = mad.required_network()
    total, means = torch.zeros(()), {}
    for name, codec in codecs.items():
        sums, weights = [], []
        for pixels, pads, sequences in batches:
            seqs = sequences[name]
            if len(seqs):
                task = {name: (seqs.inputs, seqs.image_index, codec.vocab_slice())}
                rank_sums, rank_weights = token_losses(
                    network(pixels, pads, task)[name], seqs, codec
                )
                sums.append(rank_sums)
                weights.append(rank_weights)
        mean = torch.stack(sums).sum(0) / torch.stack(weights).sum(0).clamp(min=1.0)
        total = total + mad.config.task_weights.get(name, 1.0) * mean.sum()
        means[name] = mean.sum().item()
    total.backward()
    return torch.cat([p.grad.flatten() for p in network.parameters()]), means


def _ddp_rank(rank: int, port: int, checkpoint: Path, data: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=120),  # collectives out of step fail, not hang
    )
    try:
        for case in _cases(data):
            mad, codecs, batches = _rank_batches(checkpoint, data, case)
            network = mad.required_network()
            wrapped = DistributedDataParallel(network)  # kept: its hooks average the gradients
            pixels, pads, sequences = batches[rank]
            if case[2] == {0, 1}:
                with pytest.raises(ValueError, match="on any rank"):
                    masked_training_losses(wrapped, pixels, pads, sequences, codecs)
                continue
            losses = masked_training_losses(wrapped, pixels, pads, sequences, codecs)
            expected, means = _one_process(checkpoint, data, case)
            assert sorted(losses.terms) == sorted(case[0]), case
            assert {n: m.item() for n, m in losses.means().items()} == pytest.approx(means), case
            weighted_total(losses.terms, mad.config.task_weights).backward()
            got = torch.cat([p.grad.flatten() for p in network.parameters()])
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (
                case,
                (got - expected).abs().max().item(),
            )
    finally:
        dist.destroy_process_group()


def test_ddp_loss_is_the_mean_over_every_ranks_tokens(micro_checkpoint, synth_data):
    mp.spawn(_ddp_rank, args=(free_port(), micro_checkpoint, synth_data), nprocs=2, join=True)


def test_one_process_refuses_a_batch_without_sequences(micro_checkpoint, synth_data):
    case = (["caption"], [[0]], {0})
    mad, codecs, batches = _rank_batches(micro_checkpoint, synth_data, case)
    pixels, pads, sequences = batches[0]
    with pytest.raises(ValueError, match="no task has training sequences"):
        masked_training_losses(mad.required_network(), pixels, pads, sequences, codecs)
