"""The network a run trains: what it is (`network_arch`, recorded by export and checked on resume),
the one builder of it (`build_network`: the trainer's, the memory plan's probe and ZeRO-3's full copy
all build through it) and the run's starting point (`initial_network`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model import ARCH_FIELDS, build_model, load_weights
from train.config import Config, ConfigError, config_from_dict, read_config_file


def network_arch(cfg: Config) -> dict[str, Any]:
    """build_network's argument for this config: what export/ and config.yaml record of the network."""
    return {"preset": cfg.model.preset, **cfg.model.shape_overrides()}


def build_network(arch: dict[str, Any]) -> torch.nn.Module:
    """The network of `arch` (network_arch's), freshly initialised from torch's RNG."""
    return build_model(**arch)


def initial_network(cfg: Config) -> torch.nn.Module:
    """The network a run starts from: built (the config's check, model.arch_problem, built this shape
    already), with model.init_weights loaded when set."""
    net = build_network(network_arch(cfg))
    if cfg.model.init_weights:
        try:
            load_weights(net, cfg.model.init_weights)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing, refused pickle, wrong shapes
            raise ConfigError(f"model.init_weights={cfg.model.init_weights}: {err}") from err
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def network_changes(cfg: Config, config_file: Path) -> list[str]:
    """How the network of a checkpoint's config.yaml differs from `cfg`'s, one line per field."""
    saved = config_from_dict(read_config_file(config_file), str(config_file))
    return [f"model.{k}: checkpoint {getattr(saved.model, k)!r} vs now {getattr(cfg.model, k)!r}"
            for k in ARCH_FIELDS if getattr(saved.model, k) != getattr(cfg.model, k)]
