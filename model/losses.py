"""Masked training loss: cross-entropy on masked tokens only, on every decoder layer."""

from __future__ import annotations

import functools
import operator

import torch
from torch.nn.parallel import DistributedDataParallel

from model.codecs import TaskCodec, TrainSequences
from model.network import MADNetwork


def sequence_loss(
    layer_logits: torch.Tensor, seqs: TrainSequences, codec: TaskCodec
) -> torch.Tensor:
    """layer_logits [layers, S, T, V_slice] -> summed over layers of the mean cross-entropy of
    the tokens that carry weight (masked ones), targets assigned per layer by the codec."""
    total = layer_logits.new_zeros((), dtype=torch.float)
    for logits in layer_logits:
        log_probs = logits.float().log_softmax(-1)
        targets, weights = codec.assign_targets(log_probs.detach(), seqs)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total = total + (nll * weights).sum() / weights.sum().clamp(min=1.0)
    return total


def masked_training_losses(
    network: MADNetwork | DistributedDataParallel,
    images: torch.Tensor,
    pad_mask: torch.Tensor,
    sequences: dict[str, TrainSequences],
    codecs: dict[str, TaskCodec],
) -> dict[str, torch.Tensor]:
    """Encode the images once, decode every task's sequences -> unweighted loss per task
    (tasks with no sequences in this batch are left out). `network` may be DDP-wrapped."""
    present = {name: seqs for name, seqs in sequences.items() if len(seqs)}
    logits: dict[str, torch.Tensor] = network(
        images,
        pad_mask,
        {
            name: (seqs.inputs, seqs.image_index, codecs[name].vocab_slice())
            for name, seqs in present.items()
        },
    )
    return {name: sequence_loss(logits[name], seqs, codecs[name]) for name, seqs in present.items()}


def weighted_total(losses: dict[str, torch.Tensor], task_weights: dict[str, float]) -> torch.Tensor:
    """Sum of the task losses, each times its weight (1 unless given)."""
    weighted = [task_weights.get(name, 1.0) * loss for name, loss in losses.items()]
    if not weighted:
        raise ValueError("no task has training sequences in this batch")
    return functools.reduce(operator.add, weighted)
