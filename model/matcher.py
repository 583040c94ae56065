"""Hungarian matching of detection slots to ground-truth objects (scipy).

The cost of slot i for object j is the mean cross-entropy of the object's 5 tokens under the
slot's predicted distribution. A token shown in the input counts as certain: it costs nothing
if it equals the object's token and SHOWN_MISMATCH_COST otherwise.
"""

from __future__ import annotations

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
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Optimal slot -> object assignment per sequence: a list of (slot ids, object ids), on
    the host (scipy solves there; one copy of the costs, not one per sequence)."""
    costs = slot_costs(log_probs.float(), inputs, shown, objects).cpu()
    result = []
    for s, n in enumerate(num_objects.tolist()):
        rows, cols = linear_sum_assignment(costs[s, :, :n].numpy())
        result.append((torch.from_numpy(rows).long(), torch.from_numpy(cols).long()))
    return result


def flat_assignment(
    assignment: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """match_slots' per-sequence pairs -> (sequence, slot, object) index vectors on `device`,
    moved in one copy so the targets are written by one indexing op, not one per sequence."""
    sizes = torch.tensor([len(slots) for slots, _ in assignment], dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    index = torch.stack(
        [
            torch.repeat_interleave(torch.arange(len(assignment)), sizes),
            torch.cat([empty, *(slots for slots, _ in assignment)]),
            torch.cat([empty, *(objs for _, objs in assignment)]),
        ]
    ).to(device, non_blocking=True)
    return index[0], index[1], index[2]
