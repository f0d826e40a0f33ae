"""What the trainer keeps between steps: the checkpointed TrainState and the window of logged figures."""

import math

import pytest

from train.state import DataPosition, TrainState, saved_state_problem
from train.tracking import LogWindow

# The fields every trainer_state.json has held since exact data resume (the checkpointer adds the manifest).
SAVED_FIELDS = {"step", "stage", "best_metric", "best_step", "resume_count", "nonfinite_total", "run_id",
                "world_size", "data"}


def test_the_state_round_trips_through_its_checkpoint_fields():
    state = TrainState(step=12, best_metric=31.2, best_step=10, resume_count=1, nonfinite_total=2, run_id="abc",
                       data=DataPosition(seed=3, position=48, epoch=1))
    saved = state.state_dict(stage=2, world_size=4)
    assert set(saved) == SAVED_FIELDS and saved["data"] == {"seed": 3, "position": 48, "epoch": 1}
    assert (saved["stage"], saved["world_size"]) == (2, 4)
    assert TrainState.from_state_dict({**saved, "manifest": {}}) == state


def test_a_checkpoint_from_before_exact_data_resume_starts_the_stream_again():
    old = {"step": 7, "stage": 0, "best_metric": None, "best_step": None, "resume_count": 0, "nonfinite_total": 0,
           "run_id": "abc", "world_size": 1}
    assert TrainState.from_state_dict(old).data == DataPosition(seed=None, position=0, epoch=0)


def test_a_state_missing_a_field_is_refused():
    assert saved_state_problem({"step": 7, "best_metric": None, "best_step": None, "resume_count": 0,
                                "nonfinite_total": 0}) == "missing world_size, run_id"
    saved = TrainState().state_dict(stage=0, world_size=1)
    assert saved_state_problem({**saved, "manifest": {}, "added_later": 1}) is None  # keys it does not know are left alone


def test_the_window_averages_its_steps_and_leaves_skipped_ones_out_of_the_gradient_norm():
    window = LogWindow()
    step = {"loss": 1.0, "l1": 0.5, "l2": 0.25, "data_wait": 0.1, "grad_norm": 2.0, "lr": 1e-3, "finite": True}
    window.add(step, images=4, pixels=4 * 16**2, step_time=0.2)
    window.add({**step, "loss": 3.0, "grad_norm": math.nan, "lr": 5e-4, "finite": False}, 4, 4 * 16**2, 0.4)
    means = window.means()
    assert means == pytest.approx({"lr": 5e-4, "loss": 2.0, "l1": 0.5, "l2": 0.25, "grad_norm": 2.0,
                                   "step_time_s": 0.3})
    rates = window.rates()
    assert rates["pixels_per_s"] == pytest.approx(rates["images_per_s"] * 16**2) and rates["images_per_s"] > 0
