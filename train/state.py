"""The training loop's progress that every checkpoint carries (trainer_state.json), in one object.

accelerate saves the model, optimizer, scaler and RNG states (train/checkpoint.py); this is the rest:
the step, the best validation figure, counters, the W&B run id and where the data stream goes on.
Per-process figures that no checkpoint keeps (this launch's skipped samples, the current run of
non-finite steps) stay on the Trainer.
"""

from __future__ import annotations

import dataclasses
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
        """A checkpoint's state. One written before exact data resume has no 'data': the stream starts
        again at epoch 0 (and its seed is unknown)."""
        data = saved.get("data", {})
        position = DataPosition(data.get("seed"), data.get("position", 0), data.get("epoch", 0))
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name != "data"}, data=position)
