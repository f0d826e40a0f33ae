import math

import pytest

from train.config import load_config
from train.schedule import lr_at, plan_stages


def official_lr(step: int) -> float:
    """The official schedule written out: constant 3e-4 for 92k steps, then cosine to 1e-6 over 208k."""
    if step < 92000:
        return 3e-4
    return 1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * (step - 92000) / 208000))


@pytest.mark.parametrize("step", [0, 1, 50000, 91999, 92000, 100000, 150000, 250000, 299999])
def test_official_schedule_matches_the_formula(step):
    cfg = load_config()
    assert lr_at(cfg.lr, 3e-4, 300000, step) == pytest.approx(official_lr(step), rel=1e-12)


def test_cosine_and_warmup():
    cfg = load_config(None, ["lr.schedule=cosine", "lr.eta_min=0", "lr.warmup_iters=10"])
    assert lr_at(cfg.lr, 1.0, 100, 0) == pytest.approx(0.1)
    assert lr_at(cfg.lr, 1.0, 100, 9) == pytest.approx(1.0 * 0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert lr_at(cfg.lr, 1.0, 100, 50) == pytest.approx(0.5)
    assert lr_at(cfg.lr, 1.0, 100, 100) == pytest.approx(0.0)


def test_recipe_runs_as_written_on_its_gpu_count():
    plan = plan_stages(load_config(), 8)
    assert [(s.patch, s.batch, s.accum) for s in plan.stages] == [
        (128, 8, 1), (160, 5, 1), (192, 4, 1), (256, 2, 1), (320, 1, 1), (384, 1, 1)]
    assert plan.total_steps == 300000
    assert plan.stage_at(0).index == 0 and plan.stage_at(91999).index == 0 and plan.stage_at(92000).index == 1
    assert plan.stage_at(299999).index == 5


@pytest.mark.parametrize("world", [1, 2, 4])
def test_accumulate_rule_keeps_the_global_batch(world):
    cfg = load_config()
    plan = plan_stages(cfg, world)
    for stage, batch in zip(plan.stages, cfg.progressive.batch):
        assert stage.batch * stage.accum * world == 8 * batch
        assert stage.batch <= batch  # never more per process than the recipe's GPU held
    assert plan.total_steps == 300000
    assert "accumulate" in plan.note


def test_iterations_rule_keeps_samples_seen_and_stretches_the_lr_curve():
    cfg = load_config(None, ["train.batch_rule=iterations"])
    plan = plan_stages(cfg, 2)
    assert plan.total_steps == 1200000 and all(s.accum == 1 for s in plan.stages)
    # The constant phase ends where the recipe's 92k iterations end, scaled by 4.
    assert lr_at(cfg.lr, 3e-4, 300000, (368000 - 1) * plan.step_scale) == pytest.approx(3e-4)
    assert lr_at(cfg.lr, 3e-4, 300000, 1200000 * plan.step_scale) == pytest.approx(1e-6)


def test_user_grad_accum_multiplies():
    cfg = load_config("demo", ["train.grad_accum=3"])
    assert all(s.accum == 3 for s in plan_stages(cfg, 1).stages)


def test_iterations_rule_resume_on_another_world_size_keeps_the_recipe_iteration():
    from train.schedule import resume_step

    cfg = load_config("deraining", ["train.batch_rule=iterations"])
    recipe_total = sum(cfg.progressive.iters)

    def position(step, world):  # (stage, lr) this step trains at on `world` processes
        plan = plan_stages(cfg, world)
        return plan.stage_at(step).index, lr_at(cfg.lr, cfg.optim.lr, recipe_total, step * plan.step_scale)

    # The case: 2 processes at step 368000 = recipe iteration 92000, the start of stage 1.
    up = resume_step(cfg, 368000, 2, plan_stages(cfg, 4))
    assert up == 184000 and position(up, 4) == position(368000, 2)
    assert position(368000, 2)[0] == 1
    # And back down, from the middle of a stage.
    down = resume_step(cfg, 200001, 4, plan_stages(cfg, 2))
    assert down == 400002 and position(down, 2) == position(200001, 4)
    # Same world size, or another batch rule: the step is the position already.
    assert resume_step(cfg, 12345, 2, plan_stages(cfg, 2)) == 12345
    deraining = load_config("deraining")
    assert resume_step(deraining, 12345, 2, plan_stages(deraining, 4)) == 12345


def test_iterations_rule_resume_refuses_a_position_between_steps():
    from train.config import ConfigError
    from train.schedule import resume_step

    cfg = load_config("deraining", ["train.batch_rule=iterations"])
    with pytest.raises(ConfigError, match=r"step 1001 \(2 processes.*on 4 processes.*Resume on 2 processes"):
        resume_step(cfg, 1001, 2, plan_stages(cfg, 4))  # recipe iteration 250.25: no whole step on 4 processes
