"""The run's network: Restormer (model.preset and shape fields), or a class of the user's given by
import path (model.arch=package.module:Class with model.kwargs).

Everything that builds, counts, names or compares the network goes through a *record*: the dict a
run's export/config.yaml holds under `model`, and the form the memory plan's calibration step carries
(plain data: it travels to a fresh process as JSON).
- Restormer: {"preset": ..., **the shape fields set}, model.build_model's arguments;
- a user's network: {"arch": "package.module:Class", "kwargs": {...}, "channels": [in, out]}.
network_record() makes one from a ModelConfig or from any saved config's model section (a run's or
checkpoint's full config.yaml holds arch, kwargs and channels beside Restormer's null fields).
build_network() is the one builder: the run's starting point (initial_network), the calibration
step's and ZeRO-3's full copy all build through it.

A user's network gets every part of the framework that does not depend on Restormer's shape. What
does: the official .pth (train/exporting.py skips it, saying so) and the spandrel check
(benchmarks/spandrel_exports.py skips such exports), reading the architecture off the weights
(model.infer_arch: the tools read config.yaml instead), and lean activations (model.set_activations
takes over official Restormer blocks only; anything else runs plain autograd). docs/custom_networks.md shows a worked example.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from model import ARCH_FIELDS, PRESETS, build_model, load_weights
from train.config import Config, ConfigError, config_from_dict, read_config_file

# A module path (dotted identifiers), a colon, an attribute path: what model.arch takes.
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# model.channels when null: an RGB image in, an RGB image out.
DEFAULT_CHANNELS = (3, 3)


class NetworkImportError(ValueError):
    """A model.arch that cannot be imported or built; one line naming the path and how to fix it."""


def is_restormer(record: Mapping[str, Any]) -> bool:
    return record.get("arch") is None


def network_record(model: Any) -> dict[str, Any]:
    """The record of a ModelConfig, or of a saved config's model section (a mapping)."""
    fields = model if isinstance(model, Mapping) else vars(model)
    if fields.get("arch") is None:
        shape = {k: fields[k] for k in ARCH_FIELDS if k != "preset" and fields.get(k) is not None}
        return {"preset": fields.get("preset") or "default", **shape}
    return {"arch": fields["arch"], "kwargs": dict(fields.get("kwargs") or {}),
            "channels": list(fields.get("channels") or DEFAULT_CHANNELS)}


def record_channels(record: Mapping[str, Any]) -> tuple[int, int]:
    """(input, output) image channels of the network a record describes."""
    if is_restormer(record):
        preset = PRESETS[record["preset"]]
        return preset["inp_channels"], preset["out_channels"]
    first, second = record["channels"]
    return int(first), int(second)


def describe_network(record: Mapping[str, Any]) -> str:
    """A network by import path as a call, for logs and messages: my_nets:TinyNet(width=8)."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in record["kwargs"].items())
    return f"{record['arch']}({kwargs})"


def resolve(path: str) -> Any:
    """The class or function model.arch names; NetworkImportError says why not and how to fix it."""
    if not isinstance(path, str) or not _IMPORT_PATH.match(path):
        raise NetworkImportError(f"model.arch={path!r}: give package.module:Class (a module path, a colon, the class "
                                 "or function), e.g. model.arch=my_nets:TinyNet")
    module_name, attribute = path.split(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise NetworkImportError(
                f"model.arch={path}: no module named {err.name!r} on the Python path; put the folder that holds "
                f"{module_name.replace('.', '/')}.py on PYTHONPATH as an absolute path (e.g. PYTHONPATH=$PWD, run "
                "where the file is), or pip install its package") from None
        raise NetworkImportError(f"model.arch={path}: importing {module_name} failed: it needs {err.name!r}, which "
                                 "is not installed") from None
    except Exception as err:  # noqa: BLE001 (the user's module may raise anything: said in one line)
        raise NetworkImportError(f"model.arch={path}: importing {module_name} failed: {_first_line(err)}") from None
    for name in attribute.split("."):
        if not hasattr(target, name):
            found = [k for k, v in vars(target).items() if inspect.isclass(v) and issubclass(v, torch.nn.Module)
                     and getattr(v, "__module__", None) == getattr(target, "__name__", None)]
            where = getattr(target, "__file__", None) or module_name
            raise NetworkImportError(f"model.arch={path}: {where} has no {name!r}"
                                     + (f"; its nn.Module classes: {', '.join(found)}" if found else ""))
        target = getattr(target, name)
    if inspect.isclass(target) and not issubclass(target, torch.nn.Module):
        raise NetworkImportError(f"model.arch={path}: {target.__name__} is a class but not a torch.nn.Module; name "
                                 "the network's class (or a function returning the network)")
    if not callable(target):
        raise NetworkImportError(f"model.arch={path}: {attribute} is {_shown(target)}, not an nn.Module class or a "
                                 "function returning one")
    return target


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip() if lines else ''}"


def _construct(record: Mapping[str, Any]) -> torch.nn.Module:
    factory = resolve(record["arch"])
    try:
        net = factory(**record["kwargs"])
    except TypeError as err:
        raise NetworkImportError(f"model.kwargs {dict(record['kwargs'])} do not fit {record['arch']}: "
                                 f"{_first_line(err)}; set model.kwargs to its constructor's arguments") from None
    except Exception as err:  # noqa: BLE001 (the user's constructor may raise anything)
        raise NetworkImportError(f"model.arch={record['arch']} with model.kwargs {dict(record['kwargs'])} cannot be "
                                 f"built: {_first_line(err)}") from None
    if not isinstance(net, torch.nn.Module):
        raise NetworkImportError(f"model.arch={record['arch']} returned {_shown(net)}, not a torch.nn.Module")
    return net


def build_network(record: Mapping[str, Any]) -> torch.nn.Module:
    """The network a record describes, freshly initialised (under the caller's torch seed and device)."""
    if is_restormer(record):
        return build_model(**record)
    return _construct(record)


def _on_meta(record: Mapping[str, Any]) -> torch.nn.Module:
    """The network without memory or initialisation, when its constructor allows (one that needs real
    tensors, calling .item() say, is built for real)."""
    try:
        with torch.device("meta"):
            return build_network(record)
    except NetworkImportError:
        raise
    except Exception:  # noqa: BLE001 (not buildable on the meta device: build it as training will)
        return build_network(record)


def parameter_count(record: Mapping[str, Any]) -> int:
    return sum(p.numel() for p in _on_meta(record).parameters())


def import_problem(arch: str, kwargs: Mapping[str, Any]) -> str | None:
    """Why model.arch with model.kwargs would not build a network here, or None (the config's check)."""
    try:
        net = _on_meta({"arch": arch, "kwargs": kwargs, "channels": list(DEFAULT_CHANNELS)})
    except NetworkImportError as err:
        return str(err)
    if not any(p.requires_grad for p in net.parameters()):
        return f"model.arch={arch}: the network has no trainable parameters"
    return None


def initial_network(cfg: Config) -> torch.nn.Module:
    """The network a run starts from: built (the config's check built this network already, on the
    meta device), with model.init_weights loaded when set."""
    net = build_network(network_record(cfg.model))
    if cfg.model.init_weights:
        try:
            load_weights(net, cfg.model.init_weights)
        except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing, refused pickle, wrong shapes
            raise ConfigError(f"model.init_weights={cfg.model.init_weights}: {err}") from err
    return net


def network_changes(cfg: Config, config_file: Path) -> list[str]:
    """How the network of a checkpoint's config.yaml differs from `cfg`'s, as 'model.key: checkpoint X
    vs now Y'; empty when it is the same network (class, arguments and channels, or Restormer's shape)."""
    saved = config_from_dict(read_config_file(config_file), str(config_file))
    old, new = network_record(saved.model), network_record(cfg.model)
    keys = list(dict.fromkeys([*old, *new]))
    return [f"model.{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]

