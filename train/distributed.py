"""Collectives over a launch's ranks, through its accelerate.Accelerator. Each is one call that every
rank makes, in the same order: a rank that skipped one would leave the others waiting in it."""

from __future__ import annotations

from typing import Any

import torch


def _figures(acc, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, device=acc.device, dtype=torch.float64)


def reduce_max(acc, value: float) -> float:
    return acc.reduce(_figures(acc, [value]), "max").item()


def smallest(acc, value: float) -> float:
    return -reduce_max(acc, -value)  # accelerate reduces by sum, mean or max only


def any_rank(acc, flag: bool) -> bool:
    """True on every rank when `flag` is True on any: how one rank's failure stops them all."""
    if acc.num_processes == 1:
        return flag
    return bool(reduce_max(acc, float(flag)))


def reduce_named(acc, values: dict[str, float], op: str) -> dict[str, float]:
    """Named figures reduced over the ranks in one collective (every rank passes the same names)."""
    return dict(zip(values, acc.reduce(_figures(acc, list(values.values())), op).tolist()))


def gather_named(acc, values: dict[str, float]) -> dict[str, torch.Tensor]:
    """Named figures of every rank in one collective: name -> (world_size,) tensor on the CPU."""
    gathered = acc.gather(_figures(acc, [list(values.values())])).cpu()
    return {name: gathered[:, i] for i, name in enumerate(values)}


def from_main(acc, value: Any) -> Any:
    """The main process's `value` (any picklable object) on every rank."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def gather_objects(acc, value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if acc.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])
