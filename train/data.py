"""Connects the run config to the shard streams of data_shards, and checks the data up front."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_shards.demo import ensure_demo_data
from data_shards.index import INDEX_NAME, ShardIndex
from data_shards.pack import PackConfig, PackError, pack
from data_shards.publish import build_once
from data_shards.remote import RemoteSettings, redact
from data_shards.stream import (NoiseConfig, StreamSettings, build_train_loader, build_val_loader, global_batch_problem,
                                index_source, noise_mismatch)
from train.config import Config, ConfigError
from train.metrics import SSIM_WINDOW
from train.network import network_record, record_channels
from train.schedule import Stage, StagePlan


def resolve_sources(cfg: Config) -> tuple[str, str | None]:
    """Turns `demo` into the built-in data set's folders (packing it on first use), and a plain
    image folder given as data.val into shards under the run folder."""
    train, val = cfg.data.train, cfg.data.val
    if "demo" in (train, val):
        demo = ensure_demo_data()
        train = str(demo.train) if train == "demo" else train
        val = str(demo.val) if val == "demo" else val
    if val is not None and _is_image_folder(Path(val)):
        val = str(pack_val_folder(Path(val), cfg.run_dir / "val_shards"))
    return train, val


def _is_image_folder(path: Path) -> bool:
    """A local folder that is neither a packed split nor a pack output holding splits."""
    return (path.is_dir() and not (path / INDEX_NAME).exists() and not any(path.glob("*.tar"))
            and not any(path.glob(f"*/{INDEX_NAME}")))


def pack_val_folder(folder: Path, cache: Path) -> Path:
    """Packs a validation folder once: `input/` + `target/` subfolders (pairs matched by name) or
    clean images (noise from data.noise_*). Every rank may call it (data_shards.publish)."""
    out = cache / folder.resolve().name
    paired = (folder / "input").is_dir() and (folder / "target").is_dir()

    def build(staging: Path) -> None:
        config = PackConfig(
            out=staging, source=None if paired else folder, split="val", progress=False,
            inputs=((None, folder / "input"),) if paired else (), target=folder / "target" if paired else None,
            command=f"data.val={folder} (packed by the trainer)",
        )
        try:
            report = pack(config)
        except PackError as err:
            raise ConfigError(f"data.val: cannot use the folder '{folder}': {err}") from err
        if not report.samples:
            raise ConfigError(f"data.val: no readable images in '{folder}' ({len(report.skipped)} skipped)")

    build_once(out, build, lambda path: (path / "val" / INDEX_NAME).exists())
    return out / "val"


def _load_index(cfg: Config, source: str, what: str) -> ShardIndex | None:
    """The index a data source names (local or remote, read with the run's retries and timeout), checked
    whole; None for a shard pattern (the stream checks what it can when it opens the shards)."""
    remote = "://" in source or source.startswith("pipe:")
    if not index_source(source) and (remote or "{" in source):
        return None
    if not remote and not Path(source).exists():
        raise ConfigError(
            f"data.{what}: '{source}' does not exist; give a folder made by "
            "`python -m data_shards.pack ... --out DIR` (its train/ or val/ split), an index.json, "
            "a brace pattern or a URL"
        )
    try:
        index = ShardIndex.load(source, remote_settings(cfg))
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.{what}: cannot read the shard index: {err}") from err
    problem = index.records_problem()
    if problem:
        raise ConfigError(f"data.{what}: {problem}")
    return index


def remote_settings(cfg: Config) -> RemoteSettings:
    """How the stream reads remote shards: data.retries, data.timeout_s, data.cache_dir, data.cache_limit_gb."""
    d = cfg.data
    limit = round(d.cache_limit_gb * 1e9) if d.cache_limit_gb is not None else None
    return RemoteSettings(retries=d.retries, timeout_s=d.timeout_s, cache_dir=d.cache_dir, cache_limit_bytes=limit)


def noise_config(cfg: Config) -> NoiseConfig | None:
    d = cfg.data
    if d.noise_sigma is None and d.noise_sigma_range is None:
        return None
    sigma_range = tuple(d.noise_sigma_range) if d.noise_sigma_range is not None else None
    return NoiseConfig(sigma=d.noise_sigma, sigma_range=sigma_range, clip=d.noise_clip)


def val_noise_config(cfg: Config) -> NoiseConfig | None:
    """Noise of clean-only validation images: val.noise_sigma when set, else the training noise."""
    if cfg.val.noise_sigma is None:
        return noise_config(cfg)
    return NoiseConfig(sigma=cfg.val.noise_sigma, clip=cfg.data.noise_clip)


def check_data(cfg: Config, plan: StagePlan, train_source: str, val_source: str | None,
               world_size: int = 1) -> None:
    """Data-dependent config errors, raised before any training work (or worker) starts."""
    index = _load_index(cfg, train_source, "train")
    if val_source is not None:
        _check_val(cfg, val_source, _load_index(cfg, val_source, "val"))
    if index is None:
        return
    if index.total_samples == 0:
        raise ConfigError(f"data.train: '{train_source}' holds no samples")
    problem = noise_mismatch(bool(index.inputs), noise_config(cfg), f"data.train: '{train_source}'")
    if problem:
        raise ConfigError(problem)
    _check_channels(cfg, index, train_source)
    largest = max(index.max_size) if index.max_size else None
    for stage in plan.stages:
        if largest is not None and stage.patch > largest:
            raise ConfigError(
                f"progressive.patch[{stage.index}]={stage.patch} is larger than every training "
                f"image in '{train_source}' (largest side {largest} px); lower the patch size or pack "
                "larger images (and a smaller --tile)"
            )
        # The stream refuses it too, but only once every process has started; an optimizer step may span epochs.
        problem = global_batch_problem(index.total_samples, world_size, stage.batch)
        if problem:
            raise ConfigError(f"data.train: '{redact(train_source)}': {problem} (stage {stage.index}); pack more "
                              "data or lower progressive.batch")


def _check_channels(cfg: Config, index: ShardIndex, source: str) -> None:
    """A network of the user's own takes model.channels; the stream gives what the data holds (named
    inputs, as dual-pixel views, concatenated). Restormer's preset decides its own channels."""
    if cfg.model.arch is None:
        return
    stored = [index.channels * max(1, len(index.inputs)), index.channels]
    wanted = list(record_channels(network_record(cfg.model)))
    if stored != wanted:
        raise ConfigError(f"data.train: '{redact(source)}' gives {stored[0]}-channel inputs and {stored[1]}-channel "
                          f"targets, but model.channels is {wanted}: set model.channels={stored} (and the network's "
                          "own arguments in model.kwargs to match)")


VAL_NOISE_SETTINGS = "for validation (val.noise_sigma, e.g. 25, or data.noise_* when it is null)"


def _check_val(cfg: Config, source: str, index: ShardIndex | None) -> None:
    if index is None:
        return
    problem = noise_mismatch(bool(index.inputs), val_noise_config(cfg), f"data.val: '{source}'", VAL_NOISE_SETTINGS)
    if problem:
        raise ConfigError(problem)
    if index.min_size is not None and min(index.min_size) - 2 * cfg.val.border < SSIM_WINDOW:
        raise ConfigError(f"val.border={cfg.val.border} leaves less than SSIM's {SSIM_WINDOW}-pixel window of the "
                          f"smallest validation image ({index.min_size[1]}x{index.min_size[0]}) in '{source}'; "
                          "lower val.border")
    if cfg.val.classical_baselines and index.inputs:
        raise ConfigError(f"val.classical_baselines adds Gaussian noise to clean validation images, but data.val "
                          f"'{source}' holds degraded inputs: set val.classical_baselines=false")


def stream_settings(cfg: Config, stage: Stage, rank: int, world_size: int, position: int) -> StreamSettings:
    """The training stream of one progressive-learning stage, starting at global sample `position`."""
    return StreamSettings(
        patch=stage.patch, batch=stage.batch, seed=cfg.train.seed, rank=rank, world_size=world_size,
        num_workers=cfg.data.num_workers, start=position, noise=noise_config(cfg), augment=cfg.data.augment,
        mixup=cfg.data.mixup, strict=cfg.data.strict, remote=remote_settings(cfg),
    )


def train_batches(source: str, settings: StreamSettings) -> Iterator[dict]:
    """An endless stream of training batches (see data_shards.stream for what they carry)."""
    return iter(build_train_loader(source, settings))


def val_images(cfg: Config, source: str, rank: int, world_size: int):
    return build_val_loader(
        source,
        rank=rank,
        world_size=world_size,
        noise=val_noise_config(cfg),
        max_images=cfg.val.max_images,
        strict=cfg.data.strict,
        remote=remote_settings(cfg),
    )
