"""Masked training loss: cross-entropy on masked tokens only, on every decoder layer."""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

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


@dataclass
class TaskLosses:
    """terms: each task's loss, to weight, add up and backpropagate on this rank (every
    codec's; 0 for a task without sequences here). totals [tasks, 2, layers], rows in the
    order of terms, summed over every rank: the cross-entropy of the weighted tokens
    (detached) and their weight."""

    terms: dict[str, torch.Tensor]
    totals: torch.Tensor

    def means(self) -> dict[str, torch.Tensor]:
        """For logging: each task's mean cross-entropy of the weighted tokens of every rank,
        summed over decoder layers (NaN for a task without tokens on any rank); in one
        process the values of `terms`."""
        sums, weights = self.totals.unbind(1)
        means = (sums / weights.clamp(min=1.0)).sum(-1).where(weights.sum(-1) > 0, math.nan)
        return dict(zip(self.terms, means.unbind(), strict=True))


def masked_training_losses(
    network: MADNetwork | DistributedDataParallel,
    images: torch.Tensor,
    pad_mask: torch.Tensor,
    sequences: dict[str, TrainSequences],
    codecs: dict[str, TaskCodec],
) -> TaskLosses:
    """Encode the images once, decode every task's sequences -> the task losses.

    A task's loss is the mean cross-entropy of its weighted tokens, summed over decoder layers.
    Under DDP (`network` wrapped) the mean runs over every rank's tokens: the token weights
    are all-reduced, as DETR all-reduces its box count, so a rank whose images hold more
    objects counts for more, as it would in one process; a rank without any sequence joins
    the step with zero gradients. ValueError when no rank has a sequence of any task (a
    caption-only model on uncaptioned images), on every rank alike."""
    if isinstance(network, DistributedDataParallel):
        core, group = network.module, network.process_group
    else:
        core, group = network, None
    present = {name: seqs for name, seqs in sequences.items() if len(seqs)}
    if not present and group is None:
        raise ValueError("no task has training sequences in this batch")
    logits: dict[str, torch.Tensor] = network(  # under DDP every rank runs its forward
        images,
        pad_mask,
        {
            name: (seqs.inputs, seqs.image_index, codecs[name].vocab_slice())
            for name, seqs in present.items()
        },
    )
    sums: dict[str, torch.Tensor] = {}
    totals = torch.zeros(len(codecs), 2, len(core.decoder), device=images.device)
    for row, name in enumerate(codecs):  # every rank in the same order: one all-reduce
        if name in present:
            sums[name], totals[row, 1] = token_losses(logits[name], present[name], codecs[name])
            totals[row, 0] = sums[name].detach()
    world = 1
    if group is not None:
        world = dist.get_world_size(group)
        dist.all_reduce(totals, group=group)
    weight_sums = totals[:, 1]
    if not present:  # a value read (a host sync) only here: every rank that reads agrees
        if not weight_sums.any().item():
            raise ValueError("no task has training sequences in this batch, on any rank")
        # DDP waits for a gradient of every parameter: give each a zero one
        anchor = torch.stack([p.view(-1)[0] for p in core.parameters() if p.requires_grad])
        return TaskLosses({name: 0.0 * anchor.sum() for name in codecs}, totals)
    scale = world / weight_sums.clamp(min=1.0)  # DDP averages the ranks' gradients
    terms = {
        name: (sums[name] * scale[row]).sum() if name in sums else scale.new_zeros(())
        for row, name in enumerate(codecs)
    }
    return TaskLosses(terms, totals)


def weighted_total(losses: dict[str, torch.Tensor], task_weights: dict[str, float]) -> torch.Tensor:
    """Sum of the task losses, each times its weight (1 unless given)."""
    weighted = [task_weights.get(name, 1.0) * loss for name, loss in losses.items()]
    if not weighted:
        raise ValueError("no task losses to add up")
    return functools.reduce(operator.add, weighted)
