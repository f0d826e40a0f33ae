"""The training loop's progress that every checkpoint carries (trainer_state.json), in one object.

accelerate saves the model, optimizer, scaler and RNG states (train/checkpoint.py); this is the rest:
the step, the best validation figure, counters, the W&B run id and where the data stream goes on.
Per-process figures that no checkpoint keeps (this launch's skipped samples, the current run of
non-finite steps) stay on the Trainer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from train.tracking import new_run_id


@dataclass
class DataPosition:
    seed: int | None  # train.seed of the run that saved: another seed draws another sample order
    position: int = 0  # global training samples consumed (all ranks): where the stream goes on
    epoch: int = 0


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    best_metric: float | None = None  # the best validation figure (train.best_metric) so far
    best_step: int | None = None  # its step: that checkpoint is kept
    resume_count: int = 0
    nonfinite_total: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    run_id: str = field(default_factory=new_run_id)  # the W&B run a resumed job continues
    data: DataPosition = field(default_factory=lambda: DataPosition(seed=None))

    def state_dict(self, stage: int, world_size: int) -> dict[str, Any]:
        """trainer_state.json's fields (the checkpointer adds the manifest); `stage` and `world_size`
        describe the launch that saves, for resume checks and readers."""
        return {**dataclasses.asdict(self), "stage": stage, "world_size": world_size}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any]) -> TrainState:
        """A checkpoint's state, once saved_state_problem passed it. One written before exact data resume
        has no 'data': the stream starts again at epoch 0 (and its seed is unknown)."""
        data = saved.get("data", {})
        position = DataPosition(data.get("seed"), data.get("position", 0), data.get("epoch", 0))
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name != "data"}, data=position)


_LARGEST = 2**63 - 1  # every count here is an int64 somewhere (a tensor, a seed, a sample position)
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a W&B run id; new_run_id gives 12 hex digits


def saved_state_problem(saved: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a trainer_state.json (a missing key, a wrong type, a negative
    count), naming the key; None when from_state_dict and the resume checks can use it. The file's
    own hash proves it unchanged since it was written, not that a hand-edited or older file is right.
    Keys this version does not know are left alone (a newer version may add some)."""
    counts = {"step": 0, "world_size": 1, "resume_count": 0, "nonfinite_total": 0}
    missing = [key for key in (*counts, "best_metric", "best_step", "run_id") if key not in saved]
    if missing:
        return f"missing {', '.join(missing)}"
    fields = [(key, saved[key], low, False) for key, low in counts.items()]
    fields += [("best_step", saved["best_step"], 0, True)]
    if "stage" in saved:
        fields.append(("stage", saved["stage"], 0, False))
    data = saved.get("data", {})
    if not isinstance(data, dict):
        return f"data must be an object, got {_shown(data)}"
    fields += [(f"data.{key}", data[key], 0, key == "seed") for key in ("seed", "position", "epoch") if key in data]
    for key, value, low, nullable in fields:
        if not (value is None and nullable or _is_int(value) and low <= value <= _LARGEST):
            return f"{key} must be an integer in [{low}, 2**63){' or null' if nullable else ''}, got {_shown(value)}"
    best = saved["best_metric"]
    if best is not None and not (isinstance(best, (int, float)) and not isinstance(best, bool)):
        return f"best_metric must be a number or null, got {_shown(best)}"
    if not isinstance(saved["run_id"], str) or not _RUN_ID.fullmatch(saved["run_id"]):
        return f"run_id must be a W&B run id (letters, digits, '_', '-'; 1 to 128), got {_shown(saved['run_id'])}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A JSON value in a one-line message, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"
