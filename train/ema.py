"""Exponential moving average of the model's weights, kept in fp32 beside the trained model."""

from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema = list(self.module.state_dict().values())
        live = [v.detach().float() for v in model.state_dict().values()]
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        self.module.load_state_dict(model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
