import re
import typing

import pytest

from train.config import CONFIG_DIR, Config, ConfigError, config_from_dict, load_config
from train.safe_yaml import MAX_DEPTH, MAX_NODES, YAMLInputError, parse_yaml


def test_defaults_are_the_official_recipe():
    cfg = load_config()
    assert cfg.progressive.iters == [92000, 64000, 48000, 36000, 36000, 24000]
    assert cfg.progressive.patch == [128, 160, 192, 256, 320, 384]
    assert cfg.progressive.batch == [8, 5, 4, 2, 1, 1]
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == ("adamw", 3e-4, [0.9, 0.999], 1e-4)
    assert cfg.optim.grad_clip == 0.01 and cfg.train.ema_decay is None and cfg.loss.name == "l1"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.run_name == recipe


def test_dotted_overrides_are_typed():
    cfg = load_config("demo", ["optim.lr=2e-4", "progressive.batch=[2, 2, 2]", "train.ema_decay=0.999", "val.tile=null"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.progressive.batch == [2, 2, 2]
    assert cfg.train.ema_decay == 0.999 and cfg.val.tile is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.name=adam", "optim.name='adam' is not one of: adamw, sgd"),
        ("progressive.patch=[30, 48, 64]", "multiples of 8"),
        ("progressive.batch=[8, 4]", "same, non-zero length"),
        ("data.noise_sigma_range=[0, 50]", "not both"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("optim=3", "is a section"),
        ("lr.schedule=step", "lr.schedule"),
        ("noequals", "section.key=value"),
        ("train.threads=0", "train.threads must be >= 1"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s must be >= 1"),
        ("train.best_metric=psnr_Y", "train.best_metric='psnr_Y' is not one of: psnr, ssim"),
        ("val.noise_sigma=-1", "val.noise_sigma must be >= 0"),
        ("val.tile=100", "val.tile=100 val.tile_overlap=32: the tile (100) must be a positive multiple of 8"),
        ("val.tile_overlap=96", "val.tile=96 val.tile_overlap=96: the overlap (96) must be a multiple of 8, >= 0 and smaller than the tile (96)"),
        ("data.retries=-1", "data.retries=-1 must be >= 0"),
        ("data.timeout_s=0", "data.timeout_s=0.0 must be a positive"),
        ("data.cache_dir=/tmp/c", "data.cache_dir and data.cache_limit_gb go together"),
        ("data.cache_limit_gb=10", "data.cache_dir and data.cache_limit_gb go together"),
        ("model.preset=denoise", "unknown preset 'denoise'; valid presets: default, motion_deblurring"),
        ("model.heads=[3,2,4,8]", "dim 16 is not divisible by num_heads 3"),
        ("model.dim=15", "dim 15 must be even"),
        ("model.num_blocks=[0,1,1,1]", "num_blocks [0, 1, 1, 1]: every level needs a transformer block"),
        ("model.ffn_expansion_factor=2.2", "read the expansion factor as 2.1875 and would build [35, 70, 140, 280]"),
        ("train.memory_gb=1e300", "train.memory_gb=1e+300 is outside [0, 1048576]"),
        ("train.memory_gb=abc", "train.memory_gb (from override 'train.memory_gb=abc'): expected a number, auto or null, "
                                "got 'abc'"),
        ("val.tile=abc", "expected an integer or null, got 'abc'"),
        ("model.num_blocks=[1, a, 1, 1]", "model.num_blocks[1] (from override 'model.num_blocks=[1, a, 1, 1]'): expected an "
                                          "integer, got 'a'"),  # a bad item of a list | None: the item is named
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo", [override])


def test_every_choice_the_config_accepts_has_one_implementation():
    from train.losses import OBJECTIVES
    from train.schedule import SCHEDULES
    from train.build import OPTIMIZERS

    hints = {name: typing.get_type_hints(type(section)) for name, section in vars(Config()).items()
             if hasattr(section, "__dataclass_fields__")}
    for table, (section, key) in ((OBJECTIVES, ("loss", "name")), (SCHEDULES, ("lr", "schedule")),
                                  (OPTIMIZERS, ("optim", "name"))):
        assert set(table) == set(typing.get_args(hints[section][key])), (section, key)


def test_unknown_recipe_lists_the_recipes():
    with pytest.raises(ConfigError, match="built-in recipes: .*demo"):
        load_config("no_such_recipe")


def test_schedule_shorter_than_stages_is_rejected():
    with pytest.raises(ConfigError, match="schedule would run out"):
        load_config(None, ["lr.periods=[1000, 2000]"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("motion_deblurring", ["optim.lr=1e-4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


def test_a_folder_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. a data folder in the working directory
    assert load_config("demo").run_name == "demo"


def test_a_removed_key_is_explained_but_ignored_in_an_old_checkpoint_config():
    with pytest.raises(ConfigError, match="'data.resume' .* was removed: resume is always exact"):
        load_config(overrides=["data.resume=replay"])
    with pytest.raises(ConfigError, match="'model.channels_last' .* was removed: the model always runs channels-last"):
        load_config(overrides=["model.channels_last=true"])
    old = load_config().to_dict()
    old["data"]["resume"] = "fresh"  # what checkpoints saved before exact resume hold
    assert config_from_dict(old, "old checkpoint") == load_config()


def test_yaml_is_bounded_in_depth_and_in_nodes_with_aliases_counted_in_full():
    assert parse_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x") is not None
    with pytest.raises(YAMLInputError, match=f"x: refused: nested deeper than {MAX_DEPTH} levels"):
        parse_yaml("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "x")
    items = (MAX_NODES - 15) // 11  # 11 nodes per alias of a ten-number list; 15 for the rest of the document
    fits = "a: &a [" + ", ".join(["1"] * 10) + "]\nb: [" + ", ".join(["*a"] * items) + "]"
    assert len(parse_yaml(fits, "x")["b"]) == items
    with pytest.raises(YAMLInputError, match="more than 10,000 values once aliases are expanded"):
        parse_yaml(fits.replace("]\nb: [", "]\nb: [*a, *a, "), "x")


def test_aliases_in_a_config_still_work(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("optim: {lr: &lr 2.0e-4}\nlr: {schedule: cosine, eta_min: *lr}\n", encoding="utf-8")
    assert load_config(path).lr.eta_min == 2e-4


@pytest.mark.parametrize("data", [[1, 2], "text", 3])
def test_a_saved_config_that_is_not_a_mapping_is_a_config_error(data):
    with pytest.raises(ConfigError, match="old/config.yaml: the top level must be a mapping of sections"):
        config_from_dict(data, "old/config.yaml")


def test_numbers_are_finite_non_negative_and_bounded():
    with pytest.raises(ConfigError, match=re.escape("lr.eta_mins[1]=inf: numbers in a config are finite and >= 0")):
        load_config(None, ["lr.eta_mins=[3e-4, .inf]"])
    with pytest.raises(ConfigError, match=re.escape("model.heads[2]=0 is outside [1, 64]")):
        load_config(None, ["model.heads=[1, 2, 0, 8]"])
    with pytest.raises(ConfigError, match="optim.betas=.*give two values"):
        load_config(None, ["optim.betas=[0.9]"])


def test_blind_denoising_recipes_validate_at_one_sigma():
    for recipe in ("gaussian_color_denoising_blind", "gaussian_gray_denoising_blind"):
        cfg = load_config(recipe)
        assert cfg.data.noise_sigma_range == [0, 50] and cfg.val.noise_sigma == 25


def test_validation_noise_is_fixed_where_set_and_refused_on_paired_data(tmp_path):
    import numpy as np
    from PIL import Image

    from data_shards.degrade import NoiseConfig
    from data_shards.pack import main as pack_main
    from train.data import check_data, val_noise_config
    from train.schedule import plan_stages

    blind = load_config("gaussian_color_denoising_blind")
    assert val_noise_config(blind) == NoiseConfig(sigma=25)
    assert val_noise_config(load_config("gaussian_color_denoising_blind", ["val.noise_sigma=null"])) == \
        NoiseConfig(sigma_range=(0.0, 50.0))
    for folder in ("input", "target"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(tmp_path / folder / "a.png")
    assert pack_main(["--input", str(tmp_path / "input"), "--target", str(tmp_path / "target"),
                      "--out", str(tmp_path / "shards"), "--split", "val", "--no-progress"]) == 0
    paired = tmp_path / "shards" / "val"
    cfg = load_config("deraining", [f"data.train={paired}", f"data.val={paired}", "val.noise_sigma=25"])
    with pytest.raises(ConfigError, match="holds degraded inputs .* noise is set for validation"):
        check_data(cfg, plan_stages(cfg, 1), str(paired), str(paired))


def test_classical_baselines_need_a_fixed_validation_noise():
    blind = ["val.classical_baselines=true", "val.noise_sigma=null"]
    with pytest.raises(ConfigError, match="validation noise is a range: set val.noise_sigma"):
        load_config("gaussian_color_denoising_blind", blind)
    assert load_config("gaussian_color_denoising_blind", [*blind[:1], "val.noise_sigma=25"]).val.classical_baselines
    # No noise at all is the data check's to explain (clean images need noise, pairs refuse baselines).
    assert load_config("demo", ["data.noise_sigma=null"]).val.classical_baselines


def test_no_on_the_command_line_is_the_setting_no_not_a_boolean():
    """YAML 1.2 booleans only: yes/no/on/off are words (YAML 1.1 read train.mixed_precision=no as false)."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_yaml("a: yes\nb: off\nc: true\nd: False", "test") == {"a": "yes", "b": "off", "c": True, "d": False}
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(None, ["model.compile=yes"])


def test_a_cache_subfolder_that_is_a_link_is_refused(tmp_path):
    from data_shards.remote import CACHE_SUBFOLDER

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_SUBFOLDER).symlink_to(tmp_path)  # eviction would delete in whatever it points at
    with pytest.raises(ConfigError, match=f"data.cache_dir=.*/cache: .*/cache/{CACHE_SUBFOLDER} is a symbolic link"):
        load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.cache_limit_gb=1"])


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "seed", 10**400, "train.seed=100000000000...0000 (401 digits): numbers in a config are finite and >= 0"),
    ("optim", "lr", 16**400, "optim.lr (from run/config.yaml): 444624164770...5376 (482 digits) is too large"),
    ("train", "memory_gb", 16**400, "train.memory_gb (from run/config.yaml): 444624164770...5376 (482 digits) is too"),
], ids=["seed", "lr", "memory_gb"])
def test_numbers_too_large_for_a_float_are_config_errors(section, key, value, message):
    """Integers of hundreds of digits (a YAML hex literal, a damaged checkpoint's config.yaml): compared as
    integers, never converted to an overflowing float."""
    saved = load_config().to_dict()
    saved[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(saved, "run/config.yaml")


def test_a_cache_limit_beyond_any_disk_is_refused():
    with pytest.raises(ConfigError, match=re.escape("data.cache_limit_gb=1e+300 is outside [0, 1000000]")):
        load_config(None, ["data.cache_dir=/tmp/shard_cache", "data.cache_limit_gb=1e300"])
