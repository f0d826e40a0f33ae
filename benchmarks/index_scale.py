"""What a split's index costs a training process and a node, from 10^5 to 10^8 samples.

    python benchmarks/index_scale.py --samples 100000 1000000 10000000 100000000 [--json PATH]
        [--old-code /path/to/a/checkout/of/the/old/code] [--work DIR]

Builds synthetic indexes shaped like a real pack's (CUrban100-style tiles: 1000 samples per shard,
4-20 KiB per sample, 20-character keys, random digests) without writing any shard. Then, each in a
fresh process that has already imported torch and the stream (the baseline): loads the index,
builds the stream's Catalog and looks up the first batch's sample ids, as every rank does at startup.
Per size it prints and writes (with --json, a list of records):

- load_s: wall time of that startup;
- peak_rss_mib, rss_after_mib: peak and after-load RSS over the baseline (the peak is reset after
  the imports through /proc/self/clear_refs);
- shared_mib_per_node: what the index costs a node of 8 ranks x 4 loader workers: the records file
  once (page cache, shared by every process that maps it) + 8 x a rank's private growth + 32 x a
  forked worker's (measured: a worker looks up a batch's ids, which the old design does by
  materialising the epoch's permutation);
- remote_fetched_mib: bytes a loopback http server sends when 8 local ranks load the index from it
  at once (the new design through the node's copy).

With --old-code, the same for the design before index format 2 (records as JSON lists in
index.json, a materialised permutation), up to where it refuses (MAX_INDEX_BYTES) or --old-max.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import blake3
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_shards.records import MAGIC, layout  # noqa: E402 (after the path)
PER_SHARD = 1000
RANKS, WORKERS = 8, 4
CHUNK_SHARDS = 1000  # shards generated at a time: 10^6 samples
MIB = 1 << 20


# ------------------------------------------------------------------ synthetic indexes


def _chunk(first_shard: int, shards: int, seed: int):
    """Samples of shards first_shard .. + shards: per shard its offsets, the digests, the keys."""
    rng = np.random.default_rng([seed, first_shard])
    sizes = rng.integers(8, 41, size=(shards, PER_SHARD), dtype=np.int64) * 512
    offsets = np.concatenate([np.zeros((shards, 1), np.int64), np.cumsum(sizes, axis=1)], axis=1)
    digests = rng.integers(0, 256, size=(shards * PER_SHARD, 16), dtype=np.uint8)
    ids = np.arange(first_shard * PER_SHARD, (first_shard + shards) * PER_SHARD, dtype=np.int64)
    return offsets, digests, _keys(ids)


def _keys(ids: np.ndarray) -> np.ndarray:
    """(n, 20) uint8: 'img0001234-0256x1792', a tile of image id // 64 (an 8 x 8 grid of 256 px)."""
    image, tile = ids // 64, ids % 64

    def digits(values, count):
        return np.stack([(values // 10 ** (count - 1 - i)) % 10 + ord("0") for i in range(count)], axis=1)

    parts = [np.frombuffer(b"img", np.uint8)[None].repeat(len(ids), 0), digits(image, 7),
             np.full((len(ids), 1), ord("-")), digits(tile // 8 * 256, 4), np.full((len(ids), 1), ord("x")),
             digits(tile % 8 * 256, 4)]
    return np.concatenate(parts, axis=1).astype(np.uint8)


def _description(samples: int, shard_entries: list[dict]) -> dict:
    return {"split": "train", "shards": shard_entries, "total_samples": samples, "inputs": [], "channels": 3,
            "bit_depths": [8], "format": "png", "min_size": [256, 256], "median_size": [256, 256],
            "max_size": [256, 256], "source_images": samples // 64, "tile": 256, "stride": 256,
            "command": "benchmarks/index_scale.py", "version": "synthetic"}


def _shard_entry(number: int, offsets: np.ndarray) -> dict:
    return {"name": f"train-{number:06d}.tar", "samples": PER_SHARD, "bytes": int(offsets[-1]) + 1024,
            "sha256": f"{number:064x}"}


def build_new(folder: Path, samples: int) -> None:
    """index.json (format 2) and index.records, a chunk of shards at a time: each chunk's pieces go to
    their sections' places (never all in memory), then the file is hashed front to back."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = samples // PER_SHARD
    sections = layout(samples, shards, 20 * samples)
    entries = []
    with open(folder / "index.records", "wb") as out:
        out.write(MAGIC + np.array([samples, shards, 20 * samples], "<u8").tobytes())
        for first in range(0, shards, CHUNK_SHARDS):
            count = min(CHUNK_SHARDS, shards - first)
            offsets, digests, keys = _chunk(first, count, seed=0)
            entries += [_shard_entry(first + i, offsets[i]) for i in range(count)]
            ends = (np.arange(1, len(keys) + 1, dtype=np.int64) + first * PER_SHARD) * 20
            done = first * PER_SHARD
            for name, data, at in (("offsets", offsets, 8 * (done + first)), ("digests", digests, 16 * done),
                                   ("key_end", ends, 8 * done), ("keys", keys, 20 * done)):
                os.pwrite(out.fileno(), np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes(),
                          sections[name][0] + at)
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(folder / "index.records", "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    size = (folder / "index.records").stat().st_size
    index = _description(samples, entries) | {
        "format_version": 2, "records": {"name": "index.records", "bytes": size, "blake3": digest.hexdigest()}}
    (folder / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def build_old(folder: Path, samples: int) -> None:
    """index.json of format 1: the per-sample records as JSON lists in each shard entry."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = samples // PER_SHARD
    with open(folder / "index.json", "w", encoding="utf-8") as out:
        out.write('{"format_version": 1, "shards": [')
        for first in range(0, shards, CHUNK_SHARDS):
            count = min(CHUNK_SHARDS, shards - first)
            offsets, digests, keys = _chunk(first, count, seed=0)
            for i in range(count):
                rows = slice(i * PER_SHARD, (i + 1) * PER_SHARD)
                entry = _shard_entry(first + i, offsets[i]) | {
                    "offsets": offsets[i].tolist(), "keys": [bytes(k).decode() for k in keys[rows]],
                    "blake3": [bytes(d).hex() for d in digests[rows]]}
                out.write(("" if first + i == 0 else ", ") + json.dumps(entry))
        rest = json.dumps(_description(samples, []))[1:].replace('"shards": [], ', "")
        out.write("], " + rest)


# ------------------------------------------------------------------ one fresh process


_PROBE = r"""
import gc, json, os, sys, time
import numpy as np, torch
from data_shards import stream

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status", encoding="utf-8"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

def first_batch(dataset, k):  # the sample ids and byte ranges of micro-batch k, in either design
    positions = stream.batch_positions(dataset.settings, k)
    if hasattr(dataset, "_ids"):
        ids = dataset._ids(positions)
        return [dataset.catalog.locate(i) for i in ids]
    order = dataset._order(0)
    return [(int(dataset.catalog.start[order[p]]), int(dataset.catalog.end[order[p]])) for p in positions]

def private():  # pages written since a fork (copied from the parent's, or new): the worker's own
    fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup", encoding="utf-8") if ":" in line)
    return int(fields["Private_Dirty"].split()[0]) * 1024

def worker(work):
    # Private growth of a forked loader worker that makes a long-running worker's collections, then `work`.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        mine = private()
        gc.collect()
        work()
        os.write(write, json.dumps(private() - mine).encode())
        os._exit(0)
    os.waitpid(child, 0)
    return json.loads(os.read(read, 100))

def batch_of_a_fresh_worker():
    dataset._orders.clear()  # a worker starts without the rank's orders: the DataLoader's parent draws none
    first_batch(dataset, 1)

where, reset = sys.argv[1], sys.argv[2] == "reset"
imports_only = worker(lambda: None)  # what any worker of this process costs, index or not
settings = stream.StreamSettings(patch=8, batch=64, num_workers=0, noise=stream.NoiseConfig(sigma=25))
if reset:  # count the peak from the imports on (this makes a later fork's pages count as private: workers are
    # measured in another run, without it)
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")
before = status()
start, cpu = time.perf_counter(), time.process_time()
dataset = stream.build_train_loader(where, settings).dataset  # a rank's startup: load, check, catalog
first_batch(dataset, 0)
load_s, load_cpu_s = time.perf_counter() - start, time.process_time() - cpu
gc.collect()
after = status()
index_worker = worker(batch_of_a_fresh_worker) - imports_only
print(json.dumps({"load_s": load_s, "load_cpu_s": load_cpu_s, "peak": after["VmHWM"] - before["VmRSS"], "after": after["VmRSS"] - before["VmRSS"],
                  "anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"],
                  "worker_anon": index_worker}))
"""


def probe(code: Path, where: str, reset: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, where, "reset" if reset else "-"], cwd=code, env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ a loopback server counting bytes


class _Counting(http.server.SimpleHTTPRequestHandler):
    sent = 0
    lock = threading.Lock()

    def copyfile(self, source, outputfile):
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            with _Counting.lock:
                _Counting.sent += len(chunk)

    def log_message(self, *args):
        pass


def remote_fetch(code: Path, folder: Path, cache_root: Path) -> tuple[float, list[dict]]:
    """MiB sent while RANKS processes load the index from a loopback server at once."""
    handler = lambda *a, **k: _Counting(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Counting.sent = 0
    url = f"http://127.0.0.1:{server.server_address[1]}/index.json"
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    script = ("import sys; from data_shards.index import ShardIndex; from data_shards.remote import RemoteSettings; "
              "ShardIndex.load(sys.argv[1], RemoteSettings(cache_dir=sys.argv[2], cache_limit_bytes=1 << 40))")
    ranks = [subprocess.Popen([sys.executable, "-c", script, url, str(cache_root)], cwd=code, env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(RANKS)]
    errors = [rank.communicate(timeout=3600)[1] for rank in ranks]
    server.shutdown()
    failed = [e.strip().splitlines()[-1][:200] for rank, e in zip(ranks, errors) if rank.returncode != 0]
    return _Counting.sent / MIB, failed


# ------------------------------------------------------------------ the table


def measure(design: str, code: Path, samples: int, work: Path, remote: bool) -> dict:
    folder = work / f"{design}-{samples}"
    (build_new if design == "new" else build_old)(folder, samples)
    size = sum(path.stat().st_size for path in folder.iterdir())
    found = probe(code, str(folder), reset=True)
    record = {"design": design, "samples": samples, "index_mib": size / MIB}
    if "error" in found:
        record["error"] = found["error"]
    else:
        found["worker_anon"] = probe(code, str(folder), reset=False)["worker_anon"]
        records_file = (folder / "index.records").stat().st_size if design == "new" else 0
        node = records_file + RANKS * found["anon"] + RANKS * WORKERS * max(found["worker_anon"], 0)
        record |= {"load_s": found["load_s"], "load_cpu_s": found["load_cpu_s"], "peak_rss_mib": found["peak"] / MIB,
                   "rss_after_mib": found["after"] / MIB, "shared_mib_per_node": node / MIB,
                   "rank_private_mib": found["anon"] / MIB, "worker_private_mib": found["worker_anon"] / MIB}
        if remote:
            cache = work / f"cache-{design}-{samples}"
            record["remote_fetched_mib"], failed = remote_fetch(code, folder, cache)
            if failed:
                record["remote_error"] = failed[0]
            shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['design']} | {r['samples']:,} | {r['index_mib']:.0f} | refused: {r['error'][:90]} | | | | |"
    per = lambda mib: f"{mib:.0f} ({mib * MIB / r['samples']:.0f} B)"  # noqa: E731
    fetched = f"{r['remote_fetched_mib']:.0f}" if "remote_fetched_mib" in r else "-"
    return (f"| {r['design']} | {r['samples']:,} | {r['index_mib']:.0f} | {r['load_s']:.2f} ({r['load_cpu_s']:.2f}) | "
            f"{per(r['peak_rss_mib'])} | "
            f"{per(r['rss_after_mib'])} | {per(r['shared_mib_per_node'])} | {fetched} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", required=True, help="sizes, multiples of 1000")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--old-code", type=Path, help="a checkout of the code before index format 2")
    parser.add_argument("--old-max", type=int, default=4_000_000, help="largest size tried with the old code")
    parser.add_argument("--remote-max", type=int, default=10**8, help="largest size also loaded over http")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="index-scale-", dir=args.work))
    print("| design | samples | index MiB | load s (CPU s) | peak RSS MiB (per sample) | RSS after | node, 8 ranks x 4 workers "
          "| fetched by 8 ranks, MiB |\n|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    try:
        for samples in args.samples:
            designs = [("new", ROOT)]
            if args.old_code is not None and samples <= args.old_max:
                designs.append(("old", args.old_code))
            for design, code in designs:
                # 8 old-design ranks hold 8 parsed copies at once: past 10^6 that is more than this machine has.
                remote = samples <= (args.remote_max if design == "new" else min(args.remote_max, 10**6))
                results.append(measure(design, code, samples, work, remote))
                print(_row(results[-1]), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
