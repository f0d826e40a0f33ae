"""Training objectives. Every objective also reports L1 and L2 so runs stay comparable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def objective(name: str, pred: torch.Tensor, target: torch.Tensor, charbonnier_eps: float = 1e-3) -> torch.Tensor:
    if name == "l1":
        return F.l1_loss(pred, target)
    if name == "l2":
        return F.mse_loss(pred, target)
    if name == "charbonnier":
        return torch.sqrt((pred - target) ** 2 + charbonnier_eps**2).mean()
    if name == "psnr":
        # NAFNet's PSNR loss: minimising 10*log10(MSE) per image == maximising mean PSNR.
        mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return (10.0 / math.log(10.0)) * torch.log(mse + 1e-8).mean()
    raise ValueError(f"unknown loss '{name}' (l1, l2, charbonnier, psnr)")


def compute_losses(name: str, pred: torch.Tensor, target: torch.Tensor, charbonnier_eps: float = 1e-3) -> dict[str, torch.Tensor]:
    """{'loss': the objective to backpropagate, 'l1', 'l2': detached, for the log}. Computed in fp32."""
    pred = pred.float()
    target = target.float()
    loss = objective(name, pred, target, charbonnier_eps)
    with torch.no_grad():
        l1 = loss.detach() if name == "l1" else F.l1_loss(pred, target)
        l2 = loss.detach() if name == "l2" else F.mse_loss(pred, target)
    return {"loss": loss, "l1": l1, "l2": l2}
