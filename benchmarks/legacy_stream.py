"""The training stream as it was before epochs (commit e501f63), kept only so that
benchmarks/loader_speed.py can measure it beside the epoch stream in the same run.

Each (rank, worker) slot draws its own shards at random with replacement, through a shuffle buffer of
at most _SHUFFLE_SAMPLES decoded samples and _SHUFFLE_BYTES bytes per worker.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from data_shards.degrade import NoiseConfig, add_noise, mixup, paired_crop
from data_shards.geometry import dihedral
from data_shards.stream import _DECODERS, _member, _to_float, _to_tensor, resolve_source

_SHUFFLE_SAMPLES = 512
_SHUFFLE_BYTES = 64 << 20


def build_train_loader(source, *, patch_size: int, batch_size: int, seed: int, num_workers: int = 2,
                       noise: NoiseConfig | None = None, shuffle_bytes: int = _SHUFFLE_BYTES) -> DataLoader:
    """The old stream for one rank (rank 0 of 1): endless batches {'input', 'target', 'skipped'}."""
    urls, shard_index = resolve_source(source)
    dataset = _TrainStream(
        urls=urls, weights=[s.samples for s in shard_index.shards], inputs=shard_index.inputs, patch=patch_size,
        batch=batch_size, seed_parts=(seed, 0, 0, 0), rank=0, world_size=1, num_workers=num_workers,
        noise=noise, augment=True, use_mixup=False, strict=False, shuffle_bytes=shuffle_bytes,
    )
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      prefetch_factor=2 if num_workers > 0 else None)


class _TrainStream(IterableDataset):
    def __init__(self, *, urls, weights, inputs, patch, batch, seed_parts, rank, world_size, num_workers,
                 noise, augment, use_mixup, strict, shuffle_bytes):
        super().__init__()
        self.urls, self.weights, self.inputs = urls, weights, inputs
        self.patch, self.batch = patch, batch
        self.seed_parts, self.rank, self.world_size = seed_parts, rank, world_size
        self.num_workers = max(1, num_workers)
        self.noise, self.augment, self.use_mixup, self.strict = noise, augment, use_mixup, strict
        self.shuffle_bytes = shuffle_bytes

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed, rank, resume_count, stage = self.seed_parts
        rng = np.random.default_rng([seed, rank, worker, resume_count, stage])
        slot = self.rank * self.num_workers + worker
        plan = slot_plan(len(self.urls), slot, self.world_size * self.num_workers)
        log = _BadSampleLog(self.strict)
        reported = 0
        samples = _shuffled(self._decoded_samples(plan, rng, log), rng, self.shuffle_bytes)
        while True:
            inputs, targets = [], []
            for _ in range(self.batch):
                degraded, target = self._augment(next(samples), rng)
                inputs.append(degraded)
                targets.append(target)
            batch_in, batch_target = np.stack(inputs), np.stack(targets)
            if self.use_mixup:
                batch_in, batch_target = mixup(batch_in, batch_target, rng)
            yield {"input": _to_tensor(batch_in), "target": _to_tensor(batch_target),
                   "skipped": torch.tensor(log.count - reported)}
            reported = log.count

    def _augment(self, decoded, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _, target, degraded = decoded
        crops = [_to_float(crop) for crop in paired_crop([target, *degraded], self.patch, rng)]
        if self.augment:
            mode = int(rng.integers(8))
            crops = [dihedral(crop, mode) for crop in crops]
        target, degraded = crops[0], crops[1:]
        if not degraded:  # clean-only data: noise after the crop, as the official dataset does
            degraded = [add_noise(np.ascontiguousarray(target), self.noise, rng)]
        return np.concatenate(degraded, axis=2), target

    def _decoded_samples(self, plan: list[tuple[int, int, int]], rng: np.random.Generator,
                         log: _BadSampleLog) -> Iterator[tuple[str, np.ndarray, list[np.ndarray]]]:
        weights = np.array([self.weights[shard] for shard, _, _ in plan], dtype=np.float64)
        weights /= weights.sum()
        barren: set[int] = set()  # plan entries read since the last good sample: all-bad data must fail
        while True:
            pick = int(rng.choice(len(plan), p=weights))
            shard, modulus, remainder = plan[pick]
            good = False
            for position, sample in enumerate(_shard_samples(self.urls[shard], log)):
                if position % modulus == remainder:
                    decoded = _decode(sample, self.inputs, log, self.noise)
                    if decoded is not None:
                        good = True
                        yield decoded
            barren = set() if good else barren | {pick}
            if len(barren) == len(plan):
                raise RuntimeError(
                    f"no usable sample in shards {[self.urls[s] for s, _, _ in plan]} (this loader slot keeps "
                    f"every {modulus}th sample of them): see the warnings above, check the shards with "
                    "`restormer-verify`, or use fewer workers/ranks than samples per shard")


def slot_plan(num_shards: int, slot: int, slots: int) -> list[tuple[int, int, int]]:
    """(shard, modulus, remainder) triples: `slot` keeps sample j of `shard` when j % modulus == remainder.

    The slots' parts are disjoint and together cover every sample exactly once.
    """
    if num_shards >= slots:
        return [(shard, 1, 0) for shard in range(slot, num_shards, slots)]
    shard = slot % num_shards
    sharers = list(range(shard, slots, num_shards))
    return [(shard, len(sharers), sharers.index(slot))]


class BadSampleError(RuntimeError):
    pass


class _BadSampleLog:
    """webdataset exception handler: counts and names the shard, or raises in strict mode."""

    def __init__(self, strict: bool):
        self.strict, self.count = strict, 0
        self.warned: set[str] = set()  # a resampled bad shard is counted every time, named once

    def __call__(self, error: BaseException, url: str, key: str | None = None) -> bool:
        if isinstance(error, BadSampleError):  # an inner stage reported it; webdataset appended to its args
            raise BadSampleError(error.args[0]) from error.__cause__
        where = f"shard {url}" + (f", key {key}" if key else "")
        message = f"{where}: {type(error).__name__}: {error.args[0] if error.args else error}"
        if self.strict:
            raise BadSampleError(f"{message} (strict mode; check the shards with `restormer-verify`)") from error
        self.count += 1
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(f"skipped bad sample: {message}", stacklevel=2)
        return True


def _shard_samples(url: str, log: _BadSampleLog) -> Iterator[dict]:
    def handler(error: BaseException) -> bool:
        return log(error, url)

    streams = url_opener([{"url": url}], handler=handler)
    yield from group_by_keys(tar_file_expander(streams, handler=handler), handler=handler)


def _shuffled(samples: Iterator[tuple], rng: np.random.Generator, max_bytes: int) -> Iterator[tuple]:
    """Shuffle buffer of decoded samples, bounded by sample count and bytes."""
    buffer: list[tuple] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += _nbytes(sample)
        if len(buffer) >= _SHUFFLE_SAMPLES or held >= max_bytes:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            chosen = buffer.pop()
            held -= _nbytes(chosen)
            yield chosen


def _nbytes(decoded: tuple[str, np.ndarray, list[np.ndarray]]) -> int:
    return decoded[1].nbytes + sum(image.nbytes for image in decoded[2])


def _decode(sample: dict, inputs: tuple[str, ...] | None, log: _BadSampleLog,
            noise: NoiseConfig | None) -> tuple[str, np.ndarray, list[np.ndarray]] | None:
    """-> (key, target, [inputs]) as stored (uint8/uint16 (H, W, C)), or None after logging a bad sample."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    try:
        target = _member(sample, "target")
        names = inputs if inputs is not None else sorted(
            {k.split(".")[0] for k in sample if k.startswith("input") and k.split(".")[-1] in _DECODERS})
        degraded = [_member(sample, name) for name in names]
        for name, image in zip(names, degraded, strict=True):
            if image.shape != target.shape:
                raise ValueError(f"{name} is {image.shape} but target is {target.shape}")
    except Exception as err:  # any decode failure of untrusted bytes is a bad sample
        log(err, url, key)
        return None
    if degraded and noise is not None:
        raise ValueError(f"shard {url} holds degraded inputs ({', '.join(names)}): synthetic noise is "
                         "only for clean-only data; pass noise=None")
    if not degraded and noise is None:
        raise ValueError(f"shard {url} holds clean images only: pass noise=NoiseConfig(sigma=25) "
                         "(or sigma_range) so that inputs are synthesised")
    return key, target, degraded
