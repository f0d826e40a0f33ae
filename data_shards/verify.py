"""Check packed shards against their index: `python -m data_shards.verify DIR`.

DIR is a split folder (with index.json) or a pack output holding several. Every shard must exist,
match the index's size, sha256, sample count and sample byte offsets, and every sample must decode
with matching sizes.
Prints one line per problem, naming shard and key; exit status 0 when all is well, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from data_shards.codec import decode_npy, decode_png
from data_shards.index import INDEX_NAME, ShardIndex, member_key, scan_offsets
from data_shards.tar_writer import sha256_file

_DECODERS = {"png": decode_png, "npy": decode_npy}


def verify_split(folder: Path) -> list[str]:
    """Problems found in one split folder (empty list: all good)."""
    try:
        index = ShardIndex.load(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{folder}: cannot read {INDEX_NAME}: {err}"]
    problems = []
    listed = {shard.name for shard in index.shards}
    for stray in sorted(folder.glob("*.tar*")):
        if stray.name not in listed:
            what = "unfinished shard (a pack was interrupted)" if stray.name.endswith(".tmp") else "shard not in the index"
            problems.append(f"{stray}: {what}")
    for shard in index.shards:
        problems += _verify_shard(folder / shard.name, shard, index)
    total = sum(shard.samples for shard in index.shards)
    if total != index.total_samples:
        problems.append(f"{folder / INDEX_NAME}: total_samples {index.total_samples} but shards hold {total}")
    return problems


def _verify_shard(path: Path, shard, index: ShardIndex) -> list[str]:
    if not path.exists():
        return [f"{path}: missing"]
    problems = []
    size = path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{path}: {size} bytes, index says {shard.bytes} (truncated or replaced)")
    elif sha256_file(path) != shard.sha256:
        problems.append(f"{path}: sha256 differs from the index (corrupted or replaced)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = member_key(member.name)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{path}: unreadable tar after {len(samples)} samples ({err})")
    if len(samples) != shard.samples:
        problems.append(f"{path}: {len(samples)} samples, index says {shard.samples}")
    elif shard.offsets is None:
        problems.append(f"{path}: the index has no sample offsets (training needs them): run "
                        f"`python -m data_shards.index {path.parent}`")
    elif size == shard.bytes and scan_offsets(path) != shard.offsets:
        problems.append(f"{path}: sample offsets differ from the index (re-index or re-pack)")
    for key, members in samples.items():
        problem = _check_sample(members, index)
        if problem:
            problems.append(f"{path}: key {key}: {problem}")
    return problems


def _check_sample(members: dict[str, bytes], index: ShardIndex) -> str | None:
    shapes = {}
    for name in ("target", *index.inputs):
        extension = f"{name}.{index.format}"
        if extension not in members:
            return f"no {extension} member (has {sorted(members)})"
        try:
            array = _DECODERS[index.format](members[extension])
        except Exception as err:  # whatever the decoder raises, the member is bad
            return f"{extension} does not decode ({type(err).__name__}: {err})"
        if array.shape[2] != index.channels or 8 * array.dtype.itemsize not in index.bit_depths:
            return f"{extension} is {array.shape} {array.dtype}, index says {index.channels} channels, {index.bit_depths} bit"
        shapes[name] = array.shape
    if len(set(shapes.values())) > 1:
        return f"members differ in size: {shapes}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="restormer-verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a split folder (with index.json) or a pack output folder")
    args = parser.parse_args(argv)
    if (args.dir / INDEX_NAME).exists():
        folders = [args.dir]
    else:
        folders = sorted(p.parent for p in args.dir.glob(f"*/{INDEX_NAME}"))
    if not folders:
        print(f"restormer-verify: {args.dir}: no {INDEX_NAME} here or in its subfolders "
              "(not a pack output, or the pack did not finish)", file=sys.stderr)
        return 1
    bad = 0
    for folder in folders:
        problems = verify_split(folder)
        bad += len(problems)
        print(f"{folder}: " + (f"{len(problems)} problem(s)" if problems else "OK"))
        for problem in problems:
            print(f"  {problem}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
