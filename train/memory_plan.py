"""The memory plan: per progressive stage, the micro-batch, accumulation and activation mode that fit.

A training process holds two kinds of memory on its device:
- state, whose size follows from the parameter count and the setup: weights, gradients (and DDP's
  gradient buckets), optimizer state, the EMA copy, DeepSpeed's fp32 master weights and ZeRO's
  sharding of them (`StateFootprint.parts`);
- a training step's activations and transients, linear in the pixels of a micro-batch. They are
  measured, not assumed (`calibrate`): one forward and backward of the run's network at two small
  patch sizes, under the run's precision, activation mode and objective, through the trainer's own
  step function (train/step.py). On CUDA the caching allocator's peak
  counts them (workspaces included); on a CPU, where oneDNN's buffers and the C library's heap add
  ~15-25% to what the tensors hold, the peak RSS of fresh processes does (`_cpu_peaks`). So the plan holds
  for any preset, any `model.*` shape override and any network by import path (model.arch; its module
  on PYTHONPATH, which the fresh processes inherit).

The plan's output is the stages the trainer runs (train.schedule.StagePlan, micro-batch, activations
and predicted peak filled in). Each stage keeps its global batch exactly: its per-process batch is split into equal micro-batches
(the largest divisor of the batch that fits) and the trainer accumulates them. Full activation
checkpointing is used only where a micro-batch of one image does not fit otherwise, and a stage
that does not fit even then is refused before any step. Every predicted peak stays within
USABLE_SHARE of the budget, less what the device holds outside the training tensors (`reserved`:
RESERVED_CUDA for the CUDA context and libraries; on a CPU the process's own memory, measured).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model import set_activations
from train.config import Config, ConfigError, LossConfig
from train.distributed import from_main, smallest
from train.host_memory import retain_freed_memory, rss_kib
from train.launch import Launch
from train.network import build_network, network_record, parameter_count, record_channels
from train.schedule import StagePlan
from train.step import autocast_dtype, forward_backward

USABLE_SHARE = 0.9  # the rest absorbs the allocator's fragmentation (reserved beyond allocated on CUDA)
RESERVED_CUDA = 2**30  # CUDA context, cuBLAS/cuDNN handles: outside torch's allocator counts
CALIBRATION_PATCHES = (64, 128)
CPU_SAMPLES = 3  # calibration processes on a CPU (see _cpu_peaks)
CPU_TIMEOUT_S = 900  # per calibration process
GB = 2**30  # as nvidia-smi counts, and the logged peak_mem_gb: a "24 GB" card holds 24 of these
MODES = ("lean", "checkpoint")  # the fastest first: the plan takes the first that fits


class MemoryPlanError(ConfigError):
    """A stage that cannot fit the budget (with what it needs), or a calibration that failed."""


@dataclass(frozen=True)
class StepCost:
    """A training step's memory beyond the state: fixed + per_pixel x (micro-batch x patch^2) bytes."""

    per_pixel: float
    fixed: float

    def bytes(self, micro_batch: int, patch: int) -> float:
        return self.fixed + self.per_pixel * micro_batch * patch * patch

    @staticmethod
    def fit(patches: tuple[int, int], peaks: list[float], batch: int) -> StepCost:
        """The line through two measured peaks at two patch sizes (`batch` images each)."""
        (small, large), (low, high) = patches, peaks
        per_pixel = (high - low) / (batch * (large**2 - small**2))
        if not per_pixel > 0:
            raise MemoryPlanError(f"memory calibration measured no growth from {small} to {large} px "
                                  f"({low / 2**20:.0f} -> {high / 2**20:.0f} MiB): cannot plan")
        return StepCost(per_pixel, max(0.0, low - per_pixel * batch * small**2))


@dataclass(frozen=True, kw_only=True)
class StateFootprint:
    """What decides the size of a process's training state: parameters, precision, optimizer, EMA,
    processes, DeepSpeed's ZeRO stage."""

    params: int
    precision: str = "no"  # no | bf16 | fp16
    optimizer: str = "adamw"
    ema: bool = False
    world_size: int = 1
    zero_stage: int | None = None  # None: DDP or one process

    def parts(self) -> dict[str, float]:
        """Bytes per process, by what holds them."""
        n, shards = self.params, self.world_size
        moments = 2 if self.optimizer == "adamw" else 1
        if self.zero_stage is None:
            state = {"weights": 4 * n, "gradients": 4 * n, "optimizer": 4 * moments * n}
            if shards > 1:
                state["DDP buckets"] = 4 * n
        else:
            low_precision = self.precision in ("bf16", "fp16")  # DeepSpeed keeps those weights in 2 bytes
            width = 2 if low_precision else 4
            state = {"weights": width * n / (shards if self.zero_stage >= 3 else 1),
                     "gradients": width * n / (shards if self.zero_stage >= 2 else 1),
                     "optimizer": 4 * moments * n / (shards if self.zero_stage >= 1 else 1)}
            if low_precision:
                state["fp32 master weights"] = 4 * n / (shards if self.zero_stage >= 1 else 1)
        if self.ema:
            state["EMA"] = 4 * n
        return state


@dataclass(frozen=True)
class MemoryPlan:
    budget: float
    reserved: float
    state: dict[str, float]
    costs: dict[str, StepCost]
    schedule: StagePlan  # what the trainer runs: each stage's micro_batch, activations, predicted peak set

    @property
    def usable(self) -> float:
        return USABLE_SHARE * self.budget

    def table(self) -> str:
        state = sum(self.state.values())
        lines = [f"memory plan: budget {self.budget / GB:.1f} GB, predicted peaks kept under {self.usable / GB:.1f} GB "
                 f"({USABLE_SHARE:.0%}); reserved {self.reserved / GB:.2f} GB; state {state / GB:.2f} GB ("
                 + ", ".join(f"{k} {v / GB:.2f}" for k, v in self.state.items()) + "); step memory measured: "
                 + ", ".join(f"{mode} {c.per_pixel / 1e3:.1f} kB/px + {c.fixed / 2**20:.0f} MiB"
                             for mode, c in self.costs.items()),
                 "| stage | patch | batch | micro-batch x accum | activations | predicted peak GB |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {s.index} | {s.patch} | {s.batch} | {s.micro_batch} x {s.batch // s.micro_batch} | "
                  f"{s.activations} | {s.predicted / GB:.2f} |" for s in self.schedule.stages]
        return "\n".join(lines)


def plan_memory(schedule: StagePlan, footprint: StateFootprint, budget: float, reserved: float, cost_of,
                modes: tuple[str, ...] = MODES) -> MemoryPlan:
    """Fits every stage of `schedule` (its per-process batch) into `budget` bytes, trying `modes` in
    order; `cost_of(mode)` -> StepCost is called once per mode the plan needs. Raises MemoryPlanError."""
    state_parts = footprint.parts()
    fixed = reserved + sum(state_parts.values())
    usable = USABLE_SHARE * budget
    costs: dict[str, StepCost] = {}
    planned = []
    for stage in schedule.stages:
        index, patch, batch = stage.index, stage.patch, stage.batch
        choice = None
        for mode in modes:
            if mode not in costs:
                costs[mode] = cost_of(mode)
            for micro in sorted((d for d in range(1, batch + 1) if batch % d == 0), reverse=True):
                predicted = fixed + costs[mode].bytes(micro, patch)
                if predicted <= usable:
                    choice = dataclasses.replace(stage, micro_batch=micro, activations=mode, predicted=predicted)
                    break
            if choice is not None:
                break
        if choice is None:
            need = fixed + costs[modes[-1]].bytes(1, patch)
            raise MemoryPlanError(
                f"stage {index} ({patch} px) does not fit the memory budget: one image with {modes[-1]} activations "
                f"needs {need / GB:.2f} GB (state {sum(state_parts.values()) / GB:.2f}, reserved {reserved / GB:.2f}), "
                f"the plan may use {usable / GB:.2f} GB ({USABLE_SHARE:.0%} of train.memory_gb={budget / GB:g}). "
                + ("Train in bf16 (train.mixed_precision=bf16), lower" if footprint.precision == "no" else "Lower")
                + " progressive.patch, shard the state with DeepSpeed ZeRO, or use a device with more memory")
        planned.append(choice)
    return MemoryPlan(budget, reserved, state_parts, costs, dataclasses.replace(schedule, stages=tuple(planned)))


def budget_bytes(memory_gb: float | str | None, device: torch.device) -> float | None:
    """train.memory_gb in bytes: a number as given; "auto" the device's memory on CUDA, no plan on a
    CPU (its memory is shared with everything else on the machine); None: no plan."""
    if memory_gb == "auto":
        return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None
    return None if memory_gb is None else float(memory_gb) * GB


def reserved_bytes(device: torch.device) -> float:
    """What the device holds beyond the training tensors: the CUDA context and libraries; on a CPU the
    process itself (interpreter, libraries, the data pipeline's buffers), measured now."""
    if device.type == "cuda":
        return RESERVED_CUDA
    return rss_kib("VmRSS") * 1024.0


def plan_for_run(cfg: Config, schedule: StagePlan, launch: Launch, budget: float) -> MemoryPlan:
    """The plan of a run's `schedule` (train.schedule.plan_stages for launch.world_size) in `budget`
    bytes on launch.device; each activation mode it needs is calibrated once. Raises MemoryPlanError,
    also for a calibration that failed (out of memory, a dead subprocess): one kind of error for the caller."""
    if launch.device.type == "cpu" and not sys.platform.startswith("linux"):
        raise MemoryPlanError(f"train.memory_gb={budget / GB:g}: a plan on a CPU measures the process's memory "
                              "through Linux's /proc; set train.memory_gb=null here")
    arch = network_record(cfg.model)
    footprint = StateFootprint(params=parameter_count(arch), precision=launch.precision, optimizer=cfg.optim.name,
                               ema=cfg.train.ema_decay is not None, world_size=launch.world_size,
                               zero_stage=launch.zero_stage)
    # model.checkpointing=true asks for whole-block checkpointing everywhere. Under model.compile the
    # compiler's partitioner decides what backward keeps (the lean path is eager only); eager plain
    # autograd, which keeps every intermediate the partitioner could, stands in as the bound.
    modes = ("checkpoint",) if cfg.model.checkpointing else ("plain", "checkpoint") if cfg.model.compile else MODES

    def cost_of(mode: str) -> StepCost:
        step = CalibrationStep(arch, launch.precision, mode, asdict(cfg.loss))
        try:
            return calibrate(step, launch.device)
        except MemoryPlanError:
            raise
        except Exception as err:  # noqa: BLE001 (whatever failed, the run cannot plan: said in one line)
            raise MemoryPlanError(f"memory calibration ({mode} activations, {launch.precision}) failed: "
                                  f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")

    return plan_memory(schedule, footprint, budget, reserved_bytes(launch.device), cost_of, modes)


def agreed_plan(acc, cfg: Config, launch: Launch, schedule: StagePlan) -> MemoryPlan | None:
    """The plan of a run under an accelerate.Accelerator, the same on every rank: the budget is the
    smallest of all ranks', the main process calibrates and plans, and every rank gets the plan or the
    refusal (MemoryPlanError on every rank, before any step: one rank failing alone would hang the others)."""
    budget = budget_bytes(cfg.train.memory_gb, launch.device)
    if budget is None:
        return None
    budget = smallest(acc, budget)
    result: MemoryPlan | str | None = None
    if acc.is_main_process:
        try:
            result = plan_for_run(cfg, schedule, launch, budget)
        except MemoryPlanError as err:
            result = str(err)
    result = from_main(acc, result)
    if isinstance(result, str):
        raise MemoryPlanError(f"train.memory_gb: {result}")
    return result


def describe(plan: MemoryPlan | None, memory_gb: float | str | None) -> str:
    """The plan's table, or why there is none, for the log."""
    if plan is not None:
        return plan.table()
    why = "auto plans nothing on a CPU" if memory_gb == "auto" else "train.memory_gb=null"
    return f"memory plan: none ({why}; train.memory_gb=N plans every stage into N GB per process)"


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationStep:
    """The training step calibration measures (plain data: it travels to a fresh process as JSON): the
    network's record (train.network.network_record), precision, activation mode and objective (LossConfig's fields)."""

    arch: dict
    precision: str
    mode: str
    loss: dict

    def network(self, device: torch.device) -> torch.nn.Module:
        """The network calibrated: the run's (build_network), in this step's activation mode."""
        torch.manual_seed(0)
        net = build_network(self.arch).to(device).train()
        set_activations(net, self.mode)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)  # gradients are state: they exist before the step is measured
        return net

    def run(self, net: torch.nn.Module, patch: int, device: torch.device) -> None:
        """One image through the trainer's step function (train.step.forward_backward), with the record's
        channels (a user's network has no Restormer attributes to read them from)."""
        inputs, outputs = record_channels(self.arch)
        x = torch.rand(1, inputs, patch, patch, device=device)
        target = torch.rand(1, outputs, patch, patch, device=device)
        forward_backward(net, x, target, autocast_dtype(self.precision), LossConfig(**self.loss))


_CALIBRATED: dict[tuple[str, str], StepCost] = {}  # (step, device) -> cost: a process plans many runs alike


def calibrate(step: CalibrationStep, device: torch.device) -> StepCost:
    """The step's memory beyond the state at CALIBRATION_PATCHES, as a line in the pixels."""
    key = (json.dumps(asdict(step), sort_keys=True), str(device))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = _calibrate(step, device)
    return _CALIBRATED[key]


def _calibrate(step: CalibrationStep, device: torch.device) -> StepCost:
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device]):  # the run's random state stays the run's
            net = step.network(device)
            peaks = []
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            for patch in CALIBRATION_PATCHES:
                # From the first step on: what it allocates once and keeps (cuBLAS workspaces) stays in
                # the fixed part instead of shrinking the per-pixel slope.
                torch.cuda.reset_peak_memory_stats(device)
                step.run(net, patch, device)
                torch.cuda.synchronize(device)
                peaks.append(torch.cuda.max_memory_allocated(device) - before)
            del net
        torch.cuda.empty_cache()
    else:
        peaks = _cpu_peaks(step)
    return StepCost.fit(CALIBRATION_PATCHES, peaks, batch=1)


def _cpu_peaks(step: CalibrationStep) -> list[float]:
    """Peak RSS growth of each calibration step: the median, per patch, of CPU_SAMPLES fresh processes,
    one after another (side by side they would need several times the memory being planned). Fresh,
    because this one's heap already holds freed memory that a step could reuse unseen; several,
    because one process's growth varies by 5-10% from run to run (the address-space layout and the
    hash seed change how the C library's heap fragments). Each runs with this process's thread count:
    oneDNN keeps buffers per thread."""
    command = [sys.executable, "-m", "train.memory_plan", json.dumps(asdict(step)), str(torch.get_num_threads())]
    samples = []
    for _ in range(CPU_SAMPLES):
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                  timeout=CPU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise MemoryPlanError(f"memory calibration of {step.arch} ({step.mode}, {step.precision}) took over "
                                  f"{CPU_TIMEOUT_S} s; set train.memory_gb=null to train without a plan") from None
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise MemoryPlanError(f"memory calibration of {step.arch} ({step.mode}, {step.precision}) "
                                  f"failed: {last}")
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return [statistics.median(peaks) for peaks in zip(*samples)]


def _measure_cpu(step: CalibrationStep) -> list[float]:
    """In the fresh process: each step's peak RSS above the RSS before the first step. The steps go
    from small to large, so each peak is reached by growing past the one before."""
    retain_freed_memory()  # as train/main.py runs
    device = torch.device("cpu")
    net = step.network(device)
    before = rss_kib("VmRSS")
    peaks = []
    for patch in CALIBRATION_PATCHES:
        step.run(net, patch, device)
        peaks.append((rss_kib("VmHWM") - before) * 1024.0)
    return peaks


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]))
    print(json.dumps(_measure_cpu(CalibrationStep(**json.loads(sys.argv[1])))))
