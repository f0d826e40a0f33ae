"""Stream packed shards into training (endless, batched in the workers) and validation (whole images).

Sources: a split folder or its index.json (local or URL), or a shard pattern: local paths, brace
ranges ('train-{000000..000127}.tar'), 'pipe:CMD' (e.g. 'pipe:aws s3 cp s3://b/train-000000.tar -'),
http(s) URLs; several patterns joined by '::'.

Training (build_train_loader) splits the data into one disjoint part per (rank, worker) "slot":
with at least as many shards as slots each slot owns whole shards, otherwise slots sharing a shard
keep every m-th sample of it (they read the whole shard but decode only their part). Each slot then
draws its shards at random with replacement, forever, so no rank ever runs out before the others
(a stopped rank hangs DDP). All randomness is seeded from (seed, rank, worker, resume_count, stage):
identical arguments give identical batches, and a resumed run (resume_count + 1) draws a fresh stream.

Only .png, .npy (allow_pickle=False) and .json members are ever decoded: a shard is untrusted input,
and webdataset's default decoders would unpickle .pyd/.pickle members.

Bad samples (corrupt image, missing member, truncated tar) are skipped with a warning that names the
shard and key, or raise BadSampleError with strict=True. Each training batch carries 'skipped', a
0-d int64 tensor: the samples its worker skipped since its previous batch, so summing it over batches
(and ranks) gives the total.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from data_shards.codec import decode_npy, decode_png
from data_shards.degrade import NoiseConfig, add_noise, mixup, paired_crop
from data_shards.geometry import dihedral
from data_shards.index import ShardIndex

__all__ = ["BadSampleError", "NoiseConfig", "build_train_loader", "build_val_loader"]

_DECODERS = {"png": decode_png, "npy": decode_npy}
_SCALE = {np.dtype(np.uint8): np.float32(255), np.dtype(np.uint16): np.float32(65535)}
_SHUFFLE_SAMPLES = 512  # shuffle buffer: at most this many raw samples ...
_SHUFFLE_BYTES = 64 << 20  # ... and this many bytes, per worker


class BadSampleError(RuntimeError):
    """A sample or shard that cannot be read (strict mode); the message names shard and key."""


def build_train_loader(source, *, patch_size: int, batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1, num_workers: int = 2, resume_count: int = 0, stage: int = 0,
                       noise: NoiseConfig | None = None, augment: bool = True, mixup: bool = False,
                       strict: bool = False, index: str | Path | None = None) -> DataLoader:
    """Endless batches {'input': (B, Cin, P, P), 'target': (B, C, P, P), 'skipped': ()} float32 in [0, 1].

    Cin = C for paired data and clean data with noise; for several named inputs (dual-pixel) they
    are concatenated along channels in the index's order (the --input order at pack time). Collation
    happens in the workers (batch_size=None on the DataLoader); num_workers=0 runs in-process.
    `index` gives the index file for a shard pattern (a folder or index.json source brings its own).
    """
    if patch_size < 1 or batch_size < 1:
        raise ValueError(f"patch_size={patch_size} and batch_size={batch_size} must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    urls, shard_index = resolve_source(source, index)
    _check_noise(shard_index, noise, source)
    dataset = _TrainStream(
        urls=urls, weights=[s.samples for s in shard_index.shards] if shard_index else [1] * len(urls),
        inputs=shard_index.inputs if shard_index else None, patch=patch_size, batch=batch_size,
        seed_parts=(seed, rank, resume_count, stage), rank=rank, world_size=world_size,
        num_workers=num_workers, noise=noise, augment=augment, use_mixup=mixup, strict=strict,
    )
    # Pinned host memory makes the trainer's non_blocking copies to the GPU really asynchronous.
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if num_workers > 0 else None)


def build_val_loader(source, *, rank: int = 0, world_size: int = 1, noise: NoiseConfig | None = None,
                     max_images: int | None = None, strict: bool = False,
                     index: str | Path | None = None) -> ValLoader:
    """Finite, deterministic whole images, one at a time: {'input': (1, Cin, H, W), 'target': (1, C, H, W),
    'key': str}. Rank r gets samples r, r + world_size, ... of the split's stored order (sorted by key),
    so the ranks together cover each of the first `max_images` images exactly once. Noise is seeded by
    the sample key: identical across runs and world sizes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    urls, shard_index = resolve_source(source, index)
    _check_noise(shard_index, noise, source)
    return ValLoader(urls, shard_index, rank, world_size, noise, max_images, strict)


def resolve_source(source, index: str | Path | None = None) -> tuple[list[str], ShardIndex | None]:
    """Shard URLs and the index (None when only a pattern was given)."""
    text = str(source)
    local = Path(text)
    if local.is_dir() or text.endswith(".json"):
        shard_index = ShardIndex.load(text)
        urls = shard_index.shard_urls
    else:
        shard_index = ShardIndex.load(index) if index is not None else None
        urls = expand_urls(text)
        missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).exists()]
        if missing:
            raise FileNotFoundError(f"{source}: {len(missing)} shard(s) not found, e.g. {missing[0]}; give a "
                                    "split folder made by `restormer-pack`, its index.json, or a shard pattern")
    if not urls:
        raise ValueError(f"{source}: no shards (the index lists none; was every sample skipped at pack time?)")
    return urls, shard_index


class ValLoader:
    """Iterable over this rank's validation images; re-iterable, and sized when an index is known."""

    def __init__(self, urls: list[str], shard_index: ShardIndex | None, rank: int, world_size: int,
                 noise: NoiseConfig | None, max_images: int | None, strict: bool):
        self.urls, self.shard_index = urls, shard_index
        self.rank, self.world_size = rank, world_size
        self.noise, self.max_images, self.strict = noise, max_images, strict
        self.skipped = 0

    def __len__(self) -> int:
        if self.shard_index is None:
            raise TypeError("the number of validation images is unknown without an index")
        total = self.shard_index.total_samples
        total = min(total, self.max_images) if self.max_images is not None else total
        return len(range(self.rank, total, self.world_size))

    def __iter__(self) -> Iterator[dict]:
        log = _BadSampleLog(self.strict)
        inputs = self.shard_index.inputs if self.shard_index else None
        position = 0
        for url in self.urls:
            for sample in _shard_samples(url, log):
                if self.max_images is not None and position >= self.max_images:
                    return
                mine = position % self.world_size == self.rank
                position += 1
                if not mine:
                    continue
                decoded = _decode(sample, inputs, log, self.noise)
                self.skipped = log.count
                if decoded is None:
                    continue
                key, target, degraded = decoded
                target, degraded = _to_float(target), [_to_float(image) for image in degraded]
                if not degraded:
                    rng = np.random.default_rng(_key_seed(key))
                    degraded = [add_noise(target, self.noise, rng)]
                yield {"input": _to_tensor(np.concatenate(degraded, axis=2)[None]),
                       "target": _to_tensor(target[None]), "key": key}
            self.skipped = log.count


class _TrainStream(IterableDataset):
    def __init__(self, *, urls, weights, inputs, patch, batch, seed_parts, rank, world_size, num_workers,
                 noise, augment, use_mixup, strict):
        super().__init__()
        self.urls, self.weights, self.inputs = urls, weights, inputs
        self.patch, self.batch = patch, batch
        self.seed_parts, self.rank, self.world_size = seed_parts, rank, world_size
        self.num_workers = max(1, num_workers)
        self.noise, self.augment, self.use_mixup, self.strict = noise, augment, use_mixup, strict

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed, rank, resume_count, stage = self.seed_parts
        rng = np.random.default_rng([seed, rank, worker, resume_count, stage])
        slot = self.rank * self.num_workers + worker
        plan = slot_plan(len(self.urls), slot, self.world_size * self.num_workers)
        log = _BadSampleLog(self.strict)
        reported = 0
        samples = _shuffled(self._decoded_samples(plan, rng, log), rng)
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


def _shuffled(samples: Iterator[tuple], rng: np.random.Generator) -> Iterator[tuple]:
    """Shuffle buffer of decoded samples, bounded by sample count and bytes."""
    buffer: list[tuple] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += _nbytes(sample)
        if len(buffer) >= _SHUFFLE_SAMPLES or held >= _SHUFFLE_BYTES:
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


def _member(sample: dict, name: str) -> np.ndarray:
    for extension, decoder in _DECODERS.items():
        data = sample.get(f"{name}.{extension}")
        if data is not None:
            array = decoder(data)
            if array.ndim != 3 or array.dtype not in _SCALE or array.shape[2] not in (1, 3):
                raise ValueError(f"{name}.{extension}: unsupported array {array.shape} {array.dtype}")
            return array
    raise ValueError(f"no {name}.png or {name}.npy member (has {sorted(k for k in sample if not k.startswith('__'))})")


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / _SCALE[image.dtype]


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) -> contiguous (B, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _check_noise(shard_index: ShardIndex | None, noise: NoiseConfig | None, source) -> None:
    if shard_index is None:
        return  # checked per sample instead
    if shard_index.inputs and noise is not None:
        raise ValueError(f"{source} is paired data ({', '.join(shard_index.inputs)}): synthetic noise is only "
                         "for clean-only data; pass noise=None")
    if not shard_index.inputs and noise is None:
        raise ValueError(f"{source} holds clean images only: pass noise=NoiseConfig(sigma=25) (or sigma_range)")
