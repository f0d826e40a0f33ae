"""Build a ready-to-run model from what a user points at: a run, a checkpoint, or a weights file.

Accepted:
- a run folder (runs/<name>): its export/model.safetensors, else its newest complete checkpoint;
- a checkpoint folder (runs/<name>/checkpoints/step_*): ema.safetensors when present (unless
  prefer_ema=False), else model.safetensors;
- a .safetensors file or an official Restormer .pth (`{'params': ...}`), wherever it lies.
The architecture is read off the weights themselves (model.infer_arch), so no file needs a preset or
a config.yaml beside it. Explicit architecture arguments override what the weights say (and then
must fit them); the preset name shown comes from --preset, a config.yaml beside the weights, the
official release file name, or the first preset of the same kind.

A network of the user's own (model.arch, train/network.py) cannot be read off its weights: the
config.yaml its run, checkpoint or export wrote names it (model.arch, model.kwargs, model.channels),
and the class is imported from there (its module must be on PYTHONPATH, as when it was trained).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ARCH_FIELDS, PRESETS, Restormer, WeightsFileError, infer_arch, load_weights, read_state_dict
from train import checkpoint as ckpt
from train.exporting import SAFETENSORS_FILE
from train.network import NetworkImportError, build_network, describe_network, network_record, record_channels
from train.safe_yaml import YAMLInputError, read_yaml

# File-name prefixes of the official release's weights and the preset each needs.
OFFICIAL_NAMES = {
    "motion_deblurring": "motion_deblurring",
    "deraining": "deraining",
    "single_image_defocus_deblurring": "single_image_defocus",
    "dual_pixel_defocus_deblurring": "dual_pixel_defocus",
    "gaussian_color_denoising": "gaussian_color_denoising",
    "gaussian_gray_denoising": "gaussian_gray_denoising",
    "real_denoising": "real_denoising",
}


class ModelLoadError(ValueError):
    """Weights that cannot be found or matched to an architecture; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on the requested device
    weights: Path  # the file the parameters came from
    arch: dict[str, Any]  # the network's record (train/network.py): preset + overrides, or arch + kwargs
    channels: tuple[int, int]  # (input, output) image channels

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def out_channels(self) -> int:
        return self.channels[1]

    @property
    def dual_pixel(self) -> bool:
        return bool(getattr(self.model, "dual_pixel_task", False))

    def describe(self) -> str:
        params = sum(p.numel() for p in self.model.parameters())
        if "arch" in self.arch:
            return f"{self.weights} ({describe_network(self.arch)}; {params / 1e6:.2f} M parameters)"
        extra = ", ".join(f"{k}={v}" for k, v in self.arch.items() if k != "preset")
        return f"{self.weights} (preset {self.arch['preset']}{', ' + extra if extra else ''}; {params / 1e6:.2f} M parameters)"


def _config_model(config_path: Path | None) -> dict[str, Any]:
    """The model section of a run's config.yaml, if it is readable ({} otherwise)."""
    if config_path is None:
        return {}
    try:
        data = read_yaml(config_path)
    except YAMLInputError:
        return {}
    section = data.get("model") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _preset_of_kind(kwargs: dict[str, Any]) -> str | None:
    """The first preset whose fixed fields (channels, LayerNorm, dual-pixel) the architecture shares."""
    for name, fixed in PRESETS.items():
        if all(kwargs.get(k, False) == v for k, v in {"dual_pixel_task": False, **fixed}.items()):
            return name
    return None


def resolve_weights(path: str | Path, prefer_ema: bool = True) -> tuple[Path, Path | None]:
    """-> (weights file, config.yaml describing its architecture or None)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder (give a run folder, a checkpoint folder, "
                             "a .safetensors file or an official .pth)")
    if path.is_dir():
        if (path / ckpt.STATE_FILE).is_file():  # a checkpoint folder
            ema = path / ckpt.EMA_FILE
            weights = ema if prefer_ema and ema.is_file() else path / ckpt.MODEL_FILE
            if not weights.is_file():
                raise ModelLoadError(f"{path}: checkpoint without model.safetensors (was it saved by DeepSpeed "
                                     "ZeRO-3? export the weights with the trainer first)")
            return weights, path / ckpt.CONFIG_FILE
        exported = path / ckpt.EXPORT_DIR / SAFETENSORS_FILE
        if exported.is_file():
            # The export's own config.yaml describes its weights; the run folder's is the latest start's.
            configs = [c for c in (exported.parent / ckpt.CONFIG_FILE, path / ckpt.CONFIG_FILE) if c.is_file()]
            return exported, configs[0] if configs else None
        found = ckpt.complete_checkpoints(path / ckpt.CHECKPOINTS_DIR)
        if found:
            return resolve_weights(found[-1], prefer_ema)
        raise ModelLoadError(f"{path}: neither a checkpoint folder (no {ckpt.STATE_FILE}) nor a run folder "
                             "(no export/model.safetensors, no complete checkpoints/step_*)")
    if path.suffix == ".safetensors":
        for folder in (path.parent, path.parent.parent):
            if (folder / ckpt.CONFIG_FILE).is_file():
                return path, folder / ckpt.CONFIG_FILE
    return path, None


def official_preset(path: Path) -> str | None:
    """The preset an official release file name implies (deraining.pth -> deraining), or None."""
    stem = path.stem.lower()
    for prefix, preset in OFFICIAL_NAMES.items():
        if stem.startswith(prefix):
            return preset
    return None


def load_model(path: str | Path, arch: dict[str, Any] | None = None, prefer_ema: bool = True,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Finds the weights, reads the architecture off them, loads strictly, returns the model in eval mode.

    arch: preset and shape overrides (ARCH_FIELDS); they win over what the weights say. A shape
    mismatch raises model.WeightsMismatchError, which names the keys that differ.
    """
    weights, config = resolve_weights(path, prefer_ema)
    section = _config_model(config)
    given = {k: v for k, v in (arch or {}).items() if v is not None}
    if section.get("arch") is not None:
        return _load_imported(network_record(section), weights, config, given, device)
    try:
        state = read_state_dict(weights)
        kwargs = infer_arch(state)
    except WeightsFileError as err:  # names the file itself
        raise ModelLoadError(str(err)) from None
    except (OSError, ValueError, KeyError) as err:
        hint = "" if config else (". A network of your own (model.arch) loads from its run, checkpoint or export "
                                  "folder, whose config.yaml names it")
        raise ModelLoadError(f"{weights}: {err}{hint}") from err
    preset = given.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ModelLoadError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        kwargs.update(PRESETS[preset])
    kwargs.update(given)
    name = preset or section.get("preset") or official_preset(weights) or _preset_of_kind(kwargs) or "custom"
    model = Restormer(**kwargs)
    load_weights(model, state)
    resolved = {"preset": name, **{k: kwargs[k] for k in ARCH_FIELDS if k in kwargs}}
    return LoadedModel(model.to(device).eval(), weights, resolved, (kwargs["inp_channels"], kwargs["out_channels"]))


def _load_imported(record: dict[str, Any], weights: Path, config: Path, given: dict[str, Any],
                   device: str | torch.device) -> LoadedModel:
    """The network by import path that `config` names, with the weights loaded strictly."""
    if given:
        options = " ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ModelLoadError(f"{options}: {config} names a network of its own ({record['arch']}), not Restormer; "
                             "drop these options (its arguments are model.kwargs there)")
    try:
        model = build_network(record)
        state = read_state_dict(weights)
    except NetworkImportError as err:
        raise ModelLoadError(f"{config}: {err}") from err
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{weights}: {err}") from err
    load_weights(model, state)
    return LoadedModel(model.to(device).eval(), weights, record, record_channels(record))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options every command uses to pick weights and architecture."""
    group = parser.add_argument_group("model")
    group.add_argument("-w", "--weights", required=True, metavar="PATH",
                       help="run folder, checkpoint folder (runs/NAME/checkpoints/step_*), .safetensors file "
                            "or official .pth")
    group.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                       help=f"architecture preset ({', '.join(PRESETS)}); not needed: the architecture is read "
                            "off the weights (this overrides its channels and LayerNorm type)")
    group.add_argument("--dim", type=int, metavar="N", help="override: channels of level 1")
    group.add_argument("--num-blocks", type=int, nargs=4, metavar="N", help="override: blocks per level")
    group.add_argument("--num-refinement-blocks", type=int, metavar="N", help="override: refinement blocks")
    group.add_argument("--heads", type=int, nargs=4, metavar="N", help="override: attention heads per level")
    group.add_argument("--ffn-expansion-factor", type=float, metavar="F", help="override: GDFN expansion factor")
    group.add_argument("--no-ema", action="store_true",
                       help="from a checkpoint folder, use the trained weights even when EMA weights exist")


def model_from_args(args: argparse.Namespace, device: str | torch.device = "cpu") -> LoadedModel:
    arch = {k: getattr(args, k) for k in ARCH_FIELDS}
    return load_model(args.weights, arch, prefer_ema=not args.no_ema, device=device)


def pick_device(name: str) -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device
