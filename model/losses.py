"""Masked training loss: cross-entropy on masked tokens only, on every decoder layer."""

from __future__ import annotations

import functools
import operator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.codecs import TaskCodec, TrainSequences
from model.network import MADNetwork


def token_losses(
    layer_logits: torch.Tensor, seqs: TrainSequences, codec: TaskCodec
) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_logits [layers, S, T, V_slice] -> (summed cross-entropy of the tokens that carry
    weight (masked ones), their summed weight), each [layers]; targets assigned per layer by
    the codec."""
    sums, weight_sums = [], []
    for logits in layer_logits:
        log_probs = logits.float().log_softmax(-1)
        targets, weights = codec.assign_targets(log_probs.detach(), seqs)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums.append((nll * weights).sum())
        weight_sums.append(weights.sum())
    return torch.stack(sums), torch.stack(weight_sums).detach().float()


def sequence_loss(
    layer_logits: torch.Tensor, seqs: TrainSequences, codec: TaskCodec
) -> torch.Tensor:
    """layer_logits [layers, S, T, V_slice] -> summed over layers of the mean cross-entropy of
    the tokens that carry weight."""
    sums, weight_sums = token_losses(layer_logits, seqs, codec)
    return (sums / weight_sums.clamp(min=1.0)).sum()


def masked_training_losses(
    network: MADNetwork | DistributedDataParallel,
    images: torch.Tensor,
    pad_mask: torch.Tensor,
    sequences: dict[str, TrainSequences],
    codecs: dict[str, TaskCodec],
) -> dict[str, torch.Tensor]:
    """Encode the images once, decode every task's sequences -> loss per task (every codec's;
    0 for a task without sequences in this batch).

    A task's loss is the mean cross-entropy of its weighted tokens, summed over decoder layers.
    Under DDP (`network` wrapped) the mean runs over every rank's tokens: the token weights
    are all-reduced, as DETR all-reduces its box count, so a rank whose images hold more
    objects counts for more, as it would in one process."""
    core = network.module if isinstance(network, DistributedDataParallel) else network
    present = {name: seqs for name, seqs in sequences.items() if len(seqs)}
    if not present:  # detection gives every image a sequence: only a caller's mistake
        raise ValueError("no task has training sequences in this batch")
    logits: dict[str, torch.Tensor] = network(
        images,
        pad_mask,
        {
            name: (seqs.inputs, seqs.image_index, codecs[name].vocab_slice())
            for name, seqs in present.items()
        },
    )
    sums: dict[str, torch.Tensor] = {}
    weight_sums = torch.zeros(len(codecs), len(core.decoder), device=images.device)
    for row, name in enumerate(codecs):  # every rank in the same order
        if name in present:
            sums[name], weight_sums[row] = token_losses(logits[name], present[name], codecs[name])
    world = 1
    if isinstance(network, DistributedDataParallel):
        world = dist.get_world_size()
        dist.all_reduce(weight_sums)
    scale = world / weight_sums.clamp(min=1.0)  # DDP averages the ranks' gradients
    return {
        name: (sums[name] * scale[row]).sum() if name in sums else scale.new_zeros(())
        for row, name in enumerate(codecs)
    }


def weighted_total(losses: dict[str, torch.Tensor], task_weights: dict[str, float]) -> torch.Tensor:
    """Sum of the task losses, each times its weight (1 unless given)."""
    weighted = [task_weights.get(name, 1.0) * loss for name, loss in losses.items()]
    if not weighted:
        raise ValueError("no task losses to add up")
    return functools.reduce(operator.add, weighted)
