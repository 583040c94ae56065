"""The training loss under DDP is a mean over every rank's tokens, not a mean of the ranks'
means, also when a task has sequences on one rank only. Two gloo processes on the CPU."""

from __future__ import annotations

from pathlib import Path

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


def _cases(data: Path) -> list[tuple[list[str], list[list[int]]]]:
    """(tasks trained, each rank's images): rank 1 has no person (no keypoint sequence)."""
    dataset = CocoMultiTaskDataset(data, "train2017")
    has_person = [bool(dataset[i][1]["has_keypoints"].any()) for i in range(len(dataset))]
    persons = [i for i, has in enumerate(has_person) if has]
    nobody = [i for i, has in enumerate(has_person) if not has]
    assert persons and nobody, has_person
    return [(ALL, [persons, nobody]), (["detection", "keypoints"], [persons[:1], nobody])]


def _rank_batches(checkpoint: Path, data: Path, tasks: list[str], images: list[list[int]]):
    """The model (eval mode: no dropout, fixed batch-norm statistics, so the ranks' gradients
    add up exactly) and each rank's (images, pads, sequences)."""
    mad = load_checkpoint(checkpoint)[0]
    codecs = {name: mad.codecs[name] for name in tasks}
    size = mad.config.image_size
    dataset = CocoMultiTaskDataset(data, "train2017", build_transforms(False, size[0]))
    batches = []
    for rank, indices in enumerate(images):
        pixels, pads, targets = CanvasCollate(size)([dataset[i] for i in indices])
        generator = torch.Generator().manual_seed(rank)
        sequences = {n: c.training_sequences(targets, generator) for n, c in codecs.items()}
        batches.append((pixels, pads, sequences))
    return mad, codecs, batches


def _expected_gradient(checkpoint: Path, data: Path, tasks: list[str], images: list[list[int]]):
    """One process: every task's cross-entropy summed over both ranks' tokens, divided by
    both ranks' token weight, per decoder layer -> the flat gradient."""
    mad, codecs, batches = _rank_batches(checkpoint, data, tasks, images)
    network = mad.required_network()
    total = torch.zeros(())
    for name, codec in codecs.items():
        sums, weights = [], []
        for pixels, pads, sequences in batches:
            seqs = sequences[name]
            if not len(seqs):
                continue
            logits = network(
                pixels, pads, {name: (seqs.inputs, seqs.image_index, codec.vocab_slice())}
            )
            rank_sums, rank_weights = token_losses(logits[name], seqs, codec)
            sums.append(rank_sums)
            weights.append(rank_weights)
        if sums:
            mean = torch.stack(sums).sum(0) / torch.stack(weights).sum(0).clamp(min=1.0)
            total = total + mad.config.task_weights.get(name, 1.0) * mean.sum()
    total.backward()
    return torch.cat([p.grad.flatten() for p in network.parameters()])


def _ddp_rank(rank: int, port: int, checkpoint: Path, data: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for tasks, images in _cases(data):
            mad, codecs, batches = _rank_batches(checkpoint, data, tasks, images)
            network = mad.required_network()
            wrapped = DistributedDataParallel(network)  # kept: its hooks average the gradients
            pixels, pads, sequences = batches[rank]
            losses = masked_training_losses(wrapped, pixels, pads, sequences, codecs)
            expected = _expected_gradient(checkpoint, data, tasks, images)
            assert sorted(losses) == sorted(tasks), (tasks, images)
            weighted_total(losses, mad.config.task_weights).backward()
            got = torch.cat([p.grad.flatten() for p in network.parameters()])
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (
                tasks,
                images,
                (got - expected).abs().max().item(),
            )
    finally:
        dist.destroy_process_group()


def test_ddp_loss_is_the_mean_over_every_ranks_tokens(micro_checkpoint, synth_data):
    mp.spawn(_ddp_rank, args=(free_port(), micro_checkpoint, synth_data), nprocs=2, join=True)
