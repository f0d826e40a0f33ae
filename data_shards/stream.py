"""Stream packed shards into training (epochs, batched in the workers) and validation (whole images).

Sources: a split folder or its index.json (local or URL), or a shard pattern: local paths, brace
ranges ('train-{000000..000127}.tar'), 'pipe:CMD', URLs; several patterns joined by '::'. Shard
bytes are opened through data_shards.remote.open_shard. Training needs the index (sample counts and
byte offsets); validation reads shards front to back and works from a pattern alone.

Training (build_train_loader) is one endless sequence of positions 0, 1, 2, ... shared by every
rank and worker. Position p is sample order(p // N)[p % N] of the N training samples, where
order(e) is a permutation seeded by (seed, e) (data_shards.order: a seeded bijection, computed per
position, never held): epoch e is positions e*N .. (e+1)*N - 1, so every sample is drawn exactly
once per epoch. Epochs are concatenated, nothing is dropped: the last global
batch of an epoch is filled with the first samples of the next one. With G = world_size * batch,
micro-batch k of rank r (counting from the stream's `start`) holds positions
start + k*G + r*batch + [0, batch), and DataLoader worker w builds the batches k = w, w + W, ...
(the order in which the DataLoader hands them out). Every rank thus yields the same number of
batches, forever, whatever the shard count and sizes; a run resumed at position `start` on any
number of ranks or workers draws exactly the positions the interrupted run had not consumed. Each
batch carries 'next_position' (where the next global batch starts) and 'epoch'.

Crop, flip and noise of a sample come from a generator seeded by (seed, epoch, sample id): the same
sample at the same position gets the same augmentation on any topology. Mixup pairs the samples of a
batch with a generator seeded by (seed, the batch's first position).

Samples are read by seeking to their byte range (the index's records, memory mapped: shared by every
process of the node), one at a time, so a worker holds one batch of decoded samples plus at most
_OPEN_SHARDS open files; it never decodes a skipped sample. Nothing is held per sample.
Validation with an index reads each shard front to back, range by range.

Integrity: with an index, every sample is checked before it is decoded, on every read (local,
remote, cached or not, training or validation): its bytes must have the digest the index recorded
(data_shards.index.sample_digest; the tar headers are part of them, so the members' names and sizes
are proven too) and hold the key it recorded. Indexes without these records are refused, with the
command that adds them. A shard pattern without an index (validation only) is read unchecked.

Only .png, .npy (allow_pickle=False) and .json members are ever decoded: a shard is untrusted input.
Bad samples (corrupt image, missing member, truncated tar, bytes unlike the index's record) are
skipped with a warning that names the shard and key, or raise BadSampleError with strict=True. A
skipped training sample's place is taken by the next one in the epoch's order (which is thus drawn
twice that epoch), so batches keep their size. Each training batch carries 'skipped', a 0-d int64
tensor: the samples its worker skipped since its previous batch, so summing it over batches (and
ranks) gives the total.
"""

from __future__ import annotations

import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from data_shards.codec import decode_npy, decode_png
from data_shards.degrade import NoiseConfig, add_noise, key_seed, mixup, paired_crop
from data_shards.geometry import dihedral
from data_shards.index import ShardIndex, sample_digest, sample_members, tar_samples
from data_shards.order import EpochOrder
from data_shards.records import RecordTable
from data_shards.remote import RemoteSettings, ShardReadError, check_range, open_shard, printable, redact

__all__ = ["BadSampleError", "NoiseConfig", "StreamSettings", "build_train_loader", "build_val_loader",
           "global_batch_problem", "index_source", "noise_mismatch"]

_DECODERS = {"png": decode_png, "npy": decode_npy}
_SCALE = {np.dtype(np.uint8): np.float32(255), np.dtype(np.uint16): np.float32(65535)}
_OPEN_SHARDS = 8  # open file handles a worker keeps for seeking
_BAD_RUN = 64  # a position whose sample and this many replacements are all bad: the data is unusable, stop


class BadSampleError(RuntimeError):
    """A sample or shard that cannot be read (strict mode); the message names shard and key."""


@dataclass(frozen=True)
class StreamSettings:
    """Everything that shapes a training stream; two streams with equal settings are identical."""

    patch: int
    batch: int  # per rank, per micro-batch
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    start: int = 0  # global position (samples) of the first batch: epoch * N + samples into it
    noise: NoiseConfig | None = None  # for clean-only data
    augment: bool = True
    mixup: bool = False
    strict: bool = False
    remote: RemoteSettings = RemoteSettings()  # retries, timeouts and cache for remote shards

    def __post_init__(self):
        if self.patch < 1 or self.batch < 1:
            raise ValueError(f"patch={self.patch} and batch={self.batch} must be positive")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        if self.start < 0 or self.num_workers < 0:
            raise ValueError(f"start={self.start} and num_workers={self.num_workers} must be >= 0")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch


TRAIN_NOISE_SETTINGS = "(data.noise_sigma, e.g. 25, or data.noise_sigma_range, e.g. [0, 50])"


def noise_mismatch(paired: bool, noise: NoiseConfig | None, where: str,
                   settings: str = TRAIN_NOISE_SETTINGS) -> str | None:
    """The one rule tying data to synthetic noise: paired data must not get it, clean-only data needs
    it. `settings` names where the noise is set. Returns what is wrong (for the caller's error
    type), or None."""
    if paired and noise is not None:
        return (f"{where} holds degraded inputs but noise is set {settings}: synthetic noise is only for "
                "clean-only data; drop the noise setting")
    if not paired and noise is None:
        return f"{where} holds clean images only, so inputs must be synthesised: set a noise level {settings}"
    return None


def global_batch_problem(samples: int, world_size: int, batch: int) -> str | None:
    """The one rule tying the data's size to the job: one micro-batch of every process together must
    not hold a sample twice. Returns what is wrong (for the caller's error type), or None."""
    if samples < world_size * batch:
        return (f"{samples} samples cannot fill one global batch of {world_size * batch} ({world_size} process(es) "
                f"x batch {batch}) without repeating samples")
    return None


def build_train_loader(source, settings: StreamSettings, index: str | Path | None = None) -> DataLoader:
    """Endless batches {'input': (B, Cin, P, P), 'target': (B, C, P, P)} float32 in [0, 1], plus 0-d int64
    'skipped', 'next_position' and 'epoch' (see the module docstring).

    Cin = C for paired data and clean data with noise; for several named inputs (dual-pixel) they
    are concatenated along channels in the index's order (the --input order at pack time). Collation
    happens in the workers (batch_size=None on the DataLoader); num_workers=0 runs in-process.
    `index` gives the index file for a shard pattern (a folder or index.json source brings its own).
    """
    urls, shard_index = resolve_source(source, index, settings.remote)
    if shard_index is None:
        raise ValueError(f"{source}: a training stream needs the split's index.json (sample counts, byte "
                         "offsets, digests): give the split folder, its index.json, or index=")
    problem = noise_mismatch(bool(shard_index.inputs), settings.noise, str(source))
    if problem:
        raise ValueError(problem)
    catalog = Catalog.from_index(shard_index, urls, str(source))
    problem = global_batch_problem(catalog.size, settings.world_size, settings.batch)
    if problem:
        raise ValueError(f"{source}: {problem}; pack more data or lower the batch size")
    dataset = _TrainStream(catalog, shard_index.inputs, settings)
    workers = settings.num_workers
    # Pinned host memory makes the trainer's non_blocking copies to the GPU really asynchronous.
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if workers > 0 else None)


def build_val_loader(source, *, rank: int = 0, world_size: int = 1, noise: NoiseConfig | None = None,
                     max_images: int | None = None, strict: bool = False,
                     index: str | Path | None = None, remote: RemoteSettings | None = None) -> ValLoader:
    """Finite, deterministic whole images, one at a time: {'input': (1, Cin, H, W), 'target': (1, C, H, W),
    'key': str, 'bits': the target's stored bit depth (8 or 16)}. Rank r gets samples r, r + world_size,
    ... of the split's stored order (sorted by key), so the ranks together cover each of the first
    `max_images` images exactly once. Noise is seeded by the sample key (degrade.key_seed): identical across runs and
    world sizes."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    remote = remote or RemoteSettings()
    urls, shard_index = resolve_source(source, index, remote)
    if shard_index is not None:
        problem = noise_mismatch(bool(shard_index.inputs), noise, str(source))
        if problem:
            raise ValueError(problem)
    return ValLoader(urls, shard_index, rank, world_size, noise, max_images, strict, remote)


def index_source(source) -> bool:
    """Whether a data source names an index (a split folder or an index file, local or remote), not a
    shard pattern."""
    text = str(source)
    return text.endswith(".json") or Path(text).is_dir()


def resolve_source(source, index: str | Path | None = None,
                   remote: RemoteSettings | None = None) -> tuple[list[str], ShardIndex | None]:
    """Shard URLs and the index (None when only a pattern was given); a remote index is read with `remote`."""
    text = str(source)
    if index_source(text):
        shard_index = ShardIndex.load(text, remote)
        urls = shard_index.shard_urls
    else:
        shard_index = ShardIndex.load(index, remote) if index is not None else None
        urls = expand_urls(text)
        missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).exists()]
        if missing:
            raise FileNotFoundError(f"{source}: {len(missing)} shard(s) not found, e.g. {missing[0]}; give a "
                                    "split folder made by `restormer-pack`, its index.json, or a shard pattern")
    if not urls:
        raise ValueError(f"{source}: no shards (the index lists none; was every sample skipped at pack time?)")
    return urls, shard_index


@dataclass(frozen=True)
class Catalog:
    """Where every sample lives and what it must be: sample i is bytes start:end of urls[shard] (see
    `locate`), with the digest and key the records hold. The records are the index's memory-mapped
    table, shared with every process that maps it; the catalog adds per shard only its first id."""

    urls: tuple[str, ...]
    # Each shard's size and sha256, for open_shard: arrays, not Python objects per shard, so that none
    # of index.json's parsed objects outlives the load and pins the allocator's memory.
    sizes: np.ndarray  # int64 (shards,)
    sha256s: np.ndarray  # uint8 (shards, 32)
    records: RecordTable
    firsts: np.ndarray  # int64 (shards + 1,): shard s holds the sample ids firsts[s]:firsts[s + 1]

    @property
    def size(self) -> int:
        return self.records.samples

    def key(self, i: int) -> str:
        return self.records.key(i)

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, start, end) of sample i: bytes start:end of that shard."""
        shard = int(np.searchsorted(self.firsts, i, side="right")) - 1
        # A shard's offsets are its samples + 1: sample i's are at i + shard and the next.
        start, end = self.records.offsets[i + shard:i + shard + 2].tolist()
        return shard, start, end

    def shard(self, number: int) -> dict:
        """What open_shard needs to know of shard `number`: its size and sha256."""
        return {"size": int(self.sizes[number]), "sha256": self.sha256s[number].tobytes().hex()}

    def shard_samples(self, number: int) -> range:
        """The sample ids of shard `number`."""
        return range(int(self.firsts[number]), int(self.firsts[number + 1]))

    def sample(self, i: int, data: bytes) -> dict:
        """The members of sample i from the bytes read at its range ({'__key__': key, 'target.png': ...}),
        once they are proven to be the sample the index recorded; ValueError says how they are not."""
        if sample_digest(data) != self.records.digests[i].tobytes():
            try:
                held = f"; they hold key {sample_members(data).key}"
            except ValueError:
                held = "; they hold no whole sample"
            raise ValueError(f"these bytes are not the sample the index recorded (digest differs{held}): the shard "
                             "changed since it was packed; check it with `restormer-verify`, restore it or re-pack")
        found = sample_members(data)
        if found.key != self.key(i):
            raise ValueError(f"the sample holds key {found.key}, the index says {self.key(i)}: re-pack")
        return {"__key__": found.key, **found.members}

    @classmethod
    def from_index(cls, shard_index: ShardIndex, urls: list[str], where: str) -> Catalog:
        if len(urls) != len(shard_index.shards):
            raise ValueError(f"{where}: {len(urls)} shard URLs but the index lists {len(shard_index.shards)} shards")
        records = shard_index.record_table()  # refuses an index without records, with the fix
        shards = shard_index.shards
        return cls(urls=tuple(urls), sizes=np.array([s.bytes for s in shards], dtype=np.int64),
                   sha256s=np.frombuffer(bytes.fromhex("".join(s.sha256 for s in shards)), np.uint8).reshape(-1, 32),
                   records=records, firsts=np.concatenate([[0], np.cumsum(records.counts)]).astype(np.int64))


def batch_positions(settings: StreamSettings, k: int) -> range:
    """The global positions of this rank's micro-batch k (k = 0 is the first after settings.start)."""
    first = settings.start + k * settings.global_batch + settings.rank * settings.batch
    return range(first, first + settings.batch)


class ValLoader:
    """Iterable over this rank's validation images; re-iterable, and sized when an index is known."""

    def __init__(self, urls: list[str], shard_index: ShardIndex | None, rank: int, world_size: int,
                 noise: NoiseConfig | None, max_images: int | None, strict: bool, remote: RemoteSettings):
        self.urls, self.shard_index, self.remote = urls, shard_index, remote
        # With an index every sample is checked against it; refused here when it lacks the records.
        self.catalog = Catalog.from_index(shard_index, urls, shard_index.location) if shard_index else None
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
        if self.catalog is not None:
            samples = _indexed_samples(self.catalog, log, self.remote, self._takes, self.max_images)
        else:
            samples = _streamed_samples(self.urls, log, self.remote, self._takes, self.max_images)
        for sample in samples:
            decoded = _decode(sample, inputs, log, self.noise)
            self.skipped = log.count
            if decoded is None:
                continue
            key, target, degraded = decoded
            bits = target.dtype.itemsize * 8  # what the target was stored as: 8 or 16
            target, degraded = _to_float(target), [_to_float(image) for image in degraded]
            if not degraded:
                rng = np.random.default_rng(key_seed(key))
                degraded = [add_noise(target, self.noise, rng)]
            yield {"input": _to_tensor(np.concatenate(degraded, axis=2)[None]),
                   "target": _to_tensor(target[None]), "key": key, "bits": bits}
        self.skipped = log.count

    def _takes(self, position: int) -> bool:
        """Whether this rank takes the split's sample at `position` (ranks take turns)."""
        return position % self.world_size == self.rank


class _TrainStream(IterableDataset):
    def __init__(self, catalog: Catalog, inputs: tuple[str, ...], settings: StreamSettings):
        super().__init__()
        self.catalog, self.inputs, self.settings = catalog, inputs, settings
        self._orders: dict[int, EpochOrder] = {}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        s = self.settings
        reader = _ShardReader(self.catalog, self.settings.remote)
        log = _BadSampleLog(s.strict)
        reported = 0
        try:
            for k in range(worker, 2**62, workers):
                positions = batch_positions(s, k)
                pairs = [self._sample(position, sample_id, reader, log)
                         for position, sample_id in zip(positions, self._ids(positions), strict=True)]
                batch_in, batch_target = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
                if s.mixup:
                    batch_in, batch_target = mixup(batch_in, batch_target,
                                                   np.random.default_rng([s.seed, 1, positions[0]]))
                next_position = s.start + (k + 1) * s.global_batch
                yield {"input": _to_tensor(batch_in), "target": _to_tensor(batch_target),
                       "skipped": torch.tensor(log.count - reported),
                       "next_position": torch.tensor(next_position),
                       "epoch": torch.tensor((next_position - 1) // self.catalog.size)}
                reported = log.count
        finally:
            reader.close()

    def _order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = EpochOrder(self.settings.seed, epoch, self.catalog.size)
        return self._orders[epoch]

    def _ids(self, positions: range) -> list[int]:
        """The sample ids at a batch's positions, looked up together (one vectorised pass per epoch)."""
        epochs, indices = np.divmod(np.asarray(positions, dtype=np.int64), self.catalog.size)
        ids = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            ids[here] = self._order(epoch)[indices[here]]
        return ids.tolist()

    def _sample(self, position: int, sample_id: int, reader: _ShardReader, log: _BadSampleLog
                ) -> tuple[np.ndarray, np.ndarray]:
        """(input, target) crops for one position, whose sample is `sample_id`; a bad sample is replaced by
        the next in the order."""
        size = self.catalog.size
        epoch, index = divmod(position, size)
        for attempt in range(min(size, _BAD_RUN)):
            if attempt:
                sample_id = int(self._order(epoch)[(index + attempt) % size])
            decoded = _decode(self._read(sample_id, reader, log), self.inputs, log, self.settings.noise)
            if decoded is not None:
                rng = np.random.default_rng([self.settings.seed, 0, epoch, sample_id, attempt])
                return self._augment(decoded, rng)
        raise RuntimeError(
            f"no usable sample: {min(size, _BAD_RUN)} samples in a row from position {position} were bad (see the "
            "warnings above); check the shards with `restormer-verify`")

    def _read(self, sample_id: int, reader: _ShardReader, log: _BadSampleLog) -> dict:
        """The members of one sample as bytes plus __key__ and __url__; no __key__ after logging an error."""
        c = self.catalog
        shard, start, end = c.locate(sample_id)
        try:
            data = _whole_range(reader.read(shard, start, end - start), start, end)
        except (OSError, ValueError) as err:
            log(err, c.urls[shard], detail=f"bytes {start}:{end}")
            return {"__url__": c.urls[shard]}
        return _proven(c, sample_id, data, log)

    def _augment(self, decoded, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _, target, degraded = decoded
        crops = [_to_float(crop) for crop in paired_crop([target, *degraded], self.settings.patch, rng)]
        if self.settings.augment:
            mode = int(rng.integers(8))
            crops = [dihedral(crop, mode) for crop in crops]
        target, degraded = crops[0], crops[1:]
        if not degraded:  # clean-only data: noise after the crop, as the official dataset does
            degraded = [add_noise(np.ascontiguousarray(target), self.settings.noise, rng)]
        return np.concatenate(degraded, axis=2), target


class _ShardReader:
    """Reads byte ranges of shards; keeps up to _OPEN_SHARDS seekable handles open (least recently used out)."""

    def __init__(self, catalog: Catalog, remote: RemoteSettings):
        self.catalog, self.remote = catalog, remote
        self.handles: OrderedDict[int, object] = OrderedDict()

    def read(self, shard: int, start: int, length: int) -> bytes:
        url, known = self.catalog.urls[shard], self.catalog.shard(shard)
        check_range(url, start, length, known["size"])  # an open handle obeys the bounds that opening checks
        handle = self.handles.pop(shard, None)
        reused = handle is not None
        if not reused:
            handle = open_shard(url, start, length=length, **known, settings=self.remote)
        try:
            if reused:
                handle.seek(start)
            data = handle.read(length)
        except BaseException:
            handle.close()
            raise
        if handle.seekable():
            self.handles[shard] = handle
            if len(self.handles) > _OPEN_SHARDS:
                self.handles.popitem(last=False)[1].close()
        else:
            handle.close()
        return data

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()


def _whole_range(data: bytes, start: int, end: int) -> bytes:
    """The bytes read for range start:end, refused when the shard ended before the range did."""
    if len(data) != end - start:
        raise ValueError(f"the shard ends at byte {start + len(data)}, the index says {end} (truncated?)")
    return data


def _proven(catalog: Catalog, sample_id: int, data: bytes, log: _BadSampleLog) -> dict:
    """Catalog.sample (the bytes proven against the records) with __url__ added; no __key__ after
    logging bytes unlike the index's record."""
    shard, start, end = catalog.locate(sample_id)
    try:
        return {**catalog.sample(sample_id, data), "__url__": catalog.urls[shard]}
    except ValueError as err:
        log(err, catalog.urls[shard], catalog.key(sample_id), detail=f"bytes {start}:{end}")
        return {"__url__": catalog.urls[shard]}


def _indexed_samples(catalog: Catalog, log: _BadSampleLog, remote: RemoteSettings, takes, stop: int | None
                     ) -> Iterator[dict]:
    """The samples of the split in stored order whose ids this rank `takes`, up to id `stop`, each checked
    against the index. Each shard is read front to back in one stream; a read error ends the shard."""
    for number, url in enumerate(catalog.urls):
        ids = catalog.shard_samples(number)
        if stop is not None and ids.start >= stop:
            return
        if not ids:
            continue
        first, last = catalog.locate(ids.start)[1], catalog.locate(ids.stop - 1)[2]
        try:
            with open_shard(url, first, length=last - first, **catalog.shard(number), settings=remote) as stream:
                for i in ids:
                    if stop is not None and i >= stop:
                        return
                    _, start, end = catalog.locate(i)
                    data = _whole_range(stream.read(end - start), start, end)
                    if takes(i):
                        yield _proven(catalog, i, data, log)
        except (OSError, ValueError) as err:
            log(err, url, detail=f"bytes {first}:{last}")


def _streamed_samples(urls: list[str], log: _BadSampleLog, remote: RemoteSettings, takes, stop: int | None
                      ) -> Iterator[dict]:
    """Without an index: the samples of each shard as its tar groups them, unchecked, numbered in the
    order they come; those whose number this rank `takes`, up to `stop`."""
    position = 0
    for url in urls:
        for sample in _tar_samples(url, log, remote):
            if stop is not None and position >= stop:
                return
            position += 1
            if takes(position - 1):
                yield sample


def _tar_samples(url: str, log: _BadSampleLog, remote: RemoteSettings) -> Iterator[dict]:
    """The samples of one shard, front to back. A read error ends the shard."""
    last = None
    try:
        with open_shard(url, settings=remote) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for sample in tar_samples(tar):
                last = sample.key
                yield {"__key__": sample.key, "__url__": url, **sample.members}
    except (OSError, EOFError, tarfile.TarError) as err:
        log(err, url, detail=f"after key {last}" if last else "")


class _BadSampleLog:
    """Counts bad samples and warns once per message, naming shard and key; raises in strict mode."""

    def __init__(self, strict: bool):
        self.strict, self.count = strict, 0
        # A bad sample drawn every epoch is counted every time, named once; an unreadable shard (no
        # key) is named once per kind of error, not once per sample read from it.
        self.warned: set[tuple] = set()

    def __call__(self, error: BaseException, url: str, key: str | None = None, detail: str = "") -> None:
        where = f"shard {redact(url)}" + (f" {detail}" if detail else "") + (f", key {key}" if key else "")
        # A ShardReadError names the shard itself (redacted); the rest of it is the cause.
        cause = error.reason if isinstance(error, ShardReadError) else error.args[0] if error.args else error
        # Keys and causes come from untrusted bytes (a tar member's name, a decoder's complaint): one line,
        # no terminal escapes.
        message = printable(f"{where}: {type(error).__name__}: {cause}")
        if self.strict:
            raise BadSampleError(f"{message} (strict mode; check the shards with `restormer-verify`)") from error
        self.count += 1
        topic = (url, key, type(error).__name__) if key is None else message
        if topic not in self.warned:
            self.warned.add(topic)
            warnings.warn(f"skipped bad sample: {message}", stacklevel=2)


def _decode(sample: dict, inputs: tuple[str, ...] | None, log: _BadSampleLog,
            noise: NoiseConfig | None) -> tuple[str, np.ndarray, list[np.ndarray]] | None:
    """-> (key, target, [inputs]) as stored (uint8/uint16 (H, W, C)), or None after logging a bad sample."""
    if "__key__" not in sample:
        return None  # unreadable bytes, logged by the reader
    key, url = sample["__key__"], sample.get("__url__", "?")
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
    problem = noise_mismatch(bool(degraded), noise, f"shard {url}")
    if problem:
        raise ValueError(problem)
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
