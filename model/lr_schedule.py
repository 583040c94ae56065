"""The learning-rate schedule: linear warmup, then a cosine to a floor, optionally paced by a
wall-time budget so that it has annealed when the time is up."""

from __future__ import annotations

import math
from typing import Protocol

import torch


class ScheduleSettings(Protocol):
    """What the schedule reads of a run's settings (model.train_start.TrainConfig)."""

    steps: int
    warmup_steps: int
    min_lr_scale: float
    anneal_by_deadline: bool


def lr_factor(step: float, cfg: ScheduleSettings) -> float:
    """Linear warmup, then cosine decay to min_lr_scale (`step` may be fractional: paced by
    wall time)."""
    if step < cfg.warmup_steps:
        return min(1.0, (step + 1) / cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_scale + (1 - cfg.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * progress))


def resumed_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSettings, start_step: int, pace: DeadlinePace
) -> torch.optim.lr_scheduler.LambdaLR:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"] / max(lr_factor(start_step - 1, cfg), 1e-12))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, pace.factor, last_epoch=start_step - 1)


class DeadlinePace:
    """The lr factor of a schedule step; with anneal_by_deadline, the cosine after the warmup
    runs on steps or wall time, whichever is further along: the budget left once the warmup
    (or a resumed run's first step) is done maps onto the steps left, so the cosine reaches
    its floor when the time is up. A resumed run paces the rest against its own budget."""

    def __init__(self, cfg: ScheduleSettings, start_step: int, paced: float = 0.0):
        self.cfg = cfg
        # (schedule step, share of the budget spent) to pace from
        self.anchor: tuple[float, float] | None = None
        self.paced = paced  # the schedule step the wall time has reached (a resumed run's)
        self.start = max(start_step, cfg.warmup_steps)

    def update(self, step: int, spent: float) -> None:
        """After `step` steps, `spent` of the wall-time budget is gone."""
        if not self.cfg.anneal_by_deadline or step < self.start:
            return
        if self.anchor is None:
            self.anchor = (max(step, self.paced), spent)
        anchor_step, anchor_spent = self.anchor
        progress = (spent - anchor_spent) / max(1e-9, 1 - anchor_spent)
        self.paced = anchor_step + progress * max(0.0, self.cfg.steps - anchor_step)

    def factor(self, step: int) -> float:
        return lr_factor(step if step < self.start else max(step, self.paced), self.cfg)

    def progress(self) -> float:
        """How far along the cosine the wall time has paced it, 0..1: saved, so that a
        resumed run (whose --steps may differ) goes on from there."""
        span = max(1, self.cfg.steps - self.cfg.warmup_steps)
        return min(1.0, max(0.0, (self.paced - self.cfg.warmup_steps) / span))

    @staticmethod
    def step_at(progress: float, cfg: ScheduleSettings) -> float:
        """The schedule step `progress` of the way along cfg's cosine (0: not paced)."""
        if progress <= 0:
            return 0.0
        return cfg.warmup_steps + progress * max(1, cfg.steps - cfg.warmup_steps)
