"""One typed config for a training run: dataclasses, YAML presets, dotted CLI overrides.

Defaults are the official Restormer recipe (8 GPUs, 300k iterations); `configs/*.yaml` override
what a task or the demo changes. Everything is validated here, before any process starts work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_shards.remote import (DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, cache_folder_problem, folder_overlap, printable,
                                settings_problem)
from model import ARCH_FIELDS, SIZE_MULTIPLE, arch_problem, tiling_problem
from train.safe_yaml import YAMLInputError, parse_yaml, read_yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config that cannot run, with what was wrong and how to fix it."""



@dataclass
class ModelConfig:
    preset: str = "default"  # a model.PRESETS name; the fields below override it when set
    dim: int | None = None
    num_blocks: list[int] | None = None
    num_refinement_blocks: int | None = None
    heads: list[int] | None = None
    ffn_expansion_factor: float | None = None
    # A network of your own instead of Restormer (docs/custom_networks.md): package.module:Class (or a
    # function returning the network), built with kwargs. Set on the command line, it replaces the
    # recipe file's Restormer shape (preset and the fields above), which do not go with it otherwise.
    arch: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    channels: list[int] | None = None  # with arch: [input, output] image channels; null: [3, 3]
    checkpointing: bool = False  # recompute each transformer block in backward: big patches fit
    compile: bool = False
    init_weights: str | None = None  # official .pth / safetensors to fine-tune from

    def shape_overrides(self) -> dict[str, Any]:
        """The shape fields set here (model.ARCH_FIELDS but the preset): build_model(preset, **these)."""
        return {k: getattr(self, k) for k in ARCH_FIELDS if k != "preset" and getattr(self, k) is not None}


# The keys that name the network, Restormer's shape or a network by import path: model.arch on the
# command line replaces all of them (load_config).
NETWORK_KEYS = (*ARCH_FIELDS, "arch", "kwargs", "channels")


@dataclass
class DataConfig:
    train: str = "demo"  # shard folder, index.json, brace pattern or URL; "demo" = built-in data
    val: str | None = "demo"  # same forms; null disables validation
    num_workers: int = 2
    noise_sigma: float | None = None  # fixed Gaussian sigma in 0-255 units, added online
    noise_sigma_range: list[float] | None = None  # blind denoising: sigma ~ U[lo, hi] per sample
    noise_clip: bool = False  # the paper does not clip noisy inputs
    mixup: bool = False
    augment: bool = True
    strict: bool = False  # a bad sample raises instead of being skipped and counted
    # Remote shards (http(s)://, s3://, pipe:), see docs/remote_storage.md.
    retries: int = DEFAULT_RETRIES  # failures in a row before a shard is given up (skipped, named); 1 MiB read resets it
    timeout_s: float = DEFAULT_TIMEOUT_S  # longest any connect or read may block
    cache_dir: str | None = None  # local whole-shard cache of remote shards (a node's SSD), apart from the run folder
    cache_limit_gb: float | None = None  # required with cache_dir: its size limit (10^9 bytes)


@dataclass
class ProgressiveConfig:
    """Restormer's progressive learning: stage i runs iters[i] steps at patch[i], batch[i] per GPU."""

    iters: list[int] = field(default_factory=lambda: [92000, 64000, 48000, 36000, 36000, 24000])
    patch: list[int] = field(default_factory=lambda: [128, 160, 192, 256, 320, 384])
    batch: list[int] = field(default_factory=lambda: [8, 5, 4, 2, 1, 1])


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # implementations: train.build.OPTIMIZERS
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    grad_clip: float | None = 0.01  # max gradient norm; null disables clipping


@dataclass
class LRConfig:
    # restart_cosine: the official schedule, cosine from lr to eta_mins[i] over periods[i]
    # (eta_mins[0] == lr makes the first period constant). cosine: lr -> eta_min over the run.
    schedule: Literal["restart_cosine", "cosine", "constant"] = "restart_cosine"  # train.schedule.SCHEDULES
    periods: list[int] = field(default_factory=lambda: [92000, 208000])
    eta_mins: list[float] = field(default_factory=lambda: [3e-4, 1e-6])
    eta_min: float = 1e-6
    warmup_iters: int = 0


@dataclass
class LossConfig:
    name: Literal["l1", "l2", "charbonnier", "psnr"] = "l1"  # implementations: train.losses.OBJECTIVES
    charbonnier_eps: float = 1e-3


@dataclass
class ValConfig:
    every: int = 4000  # steps; validation also runs at the end
    max_images: int | None = None
    y_channel: bool = False  # also report PSNR/SSIM on the Y channel (deraining convention)
    border: int = 0  # pixels cropped from each side before metrics
    # Fixed Gaussian sigma (0-255) of clean-only validation images; null: the training noise
    # (data.noise_*). Blind recipes validate at one sigma, as the official ones (sigma_test: 25).
    noise_sigma: float | None = None
    # Tiled inference: for validation images larger than memory, or to restore in crops near the
    # training patch size (MDTA's channel attention pools statistics over its whole input).
    tile: int | None = None
    tile_overlap: int = 32  # pixels shared by neighbouring tiles (their seams are blended)
    grid_images: int = 4  # crops in the degraded | restored | target sample grid
    grid_crop: int = 128
    # At the end, also score classical denoisers (train.baselines) on the same images, to compare.
    # Gaussian denoising with a fixed data.noise_sigma only.
    classical_baselines: bool = False


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online if logged in, else offline
    project: str = "restormer"
    entity: str | None = None
    group: str | None = None


@dataclass
class TrainConfig:
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None  # null: what `accelerate launch` says
    grad_accum: int = 1
    ema_decay: float | None = None  # e.g. 0.999; validation and export then use the EMA weights
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3  # the best checkpoint is kept in addition
    best_metric: Literal["psnr", "ssim"] = "psnr"  # with val.y_channel the Y-channel figure (paper's convention)
    max_nonfinite: int = 20  # consecutive non-finite steps before the run stops
    threads: int | None = None  # torch intra-op threads on CPU; null keeps torch's default
    # The recipe's GPU count. On another world size `batch_rule` keeps the global batch
    # (accumulate), keeps the samples seen (iterations), or changes nothing (none).
    reference_world_size: int | None = 8
    batch_rule: Literal["accumulate", "iterations", "none"] = "accumulate"
    max_steps: int | None = None  # stop early (smoke tests); the schedule still follows the recipe
    dist_timeout_s: int = 1800  # a collective waiting longer (a dead rank) fails instead of hanging
    # Device memory per process the memory plan fits every stage into (train/memory_plan.py), in GB of
    # 2^30 bytes: auto = the GPU's memory (no plan on a CPU), a number, or null for no plan.
    memory_gb: float | Literal["auto"] | None = "auto"


@dataclass
class Config:
    run_name: str = "restormer"
    output_dir: str | None = None  # default runs/<run_name>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    val: ValConfig = field(default_factory=ValConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- building from YAML + overrides


class _Mismatch(ConfigError):
    """A value of another kind than the annotation takes (a string for a number, ...): a union tries its
    next option. Other ConfigErrors of _coerce (a bad list item, a number too large) are the answer."""


_KINDS = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}
_PLAIN = (type(None), bool, int, float, str)


def _choices(annotation: Any) -> list[str]:
    """What an annotation accepts, as messages name it: ['a number', 'auto', 'null']."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [choice for option in typing.get_args(annotation) for choice in _choices(option)]
    if origin is Literal:
        return list(typing.get_args(annotation))
    return [_KINDS[origin or annotation]]


def _coerce(value: Any, annotation: Any, name: str, source: str) -> Any:
    where = f"{name} (from {source})"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, name, source)
            except _Mismatch:
                pass
        choices = _choices(annotation)
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise _Mismatch(f"{where}: expected {listed}, got {_shown(value)}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"{where}: expected a list, got {_shown(value)}")
        try:
            return [_coerce(v, item_type, f"{name}[{i}]", source) for i, v in enumerate(value)]
        except _Mismatch as err:  # a list, with a bad item: that item's message is the answer
            raise ConfigError(str(err)) from None
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch(f"{where}: expected a mapping of names to values, e.g. {{width: 16}}, got {_shown(value)}")
        names = [key for key in value if not (isinstance(key, str) and key.isidentifier())]
        problem = f"{_shown(names[0])} is not an argument name" if names else _plain_problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}; give names and plain YAML values (numbers, strings, true/false, "
                              "null, lists, mappings)")
        return dict(value)
    if origin is Literal:
        options = typing.get_args(annotation)
        if isinstance(value, str) and value in options:
            return value
        raise _Mismatch(f"{name}={_shown(value)} is not one of: {', '.join(options)} (from {source})")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(f"{where}: expected true/false, got {_shown(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch(f"{where}: expected an integer, got {_shown(value)}")
    if annotation is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:  # YAML reads "3e-4" (no dot) as a string
                return float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {_shown(value)} is too large for a number (the largest is about "
                                  "1.8e308)") from None
            except ValueError:
                pass
        raise _Mismatch(f"{where}: expected a number, got {_shown(value)}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"{where}: expected a string, got {_shown(value)}")
    raise TypeError(f"unsupported config annotation {annotation} at {where}")


def _plain_problem(value: Any, where: str = "") -> str | None:
    """What in a value is not plain YAML (a date, say), or None."""
    if isinstance(value, dict):
        items = [(f"{where}.{key}" if where else str(key), item) for key, item in value.items()]
        items += [(f"{where} key {key!r}", key) for key in value]
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, _PLAIN):
        return None
    else:
        return f"{where} is a {type(value).__name__} ({_shown(value)})"
    return next(filter(None, (_plain_problem(item, name) for name, item in items)), None)


def _shown(value: Any) -> str:
    """A value as a message shows it: an integer of hundreds of digits (a YAML hex literal, say) shortened."""
    text = repr(value)
    if isinstance(value, int) and len(text) > 24:
        return f"{text[:12]}...{text[-4:]} ({len(text)} digits)"
    return text


# Keys that existed once: a config that sets one gets this explanation; a checkpoint's saved config
# (written by an older version) may still hold them, and there they are ignored.
REMOVED_KEYS = {
    "data.resume": "resume is always exact now: the stream's position is saved in every checkpoint and a "
                   "resumed run continues with the samples the interrupted one would have drawn next; drop the key",
    "model.channels_last": "the model always runs channels-last now; drop the key",
}


def _merge(obj: Any, updates: dict[str, Any], prefix: str, source: str, old: bool = False) -> None:
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if where in REMOVED_KEYS:
            if old:
                continue
            raise ConfigError(f"'{where}' (from {source}) was removed: {REMOVED_KEYS[where]}")
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{where}' (from {source}); valid keys here: {', '.join(valid)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' (from {source}) is a section, give a mapping")
            _merge(current, value, f"{where}.", source, old)
        elif isinstance(current, dict) and isinstance(value, dict):  # model.kwargs.width=32 sets one entry
            setattr(obj, key, {**current, **_coerce(value, hints[key], where, source)})
        else:
            setattr(obj, key, _coerce(value, hints[key], where, source))


def resolve_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    recipes = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file '{name_or_path}' not found; built-in recipes: {recipes}")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.lr=2e-4)")
    dotted, raw = text.split("=", 1)
    try:
        return dotted.strip().split("."), parse_yaml(raw, override_source(text)) if raw.strip() else None
    except YAMLInputError as err:
        raise ConfigError(str(err)) from err


def override_source(text: str) -> str:
    """How messages name an override: its text cut short (it may be a megabyte long), control
    characters escaped (the message stays one line)."""
    shown = text if len(text) <= 80 else f"{text[:60]} ... {text[-15:]}"
    return f"override '{printable(shown)}'"


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML config's sections (bounded, see train.safe_yaml); ConfigError naming the file if unusable."""
    try:
        data = read_yaml(path)
    except YAMLInputError as err:
        raise ConfigError(str(err)) from err
    return _sections(data, str(path))


def _sections(data: Any, source: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, then validated."""
    cfg = Config()
    if path is not None:
        resolved = resolve_config_path(str(path))
        _merge(cfg, read_config_file(resolved), "", str(resolved))
    parsed = []
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        parsed.append((nested, override_source(text)))
    if any(isinstance(n.get("model"), dict) and "arch" in n["model"] for n, _ in parsed):
        # Another network on the command line: the recipe's network (Restormer's shape) goes with it.
        for key in NETWORK_KEYS:
            setattr(cfg.model, key, getattr(ModelConfig(), key))
    for nested, source in parsed:
        _merge(cfg, nested, "", source)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """A config saved by a run (a checkpoint's config.yaml); keys removed since are ignored."""
    cfg = Config()
    _merge(cfg, _sections(data, source), "", source, old=True)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Checks that need no data and no processes; data-dependent checks live in train.data."""
    p = cfg.progressive
    if not (len(p.iters) == len(p.patch) == len(p.batch)) or not p.iters:
        raise ConfigError(
            "progressive.iters, progressive.patch and progressive.batch need the same, non-zero "
            f"length (got {len(p.iters)}, {len(p.patch)}, {len(p.batch)})"
        )
    for i, (iters, patch, batch) in enumerate(zip(p.iters, p.patch, p.batch)):
        if iters <= 0 or batch <= 0:
            raise ConfigError(f"progressive stage {i}: iters and batch must be positive")
        if patch <= 0 or patch % SIZE_MULTIPLE:
            raise ConfigError(
                f"progressive.patch[{i}]={patch}: Restormer downsamples 3 times, so patch sizes "
                f"must be positive multiples of {SIZE_MULTIPLE}"
            )
    if cfg.lr.schedule == "restart_cosine":
        if len(cfg.lr.periods) != len(cfg.lr.eta_mins) or not cfg.lr.periods:
            raise ConfigError("lr.periods and lr.eta_mins need the same, non-zero length")
        if sum(cfg.lr.periods) < sum(p.iters):
            raise ConfigError(
                f"lr.periods sum to {sum(cfg.lr.periods)} but the stages run {sum(p.iters)} "
                "iterations: the schedule would run out; lengthen the last period"
            )
    if cfg.lr.warmup_iters < 0:
        raise ConfigError("lr.warmup_iters must be >= 0")
    if cfg.data.noise_sigma is not None and cfg.data.noise_sigma_range is not None:
        raise ConfigError("set data.noise_sigma (fixed) or data.noise_sigma_range (blind), not both")
    if cfg.data.noise_sigma_range is not None:
        lo_hi = cfg.data.noise_sigma_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"data.noise_sigma_range={lo_hi}: give [low, high] with 0 <= low <= high")
    if cfg.data.noise_sigma is not None and cfg.data.noise_sigma < 0:
        raise ConfigError("data.noise_sigma must be >= 0")
    if cfg.val.noise_sigma is not None and cfg.val.noise_sigma < 0:
        raise ConfigError("val.noise_sigma must be >= 0")
    for name in ("grad_accum", "log_every", "ckpt_every", "keep_last", "max_nonfinite"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if cfg.val.classical_baselines and cfg.val.noise_sigma is None and cfg.data.noise_sigma is None \
            and cfg.data.noise_sigma_range is not None:
        raise ConfigError("val.classical_baselines compares with Gaussian denoisers of a known noise level, but the "
                          "validation noise is a range: set val.noise_sigma (e.g. 25) or data.noise_sigma, or "
                          "val.classical_baselines=false")
    if cfg.val.every < 1:
        raise ConfigError("val.every must be >= 1")
    problem = cfg.val.tile is not None and tiling_problem(cfg.val.tile, cfg.val.tile_overlap)
    if problem:
        raise ConfigError(f"val.tile={cfg.val.tile} val.tile_overlap={cfg.val.tile_overlap}: {problem}; or val.tile=null "
                          "for whole images")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError("train.ema_decay must be in (0, 1)")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError("optim.grad_clip must be positive (or null to disable clipping)")
    if cfg.data.num_workers < 0:
        raise ConfigError("data.num_workers must be >= 0")
    _validate_remote(cfg.data, cfg.run_dir)
    for name in ("reference_world_size", "threads", "max_steps"):
        value = getattr(cfg.train, name)
        if value is not None and value < 1:
            raise ConfigError(f"train.{name} must be >= 1 (or null)")
    if cfg.train.dist_timeout_s < 1:
        raise ConfigError("train.dist_timeout_s must be >= 1 second")
    if isinstance(cfg.train.memory_gb, float) and not cfg.train.memory_gb > 0:
        raise ConfigError(f"train.memory_gb={cfg.train.memory_gb}: give the device memory per process in GB (e.g. 24), "
                          "auto (the GPU's own) or null (no memory plan)")
    if not cfg.run_name or "/" in cfg.run_name:
        raise ConfigError(f"run_name '{cfg.run_name}' must be a non-empty name without '/'")
    _check_limits(cfg)
    # Last: it builds the network (on the meta device) from numbers the checks above bounded.
    overrides = cfg.model.shape_overrides()
    if cfg.model.arch is not None:
        _validate_imported(cfg.model, overrides)
        return
    for key, unset in (("kwargs", {}), ("channels", None)):
        if getattr(cfg.model, key) != unset:
            raise ConfigError(f"model.{key} goes with model.arch (a network of your own, by import path); "
                              f"Restormer's shape is model.preset and model.dim/num_blocks/heads/...: drop model.{key}")
    problem = arch_problem(cfg.model.preset, **overrides)
    if problem:
        given = "".join(f", {k}={v}" for k, v in overrides.items())
        raise ConfigError(f"model (preset {cfg.model.preset}{given}): {problem}")


def _validate_imported(model: ModelConfig, overrides: dict[str, Any]) -> None:
    restormer = ([f"model.preset={model.preset}"] if model.preset != ModelConfig.preset else []) + [
        f"model.{k}={v}" for k, v in overrides.items()]
    if restormer:
        raise ConfigError(f"{', '.join(restormer)} set Restormer's shape, but model.arch={model.arch} trains another "
                          "network: drop them (its arguments go in model.kwargs), or drop model.arch")
    if model.channels is not None and len(model.channels) != 2:
        raise ConfigError(f"model.channels={model.channels}: give [input, output] image channels, e.g. [3, 3]")
    # Here, not at the top: train/network.py builds from a Config, so it imports this module.
    from train.network import import_problem

    problem = import_problem(model.arch, model.kwargs)
    if problem:
        raise ConfigError(problem)


# Every number of a config is a count, a size, a rate, a level or a time: none is negative, NaN or
# infinite, and no integer needs 2**31 or more (seeds, steps and timeouts end in C ints and timers
# that overflow; a float as large as optim.lr=1e30 is a legitimate way to provoke non-finite steps).
# Checked after the rules above, whose messages are more specific (an empty level: model.arch_problem).
NUMBER_LIMIT = 2**31 - 1
# (low, high) of settings whose range is narrower; the architecture's are ~10x the largest official
# Restormer (dim 48, blocks [4, 6, 6, 8], 8 heads, refinement 4), a larger one takes minutes to build.
RANGES = {
    "model.dim": (1, 1024), "model.num_blocks": (0, 64), "model.heads": (1, 64),
    "model.num_refinement_blocks": (0, 64), "model.ffn_expansion_factor": (0.1, 16), "model.channels": (1, 64),
    "optim.betas": (0, 0.9999999), "data.num_workers": (0, 256), "train.threads": (1, 1024),
    "data.timeout_s": (0, NUMBER_LIMIT), "val.max_images": (1, NUMBER_LIMIT), "val.grid_crop": (1, NUMBER_LIMIT),
    # Sizes that become byte counts (x 2**30, x 10**9): a petabyte is beyond any device or local disk.
    "train.memory_gb": (0, 2**20), "data.cache_limit_gb": (0, 10**6),
}


def _check_limits(cfg: Config) -> None:
    """Every number finite, >= 0 and (integers) at most NUMBER_LIMIT, or within its RANGES entry."""
    for where, value in _numbers(cfg.to_dict(), ""):
        key = where.split("[")[0]  # a list's items share its range
        if key in RANGES:
            low, high = RANGES[key]
            if not low <= value <= high:  # False for NaN too; exact for integers of any size
                raise ConfigError(f"{where}={_shown(value)} is outside [{low}, {high}]")
        # An integer is compared as one: math.isfinite would convert it to a float, which overflows.
        elif not (0 <= value <= NUMBER_LIMIT if isinstance(value, int) else math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}={_shown(value)}: numbers in a config are finite and >= 0, integers below 2**31")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas}: give two values, e.g. [0.9, 0.999]")


def _numbers(tree: Any, where: str):
    """(dotted key, value) of every number in a config's to_dict(), list items as key[i]."""
    if where == "model.kwargs":  # the network's own arguments: its constructor checks them
        return
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{where}.{key}" if where else key)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{where}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield where, tree


def _validate_remote(data: DataConfig, run_dir: Path) -> None:
    problem = settings_problem(data.retries, data.timeout_s, data.cache_dir, data.cache_limit_gb, prefix="data.",
                               limit_name="cache_limit_gb")
    if problem:
        raise ConfigError(problem)
    overlap = data.cache_dir is not None and folder_overlap(data.cache_dir, run_dir)
    if overlap:
        raise ConfigError(f"data.cache_dir={data.cache_dir} {overlap} the run folder {run_dir}: the cache deletes the "
                          "copies it evicts, and keeps its files apart from a run's; give it a folder of its own, "
                          "e.g. data.cache_dir=/local_ssd/shard_cache")
    problem = data.cache_dir is not None and cache_folder_problem(data.cache_dir)
    if problem:
        raise ConfigError(f"data.cache_dir={data.cache_dir}: {problem}")
