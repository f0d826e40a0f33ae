"""Exported weights: one writer for the trainer's export/ folder and for `python -m tools.export`.

An export folder holds
- model.safetensors: the weights to deploy (the EMA weights when the run kept an EMA);
- model_official.pth: `{'params': trained}`, plus `'params_ema'` when there is an EMA, as BasicSR
  writes them (official test scripts read 'params'; KAIR/SwinIR-style fine-tuning reads 'params_ema');
- config.yaml: the model section (preset and shape), so the folder loads with no flags.

Both weight files load in the restoration apps that read Restormer through spandrel (chaiNNer and
others): a network without refinement blocks is written with one identity block, which apps need to
recognise Restormer and which computes exactly the same function (model.with_identity_refinement;
model.infer_arch and model.load_weights drop it again). docs/export.md shows the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from model import save_official_pth, save_safetensors, with_identity_refinement

SAFETENSORS_FILE = "model.safetensors"
OFFICIAL_FILE = "model_official.pth"
CONFIG_FILE = "config.yaml"
WEIGHT_FORMATS = ("safetensors", "pth")


@dataclass(frozen=True)
class Weights:
    params: Mapping[str, torch.Tensor]  # the trained weights
    arch: dict[str, Any]  # preset + shape fields, as build_model takes them
    params_ema: Mapping[str, torch.Tensor] | None = None
    formats: tuple[str, ...] = field(default=WEIGHT_FORMATS)


def _deployable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 on the CPU, readable by apps (see the module's docstring)."""
    return with_identity_refinement({k: v.detach().float().cpu() for k, v in state.items()})


def write_export(out_dir: str | Path, weights: Weights) -> dict[str, Path]:
    """Writes the formats asked for and config.yaml into `out_dir`; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _deployable(weights.params)
    ema = _deployable(weights.params_ema) if weights.params_ema is not None else None
    written = {}
    if "safetensors" in weights.formats:
        written["safetensors"] = out_dir / SAFETENSORS_FILE
        save_safetensors(ema if ema is not None else params, written["safetensors"])
    if "pth" in weights.formats:
        written["pth"] = out_dir / OFFICIAL_FILE
        save_official_pth(params, written["pth"], params_ema=ema)
    written["config"] = out_dir / CONFIG_FILE
    written["config"].write_text(yaml.safe_dump({"model": dict(weights.arch)}, sort_keys=False), encoding="utf-8")
    return written
