"""What this launch is, resolved once: device, precision, DeepSpeed and its ZeRO stage, processes.

`accelerate launch` passes its settings to every process through the environment (ACCELERATE_*,
WORLD_SIZE, RANK); a DeepSpeed JSON's own ZeRO stage wins over the launcher's, as in accelerate.
`resolve_launch` reads them before any process group exists, so the memory plan, the data checks,
the Accelerator and the Trainer all see one `Launch`; `--print-plan` reads an accelerate config file
(`--launch-config`) the same way, as the environment that file would give a launch.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config import Config, ConfigError
from train.safe_yaml import YAMLInputError, read_yaml
from train.step import autocast_dtype

ACCELERATE_DEFAULT_ZERO_STAGE = 2  # accelerate's DeepSpeedPlugin when neither JSON nor launcher names one


@dataclass(frozen=True)
class Launch:
    device: torch.device
    precision: str = "no"  # accelerate's mixed_precision: no | bf16 | fp16
    zero_stage: int | None = None  # DeepSpeed's ZeRO stage; None: not under DeepSpeed (DDP or one process)
    world_size: int = 1  # processes in the job, all nodes
    rank: int = 0  # this process's index among them

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def zero3(self) -> bool:
        """Each process holds a slice of the weights (no EMA, no per-rank full copy)."""
        return self.zero_stage == 3

    @property
    def autocast(self) -> torch.dtype | None:
        """The forward's autocast dtype: None in fp32, and under DeepSpeed, whose engine keeps the
        weights in the low precision itself (the network casts its input to them)."""
        return None if self.deepspeed else autocast_dtype(self.precision)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The trained weights' dtype on the device: DeepSpeed's bf16/fp16 copy, else fp32."""
        low_precision = autocast_dtype(self.precision) if self.deepspeed else None
        return low_precision or torch.float32

    def describe(self) -> str:
        return (f"{'fp32' if self.precision == 'no' else self.precision}"
                f"{f', DeepSpeed ZeRO-{self.zero_stage}' if self.deepspeed else ''}")


def resolve_launch(cfg: Config, *, num_processes: int | None = None, launch_config: str | None = None,
                   environ: Mapping[str, str] = os.environ) -> Launch:
    """This process's launch. launch_config: an accelerate config file to read instead of the
    environment (--print-plan without processes); num_processes: the process count to plan for."""
    env = _environment_of(Path(launch_config)) if launch_config else environ
    world_size = num_processes if num_processes is not None else int(env.get("WORLD_SIZE", "1"))
    if world_size < 1:
        raise ConfigError(f"--num-processes {world_size}: give a process count of 1 or more")
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    on_cpu = env.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes", "y", "t", "on")  # --cpu
    return Launch(
        device=torch.device("cuda", int(env.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() and not on_cpu
        else torch.device("cpu"),
        precision=cfg.train.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION", "no"),
        zero_stage=_zero_stage(env) if deepspeed else None,
        world_size=world_size,
        rank=int(env.get("RANK", "0")),
    )


def _zero_stage(env: Mapping[str, str]) -> int:
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none":
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            stage = doc["zero_optimization"].get("stage", "auto")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"DeepSpeed config {path}: cannot read its zero_optimization.stage "
                              f"({type(err).__name__}: {err}); give a JSON file with a zero_optimization section"
                              ) from None
        if stage != "auto":
            return int(stage)
    return int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", ACCELERATE_DEFAULT_ZERO_STAGE))


def _environment_of(path: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file path` gives its processes, as far as a Launch reads them."""
    try:
        doc = read_yaml(path)
    except YAMLInputError as err:
        raise ConfigError(f"--launch-config: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--launch-config {path}: not an accelerate config file (its top level is not a mapping)")
    env = {"WORLD_SIZE": str(doc.get("num_processes", 1))}
    if doc.get("mixed_precision") is not None:
        env["ACCELERATE_MIXED_PRECISION"] = str(doc["mixed_precision"])
    if doc.get("distributed_type") == "DEEPSPEED":
        env["ACCELERATE_USE_DEEPSPEED"] = "true"
        deepspeed = doc.get("deepspeed_config") or {}
        for key, variable in (("deepspeed_config_file", "ACCELERATE_DEEPSPEED_CONFIG_FILE"),
                              ("zero_stage", "ACCELERATE_DEEPSPEED_ZERO_STAGE")):
            if deepspeed.get(key) is not None:
                env[variable] = str(deepspeed[key])
    return env


# ---------------------------------------------------------------- the launch's Accelerator


def build_accelerator(cfg: Config, launch: Launch):
    """The Accelerator for this launch: gloo between CPU ranks, DeepSpeed when launched with it.
    accelerate reads the same environment; a disagreement with `launch` is a bug, said as one."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from train.tracking import wandb_mode

    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    cpu_ranks = launch.world_size > 1 and launch.device.type == "cpu"
    # Without a GPU every backend (DeepSpeed included) must use gloo, or ranks do not see each other.
    handlers = [InitProcessGroupKwargs(backend="gloo", timeout=timeout) if cpu_ranks
                else InitProcessGroupKwargs(timeout=timeout)]
    # `accelerate launch --multi_gpu` (launch/cpu.yaml) on a machine without GPUs starts processes that
    # each think they are alone unless told they are CPU ranks; DeepSpeed picks its CPU backend itself.
    accelerator = Accelerator(
        cpu=cpu_ranks and not launch.deepspeed,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if wandb_mode(cfg.tracking.wandb) == "disabled" else "wandb",
        project_dir=str(cfg.run_dir),
        kwargs_handlers=handlers,
    )
    plugin = accelerator.state.deepspeed_plugin
    seen = Launch(accelerator.device, accelerator.mixed_precision, plugin.zero_stage if plugin is not None else None,
                  accelerator.num_processes, accelerator.process_index)
    if (seen.device.type, seen.precision, seen.zero_stage, seen.world_size, seen.rank) != \
            (launch.device.type, launch.precision, launch.zero_stage, launch.world_size, launch.rank):
        raise RuntimeError(f"accelerate set up {seen} where the launch was read as {launch} (report a bug)")
    return accelerator


def check_precision(launch: Launch, accelerator) -> None:
    """Refuses a precision this device would not really run (ConfigError naming the setting)."""
    if launch.precision == "fp16" and not launch.deepspeed and accelerator.scaler is None:
        # accelerate runs fp16 only on accelerators: on a CPU it would silently train in fp32.
        raise ConfigError(
            f"mixed precision fp16 (--mixed_precision / train.mixed_precision) does not run on "
            f"{launch.device.type}: accelerate gives it no autocast and no GradScaler there (it would train "
            "in fp32). Use bf16 or no on this device, or fp16 under DeepSpeed"
        )
    if launch.precision == "fp16" and launch.deepspeed:
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's CPU backend runs fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX-FP16
        # CPUs); elsewhere it fails inside the first step, on every rank.
        if not get_accelerator().is_fp16_supported():
            raise ConfigError(
                f"mixed precision fp16 (--mixed_precision / train.mixed_precision) under DeepSpeed does not run on "
                f"this {launch.device.type}: DeepSpeed's {get_accelerator().device_name()} backend has no fp16 "
                "kernels here (a CPU needs AVX512-FP16 or AMX-FP16). Use bf16 or no on this device"
            )
