"""Build a ready-to-run model from what a user points at: a run, a checkpoint, or a weights file.

Accepted:
- a run folder (runs/<name>): its export/model.safetensors, else its newest complete checkpoint;
- a checkpoint folder (runs/<name>/checkpoints/step_*): ema.safetensors when present (unless
  prefer_ema=False), else model.safetensors; the architecture comes from its config.yaml;
- a .safetensors file: the architecture from a config.yaml beside it or one level above (a run's
  export/ folder), else from the preset given;
- an official Restormer .pth (`{'params': ...}`): the preset given, or the one its official file name
  implies (deraining.pth, real_denoising.pth, gaussian_color_denoising_blind.pth, ...).
Explicit architecture arguments always override what a config.yaml says.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from model import PRESETS, build_model, load_weights

from train import checkpoint as ckpt
from train.config import ARCH_FIELDS

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
    arch: dict[str, Any] = field(default_factory=dict)  # preset + overrides given to build_model

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.proj.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.model.output.weight.shape[0]

    @property
    def dual_pixel(self) -> bool:
        return bool(getattr(self.model, "dual_pixel_task", False))

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.arch.items() if k != "preset")
        params = sum(p.numel() for p in self.model.parameters())
        return f"{self.weights} (preset {self.arch['preset']}{', ' + extra if extra else ''}; {params / 1e6:.2f} M parameters)"


def _read_arch(config_path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ModelLoadError(f"{config_path}: unreadable ({err})") from err
    section = data.get("model") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ModelLoadError(f"{config_path}: has no 'model' section; pass --preset (and shape options) instead")
    return {k: section[k] for k in ARCH_FIELDS if section.get(k) is not None}


def resolve_weights(path: str | Path, prefer_ema: bool = True) -> tuple[Path, Path | None]:
    """-> (weights file, config.yaml describing its architecture or None)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder (give a run folder, a checkpoint folder, "
                             "a .safetensors file or an official .pth)")
    if path.is_dir():
        if (path / ckpt.STATE_FILE).is_file():  # a checkpoint folder
            ema = path / "ema.safetensors"
            weights = ema if prefer_ema and ema.is_file() else path / "model.safetensors"
            if not weights.is_file():
                raise ModelLoadError(f"{path}: checkpoint without model.safetensors (was it saved by DeepSpeed "
                                     "ZeRO-3? export the weights with the trainer first)")
            return weights, path / ckpt.CONFIG_FILE
        exported = path / "export" / "model.safetensors"
        if exported.is_file():
            return exported, path / ckpt.CONFIG_FILE if (path / ckpt.CONFIG_FILE).is_file() else None
        found = ckpt.complete_checkpoints(path / "checkpoints")
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
    """Finds the weights, works out the architecture, loads strictly, returns the model in eval mode.

    arch: preset and shape overrides (ARCH_FIELDS); they win over a config.yaml. A shape mismatch
    raises model.WeightsMismatchError, which names the keys that differ.
    """
    weights, config = resolve_weights(path, prefer_ema)
    resolved = _read_arch(config) if config is not None else {}
    resolved.update({k: v for k, v in (arch or {}).items() if v is not None})
    if "preset" not in resolved:
        guess = official_preset(weights)
        if guess is None:
            raise ModelLoadError(
                f"{weights}: no config.yaml beside it says which architecture it is; pass --preset "
                f"(one of {', '.join(PRESETS)}) and any shape options it was trained with")
        resolved["preset"] = guess
    if resolved["preset"] not in PRESETS:
        raise ModelLoadError(f"unknown preset {resolved['preset']!r}; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in resolved.items() if k != "preset"}
    model = build_model(resolved["preset"], **overrides)
    load_weights(model, weights)
    return LoadedModel(model.to(device).eval(), weights, resolved)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options every command uses to pick weights and architecture."""
    group = parser.add_argument_group("model")
    group.add_argument("-w", "--weights", required=True, metavar="PATH",
                       help="run folder, checkpoint folder (runs/NAME/checkpoints/step_*), .safetensors file "
                            "or official .pth")
    group.add_argument("--preset", choices=list(PRESETS), metavar="NAME",
                       help=f"architecture preset ({', '.join(PRESETS)}); needed for weights without a "
                            "config.yaml (official .pth files keeping their release names are recognised)")
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
