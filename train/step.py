"""The training step's forward and backward, one function for the trainer and the memory plan's
calibration (and the benchmarks that measure a step): what calibration measures is what trains."""

from __future__ import annotations

from collections.abc import Callable

import torch

from model import PRECISIONS
from train.config import LossConfig
from train.losses import compute_losses


def autocast_dtype(precision: str) -> torch.dtype | None:
    """accelerate's mixed_precision (or model.PRECISIONS' names) as an autocast dtype; None: fp32."""
    return PRECISIONS.get(precision)


def forward_backward(net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, autocast: torch.dtype | None,
                     loss: LossConfig = LossConfig(), share: float = 1.0,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> dict[str, torch.Tensor]:
    """The forward under `autocast` (None: none), the objective of `loss` (train.losses, in fp32) times
    `share` of the optimizer step, and `backward` of it. Returns compute_losses' figures, unscaled."""
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = net(x)
    losses = compute_losses(loss, out, target)
    backward(losses["loss"] * share)
    return losses
