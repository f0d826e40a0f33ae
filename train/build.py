"""Builders of a training run, in the order the Trainer calls them (torchtitan's style: functions the
Trainer is handed the results of): the network and its optimizer, DeepSpeed's config, the memory
plan, compile, accelerate's prepare, the engine that steps the model, the EMA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from train.config import Config, OptimConfig
from train.ema import EMA
from train.engine import AccelerateEngine, build_engine, configure_deepspeed
from train.launch import Launch
from train.memory_plan import MemoryPlan, agreed_plan
from train.network import initial_network
from train.schedule import StagePlan

# optim.name -> the optimizer of `params` (the names are OptimConfig.name's choices).
OPTIMIZERS: dict[str, Callable[[OptimConfig, Any], torch.optim.Optimizer]] = {
    # Fused: one kernel for all parameters, ~3x faster than foreach on CPU too (benchmarks/model_speed.py).
    "adamw": lambda o, params: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                                 fused=True),
    "sgd": lambda o, params: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             foreach=True),
}


@dataclass(frozen=True)
class Training:
    """What the Trainer trains, built and prepared."""

    model: torch.nn.Module  # prepared: DDP / DeepSpeed / torch.compile wrappers around the network
    optimizer: torch.optim.Optimizer  # prepared
    engine: AccelerateEngine  # how `model` takes its micro-batches (train/engine.py)
    ema: EMA | None
    schedule: StagePlan  # the stages to run: the memory plan's, when there is one
    memory_plan: MemoryPlan | None


def build_training(cfg: Config, launch: Launch, accelerator, schedule: StagePlan) -> Training:
    """Every rank, in this order (the network's initial weights come from the RNG the caller seeded)."""
    net = initial_network(cfg)
    optimizer = OPTIMIZERS[cfg.optim.name](cfg.optim, net.parameters())
    if launch.deepspeed:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, launch, schedule)
    memory_plan = agreed_plan(accelerator, cfg, launch, schedule)
    if memory_plan is not None:
        schedule = memory_plan.schedule
    if cfg.model.compile:
        # Dynamic shapes: one graph serves every progressive-learning patch size. torch 2.13's
        # dynamo fails on dynamic shapes inside activation checkpointing: then one graph per stage.
        checkpointing = any(s.activations == "checkpoint" for s in schedule.stages)
        net = torch.compile(net, dynamic=not checkpointing)
    model, optimizer = accelerator.prepare(net, optimizer)
    engine = build_engine(accelerator, model, launch)
    decay = cfg.train.ema_decay
    ema = EMA(accelerator.unwrap_model(model, keep_torch_compile=False), decay) if decay else None
    return Training(model, optimizer, engine, ema, schedule, memory_plan)
