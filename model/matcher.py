"""Hungarian matching of detection slots to ground-truth objects (scipy).

The cost of slot i for object j is the mean cross-entropy of the object's 5 tokens under the
slot's predicted distribution. A token shown in the input counts as certain: it costs nothing
if it equals the object's token and SHOWN_MISMATCH_COST otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SHOWN_MISMATCH_COST = 100.0


def slot_costs(
    log_probs: torch.Tensor, inputs: torch.Tensor, shown: torch.Tensor, objects: torch.Tensor
) -> torch.Tensor:
    """Matching cost of every slot against every object.

    log_probs: [S, N, 5, V] per-slot log-probabilities (local ids)
    inputs:    [S, N, 5] input tokens (local ids); shown: [S, N, 5] bool
    objects:   [S, M, 5] ground-truth tokens (local ids)
    returns:   [S, N, M]
    """
    S, N, T, V = log_probs.shape
    M = objects.shape[1]
    index = objects.unsqueeze(1).expand(S, N, M, T).unsqueeze(-1)
    nll = -log_probs.unsqueeze(2).expand(S, N, M, T, V).gather(-1, index).squeeze(-1)
    mismatch = (inputs.unsqueeze(2) != objects.unsqueeze(1)).float() * SHOWN_MISMATCH_COST
    cost = torch.where(shown.unsqueeze(2), mismatch, nll)  # [S, N, M, 5]
    return cost.mean(-1)


@torch.no_grad()
def match_slots(
    log_probs: torch.Tensor,
    inputs: torch.Tensor,
    shown: torch.Tensor,
    objects: torch.Tensor,
    num_objects: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal slot -> object assignment of every sequence, as three index vectors on
    `log_probs`' device: (sequence, slot, object) of each matched pair, sequence by sequence.

    scipy solves on the host: the costs cross once, the per-sequence loop touches numpy
    arrays only (torch calls cost microseconds each, at batch 256 a thousand per decoder
    layer), and the indices cross back in one copy, so the targets are written by one
    indexing op."""
    costs = slot_costs(log_probs.float(), inputs, shown, objects).cpu().numpy()
    counts = num_objects.tolist()
    slots, objs = [], []
    for s, n in enumerate(counts):
        rows, cols = linear_sum_assignment(costs[s, :, :n])
        slots.append(rows)
        objs.append(cols)
    matched = [len(rows) for rows in slots]
    index = np.stack(
        [
            np.repeat(np.arange(len(counts)), matched),
            np.concatenate([np.zeros(0, dtype=np.int64), *slots]),
            np.concatenate([np.zeros(0, dtype=np.int64), *objs]),
        ]
    ).astype(np.int64)
    on_device = torch.from_numpy(index).to(log_probs.device, non_blocking=True)
    return on_device[0], on_device[1], on_device[2]
