"""Exported weights: one writer for the trainer's export/ folder and for `python -m tools.export`.

An export folder holds
- model.safetensors: the weights to deploy (the EMA weights when the run kept an EMA);
- model_official.pth: `{'params': trained}`, plus `'params_ema'` when there is an EMA, as BasicSR
  writes them (official test scripts read 'params'; KAIR/SwinIR-style fine-tuning reads 'params_ema');
- config.yaml: the model section (preset and shape, or a network by import path: train/network.py),
  so the folder loads with no flags.

Both weight files load in the restoration apps that read Restormer through spandrel (chaiNNer and
others): a network without refinement blocks is written with one identity block, which apps need to
recognise Restormer and which computes exactly the same function (model.with_identity_refinement;
model.infer_arch and model.load_weights drop it again). docs/export.md shows the check.

A network of the user's own (model.arch) gets model.safetensors and config.yaml; the official .pth is
Restormer's format (BasicSR's scripts and spandrel build Restormer from it), so it is skipped, saying so.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from model import save_official_pth, save_safetensors, with_identity_refinement
from train.network import describe_network, is_restormer

SAFETENSORS_FILE = "model.safetensors"
OFFICIAL_FILE = "model_official.pth"
CONFIG_FILE = "config.yaml"
WEIGHT_FORMATS = ("safetensors", "pth")


@dataclass(frozen=True)
class Weights:
    params: Mapping[str, torch.Tensor]  # the trained weights
    arch: dict[str, Any]  # the network's record (train/network.py): preset + shape fields, or arch + kwargs
    params_ema: Mapping[str, torch.Tensor] | None = None
    formats: tuple[str, ...] = field(default=WEIGHT_FORMATS)


def _deployable(state: Mapping[str, torch.Tensor], restormer: bool) -> dict[str, torch.Tensor]:
    """fp32 on the CPU, readable by apps (see the module's docstring)."""
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    return with_identity_refinement(state) if restormer else state


def write_export(out_dir: str | Path, weights: Weights) -> dict[str, Path]:
    """Writes the formats asked for and config.yaml into `out_dir`; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    restormer = is_restormer(weights.arch)
    params = _deployable(weights.params, restormer)
    ema = _deployable(weights.params_ema, restormer) if weights.params_ema is not None else None
    written = {}
    if "safetensors" in weights.formats:
        written["safetensors"] = out_dir / SAFETENSORS_FILE
        save_safetensors(ema if ema is not None else params, written["safetensors"])
    if "pth" in weights.formats and not restormer:
        print(f"export: {OFFICIAL_FILE} skipped: the official .pth is Restormer's format and the network is "
              f"{describe_network(weights.arch)} (model.safetensors and ONNX work for any network)", file=sys.stderr,
              flush=True)
    elif "pth" in weights.formats:
        written["pth"] = out_dir / OFFICIAL_FILE
        save_official_pth(params, written["pth"], params_ema=ema)
    written["config"] = out_dir / CONFIG_FILE
    written["config"].write_text(yaml.safe_dump({"model": dict(weights.arch)}, sort_keys=False), encoding="utf-8")
    return written
