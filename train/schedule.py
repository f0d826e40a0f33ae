"""Learning rate as a pure function of the optimizer step, and the progressive-learning stage plan.

The learning rate is recomputed from the step count before every optimizer step instead of being
kept in a scheduler object, so a resumed run continues the same curve by construction and the
rate advances exactly once per optimizer step whatever the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from train.config import Config, ConfigError, LRConfig


def _cosine_from(base_lr: float, eta_min: float, progress: float) -> float:
    return eta_min + 0.5 * (base_lr - eta_min) * (1 + math.cos(math.pi * progress))


def _constant(lr_cfg: LRConfig, base_lr: float, recipe_iters: int, step: float) -> float:
    return base_lr


def _cosine(lr_cfg: LRConfig, base_lr: float, recipe_iters: int, step: float) -> float:
    return _cosine_from(base_lr, lr_cfg.eta_min, min(step / max(recipe_iters, 1), 1.0))


def _restart_cosine(lr_cfg: LRConfig, base_lr: float, recipe_iters: int, step: float) -> float:
    """BasicSR's CosineAnnealingRestartCyclicLR with restart weights 1."""
    start = 0
    last = len(lr_cfg.periods) - 1
    for i, (period, eta_min) in enumerate(zip(lr_cfg.periods, lr_cfg.eta_mins)):
        if step < start + period or i == last:
            return _cosine_from(base_lr, eta_min, min((step - start) / period, 1.0))
        start += period
    raise AssertionError("unreachable: the last period returns")


# lr.schedule -> the rate before warmup (the names are LRConfig.schedule's choices).
SCHEDULES: dict[str, Callable[[LRConfig, float, int, float], float]] = {
    "restart_cosine": _restart_cosine,
    "cosine": _cosine,
    "constant": _constant,
}


def lr_at(lr_cfg: LRConfig, base_lr: float, recipe_iters: int, step: float) -> float:
    """Rate at recipe iteration `step` (0-based; fractional when train.batch_rule=iterations stretches
    the run: see StagePlan.step_scale). `recipe_iters`, the recipe's length (the sum of
    progressive.iters), is the span of `cosine`; warmup_iters and periods count recipe iterations too."""
    warm = (step + 1) / lr_cfg.warmup_iters if lr_cfg.warmup_iters and step < lr_cfg.warmup_iters else 1.0
    return warm * SCHEDULES[lr_cfg.schedule](lr_cfg, base_lr, recipe_iters, step)


@dataclass(frozen=True)
class Stage:
    index: int
    start: int  # first optimizer step of the stage
    end: int  # one past the last
    patch: int
    batch: int  # per process and loaded batch
    accum: int  # loaded batches per optimizer step
    micro_batch: int  # images per forward/backward: batch, or a divisor of it (train/memory_plan.py)
    activations: str  # what backward keeps: model.ACTIVATION_MODES
    predicted: float | None = None  # the memory plan's peak bytes per process; None: planned without one


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    step_scale: float  # recipe iterations per optimizer step here (lr curve follows the recipe)
    note: str  # what the batch rule did, for the log
    world_size: int  # the processes it is planned for

    @property
    def total_steps(self) -> int:
        return self.stages[-1].end

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.end:
                return stage
        return self.stages[-1]


def plan_stages(cfg: Config, world_size: int) -> StagePlan:
    """Applies the batch rule: how a recipe written for N GPUs runs on `world_size` processes."""
    p = cfg.progressive
    ref = cfg.train.reference_world_size
    rule = cfg.train.batch_rule if ref is not None and ref != world_size else "none"
    user_accum = cfg.train.grad_accum
    # Whole batches with the default activations; a memory plan (train/memory_plan.py) refits them.
    activations = "checkpoint" if cfg.model.checkpointing else "lean"
    stages = []
    start = 0
    notes = []
    step_scale = 1.0
    for i, (iters, patch, batch) in enumerate(zip(p.iters, p.patch, p.batch)):
        accum = 1
        if rule == "accumulate":
            # Keep the recipe's global batch: the per-process share is split into micro-batches
            # no larger than the recipe's per-GPU batch (which is what fits in memory).
            share = max(1, round(ref * batch / world_size))
            accum = math.ceil(share / batch)
            batch = math.ceil(share / accum)
            got = batch * accum * world_size
            notes.append(
                f"stage {i}: global batch {ref * p.batch[i]} kept as {batch} x {accum} accum x "
                f"{world_size} proc = {got}"
            )
        elif rule == "iterations":
            # Keep the samples seen: fewer processes run proportionally more steps.
            step_scale = world_size / ref
            iters = max(1, round(iters * ref / world_size))
        stages.append(Stage(i, start, start + iters, patch, batch, accum * user_accum, micro_batch=batch,
                            activations=activations))
        start += iters
    if rule == "accumulate":
        note = (
            f"batch rule 'accumulate': recipe is for {ref} GPUs, running on {world_size} "
            "processes with gradient accumulation; " + "; ".join(notes)
        )
    elif rule == "iterations":
        note = (
            f"batch rule 'iterations': recipe is for {ref} GPUs, running on {world_size} processes "
            f"at the recipe's per-GPU batch for {start} steps (x{ref / world_size:g}); "
            "the learning-rate curve is stretched to match"
        )
    else:
        note = f"running the recipe as written on {world_size} process(es)"
    return StagePlan(tuple(stages), step_scale, note, world_size)


def resume_step(cfg: Config, saved_step: int, saved_world_size: int, plan: StagePlan) -> int:
    """The optimizer step of `plan` (this launch's) that continues a checkpoint written at `saved_step`
    on `saved_world_size` processes. The recipe iteration is the invariant: under train.batch_rule=iterations a step covers
    world_size / reference_world_size recipe iterations, so the step count is rescaled; it must land on
    a whole step of the same stage, or the resume is refused (ConfigError). Other rules keep the step."""
    ref, world_size, new = cfg.train.reference_world_size, plan.world_size, plan
    if cfg.train.batch_rule != "iterations" or ref is None or saved_world_size == world_size:
        return saved_step
    old = plan_stages(cfg, saved_world_size)  # the saving launch's stages
    recipe_iteration = Fraction(saved_step * saved_world_size, ref)
    step = recipe_iteration * ref / world_size
    old_stage = old.stage_at(saved_step)
    fits = step.denominator == 1 and new.stage_at(int(step)).index == old_stage.index
    if fits:
        # Stage lengths are rounded per world size: the position inside the stage must map too.
        offset = Fraction(saved_step - old_stage.start, old_stage.end - old_stage.start)
        new_stage = new.stages[old_stage.index]
        fits = new_stage.start + offset * (new_stage.end - new_stage.start) == step
    if not fits:
        raise ConfigError(
            f"cannot resume the checkpoint of step {saved_step} ({saved_world_size} processes, recipe iteration "
            f"{float(recipe_iteration):g}) on {world_size} processes: with train.batch_rule=iterations one step "
            f"here covers {world_size}/{ref} recipe iterations, so that position is step {float(step):g}, not a "
            f"whole step of stage {old_stage.index}. Resume on {saved_world_size} processes, or on a number of "
            f"processes that divides {saved_step * saved_world_size} (and the recipe's stage lengths)"
        )
    return int(step)
