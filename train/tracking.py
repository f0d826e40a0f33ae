"""Where the figures go: a local metrics.jsonl (always) and Weights & Biases (via accelerate).

W&B mode `auto` goes online only when credentials exist, so a machine without network or login
never waits on wandb; offline runs can be uploaded later with `wandb sync`. The run id is chosen
by us and stored in every checkpoint, so a resumed job continues the same W&B run.
"""

from __future__ import annotations

import json
import netrc
import os
import time
import uuid
from pathlib import Path
from typing import Any

from train.config import TrackingConfig


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
