"""The optimizer step and learning-rate schedule both stand-ins are pretrained with (AdamW, warmup + cosine)."""

from __future__ import annotations

import math

import torch


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimize(loss: torch.Tensor, parameters: list[torch.nn.Parameter], optimizer, schedule) -> None:
    """One clipped step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
