"""The demo world trainers' learning rate: transformers' cosine schedule on a wall-clock budget.

`train-lmm` and `train-sam` run for a number of minutes, so the number of steps is not
known when they start. BudgetSchedule wraps transformers' get_cosine_schedule_with_warmup
over RESOLUTION virtual steps after the warm-up, and each training step moves it to the
virtual step of the budget's progress: the cosine decays to 0 exactly when the budget
runs out, whatever the machine's speed.
"""
from __future__ import annotations

import torch
from transformers import get_cosine_schedule_with_warmup

RESOLUTION = 100_000  # virtual steps of the cosine part; fine enough to be continuous


class BudgetSchedule:
    """Linear warm-up, then a cosine decay to 0 over the budget's progress.

    warmup_steps: warm up over this many real steps (the rate of step s is
    (s + 1) / warmup_steps of the peak); warmup_share: or over this share of the budget
    (the rate at progress p is p / warmup_share, at least 1e-3 / warmup_share), the
    cosine then running over the rest of it. The peak is each parameter group's lr when
    the schedule is built.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, warmup_share: float = 0.0):
        if warmup_steps and warmup_share:
            raise ValueError("warm up over steps or over a share of the budget, not both")
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        shared = round(warmup_share * RESOLUTION)
        self.schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps + shared, warmup_steps + RESOLUTION)
        self.factor = self.schedule.lr_lambdas[0]

    def virtual_step(self, step: int, progress: float) -> float:
        """Where step `step` at `progress` (0 -> 1) of the budget sits on the schedule."""
        if step < self.warmup_steps:  # step + 1 == warmup_steps lands on the peak, as before
            return step + 1
        return self.warmup_steps + min(1.0, max(progress, 1e-3)) * RESOLUTION

    def set(self, step: int, progress: float) -> float:
        """Set every parameter group's rate for this step; returns the first group's."""
        factor = self.factor(self.virtual_step(step, progress))
        for group, peak in zip(self.optimizer.param_groups, self.schedule.base_lrs):
            group["lr"] = peak * factor
        return self.optimizer.param_groups[0]["lr"]
