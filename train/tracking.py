"""Where the figures go: a local metrics.jsonl (always) and Weights & Biases (via accelerate).

W&B mode `auto` goes online only when credentials exist, so a machine without network or login
never waits on wandb; offline runs can be uploaded later with `wandb sync`. The run id is chosen
by us and stored in every checkpoint, so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from train.config import TrackingConfig
from train.host_memory import take_peak_rss


def wandb_mode(requested: str) -> str:
    if os.environ.get("WANDB_MODE") and requested == "auto":
        return os.environ["WANDB_MODE"]
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        auth = None
    return "online" if auth else "offline"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def init_trackers(accelerator, cfg: TrackingConfig, run_name: str, run_dir: Path, run_id: str, config: dict[str, Any]) -> str:
    """Starts (or resumes) the W&B run on the main process; returns the mode used."""
    mode = wandb_mode(cfg.wandb)
    if mode == "disabled":
        return mode
    init_kwargs = {
        "wandb": {
            "name": run_name,
            "id": run_id,
            "resume": "allow",
            "mode": mode,
            "dir": str(run_dir),
            "group": cfg.group,
            "entity": cfg.entity,
        }
    }
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=init_kwargs)
    return mode


class MetricsFile:
    """Append-only JSON lines, one record per log event; readable with pandas.read_json(lines=True)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class LogWindow:
    """The figures of the optimizer steps since the last log line: summed step by step, averaged when
    logged. A step with a non-finite loss or gradient (the optimizer skipped it) counts in the losses
    and times, not in the mean gradient norm."""

    _SUMMED = ("loss", "l1", "l2", "data_wait")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps = self.skipped = self.images = self.pixels = 0
        self.sums = dict.fromkeys((*self._SUMMED, "grad_norm", "step_time"), 0.0)
        self.lr = math.nan

    def add(self, figures: dict[str, Any], images: int, pixels: int, step_time: float) -> None:
        """One optimizer step: Trainer.train_step's figures, the images and pixels it trained on."""
        self.steps += 1
        for name in self._SUMMED:
            self.sums[name] += figures[name]
        if figures["finite"]:
            self.sums["grad_norm"] += figures["grad_norm"]
        else:
            self.skipped += 1
        self.sums["step_time"] += step_time
        self.images += images
        self.pixels += pixels
        self.lr = figures["lr"]

    def rates(self) -> dict[str, float]:
        """This process's throughput since the window opened (every rank's is gathered for the log)."""
        elapsed = time.perf_counter() - self.started
        return {"images_per_s": self.images / elapsed, "pixels_per_s": self.pixels / elapsed,
                "data_wait_share": self.sums["data_wait"] / max(elapsed, 1e-9)}

    def means(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {"lr": self.lr, **{k: self.sums[k] / n for k in ("loss", "l1", "l2")},
                "grad_norm": self.sums["grad_norm"] / max(self.steps - self.skipped, 1),
                "step_time_s": self.sums["step_time"] / n}  # rank 0's mean wall time per optimizer step


class PeakMemory:
    """This process's peak memory (GPU allocated, or RSS on a CPU) per log record: each training
    window and each validation gets its own, as the device's peak is reset at every read
    (torchtitan logs the same way). A validation does not count in the training window around it.
    On a CPU the freed heap stays in the process (train/host_memory.py), so each peak there is at
    least the run's largest so far."""

    def __init__(self, device: torch.device):
        self.device = device
        self.carried = 0.0  # the open training window's peak, read before a validation

    def read(self) -> float:
        """The peak in GB since the previous read."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / 2**30
        return take_peak_rss() / 2**30

    def pause(self) -> None:
        """Before a validation: the training window keeps its peak so far."""
        self.carried = max(self.carried, self.read())

    def window(self) -> float:
        """The training window's peak, at its log record."""
        peak, self.carried = max(self.carried, self.read()), 0.0
        return peak


def across_ranks(ranks: dict[str, torch.Tensor]) -> dict[str, float]:
    """The log's view of every rank's figures (name -> (world_size,) tensor): totals, means and maxima."""
    return {
        "images_per_s": float(ranks["images_per_s"].sum()),
        "images_per_s_per_proc": float(ranks["images_per_s"].mean()),
        "pixels_per_s": float(ranks["pixels_per_s"].sum()),
        "pixels_per_s_per_proc": float(ranks["pixels_per_s"].mean()),
        "data_wait_share": float(ranks["data_wait_share"].mean()),
        "data_wait_share_max": float(ranks["data_wait_share"].max()),
        "peak_mem_gb_max": float(ranks["peak_mem_gb"].max()),
        "bad_samples_skipped": int(ranks["bad_samples"].sum()),
        **{f"peak_mem_gb/rank{r}": float(v) for r, v in enumerate(ranks["peak_mem_gb"])},
    }
