"""Training objectives. Every objective also reports L1 and L2 so runs stay comparable."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from train.config import LossConfig

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def psnr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NAFNet's PSNR loss: minimising 10*log10(MSE) per image == maximising mean PSNR."""
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return (10.0 / math.log(10.0)) * torch.log(mse + 1e-8).mean()


def charbonnier_loss(eps: float) -> Objective:
    return lambda pred, target: torch.sqrt((pred - target) ** 2 + eps**2).mean()


# loss.name -> the objective built from the loss section (the names are LossConfig.name's choices).
OBJECTIVES: dict[str, Callable[[LossConfig], Objective]] = {
    "l1": lambda cfg: F.l1_loss,
    "l2": lambda cfg: F.mse_loss,
    "charbonnier": lambda cfg: charbonnier_loss(cfg.charbonnier_eps),
    "psnr": lambda cfg: psnr_loss,
}


def compute_losses(cfg: LossConfig, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'loss': the objective to backpropagate, 'l1', 'l2': detached, for the log}. Computed in fp32."""
    pred = pred.float()
    target = target.float()
    loss = OBJECTIVES[cfg.name](cfg)(pred, target)
    with torch.no_grad():
        l1 = loss.detach() if cfg.name == "l1" else F.l1_loss(pred, target)
        l2 = loss.detach() if cfg.name == "l2" else F.mse_loss(pred, target)
    return {"loss": loss, "l1": l1, "l2": l2}
