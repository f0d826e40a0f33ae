"""How the prepared model takes its micro-batches: through accelerate (DDP, or one process) or through
DeepSpeed's engine. Every DeepSpeed difference of the training path lives here: its JSON's "auto"
values, the accumulation boundary, ZeRO-3's sliced weights, export from its checkpoint."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from train.config import Config, ConfigError
from train.launch import Launch
from train.schedule import StagePlan


class AccelerateEngine:
    """DDP or one process: accelerate's backward (its GradScaler under fp16), DDP's no_sync."""

    def __init__(self, accelerator, model: torch.nn.Module, launch: Launch):
        self.acc, self.model, self.launch = accelerator, model, launch

    def accumulating(self, last: bool):
        """Around a micro-batch's forward and backward: gradients are all-reduced on the last one only."""
        return contextlib.nullcontext() if last else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.acc.backward(loss)

    def full_module(self, net: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """`net` with all its weights on this rank, for per-rank work (validation)."""
        return net

    def trained_weights(self, net: torch.nn.Module) -> dict[str, Any] | None:
        """The trained weights for export; None: the checkpointer consolidates them from the checkpoint."""
        return self.acc.get_state_dict(net)


class DeepSpeedEngine(AccelerateEngine):
    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # the boundary set in backward() decides when DeepSpeed reduces

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # accelerate's backward would make every micro-batch a DeepSpeed step; only the last is a
        # boundary. engine.step() reduces, clips, steps and zeroes the gradients (and skips a
        # non-finite step: bf16 needs check_grad_overflow), so the optimizer's own step is a no-op.
        self.model.set_gradient_accumulation_boundary(last)
        self.model.backward(loss)
        if last:
            self.model.step()

    def full_module(self, net: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """Under ZeRO-3 a forward of the sharded module gathers weights collectively, so ranks with
        unequal work would hang: gather once (all ranks) into a plain copy, built by `rebuild`."""
        if not self.launch.zero3:
            return net
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(net.parameters())):
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        full = rebuild()
        full.load_state_dict(state)
        return full.to(self.launch.device, self.launch.weight_dtype).train(net.training)

    def trained_weights(self, net: torch.nn.Module) -> dict[str, Any] | None:
        return None  # any ZeRO stage: the fp32 master weights, consolidated from the checkpoint


def build_engine(accelerator, model: torch.nn.Module, launch: Launch) -> AccelerateEngine:
    return (DeepSpeedEngine if launch.deepspeed else AccelerateEngine)(accelerator, model, launch)


def configure_deepspeed(ds: dict[str, Any], cfg: Config, launch: Launch, schedule: StagePlan) -> None:
    """Refuses what DeepSpeed cannot run, then fills its JSON's "auto" values from the run config,
    the one source of truth.

    The trainer accumulates micro-batches itself (per stage, see train.schedule) and marks the last
    one as DeepSpeed's accumulation boundary, so DeepSpeed sees one micro-batch per step. Its batch
    figures only feed its own logging: later stages' other micro-batch sizes do not upset it.
    """
    if launch.zero3 and cfg.train.ema_decay:
        raise ConfigError("train.ema_decay is not supported with DeepSpeed ZeRO-3 (each process holds only a "
                          "slice of the weights); use ZeRO-2 or DDP, or set train.ema_decay=null")
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else 0.0  # 0: DeepSpeed does not clip
    first = schedule.stages[0].batch
    wanted = {"train_micro_batch_size_per_gpu": first, "gradient_accumulation_steps": 1,
              "train_batch_size": first * launch.world_size, "gradient_clipping": clip}
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f"DeepSpeed config: {key}={ds[key]!r} disagrees with the run config ({value!r}); set it to "
                '"auto" (batch, accumulation and clipping come from progressive.*, train.* and optim.grad_clip)'
            )
