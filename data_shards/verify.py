"""Check packed shards against their index: `python -m data_shards.verify DIR`.

DIR is a split folder (with index.json) or a pack output holding several. Every shard must exist and
match the index's size, sha256 and sample count; every sample its recorded byte range, key and
digest; and every sample must decode with matching sizes.
Prints one line per problem, naming shard and key; exit status 0 when all is well, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from data_shards.codec import decode_npy, decode_png
from data_shards.index import INDEX_NAME, ShardIndex, ShardInfo, describe_shard, tar_samples

_DECODERS = {"png": decode_png, "npy": decode_npy}


def verify_split(folder: Path) -> list[str]:
    """Problems found in one split folder (empty list: all good)."""
    try:
        index = ShardIndex.load(folder)
    except (OSError, ValueError) as err:
        return [f"{folder}: cannot read {INDEX_NAME}: {err}"]
    problems = [f"{folder}: {index.records_problem()}"] if index.records_problem() else []
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


def _verify_shard(path: Path, shard: ShardInfo, index: ShardIndex) -> list[str]:
    if not path.exists():
        return [f"{path}: missing"]
    problems = []
    size = path.stat().st_size
    if size != shard.bytes:
        problems.append(f"{path}: {size} bytes, index says {shard.bytes} (truncated or replaced)")
    try:
        found = describe_shard(path, shard.name)
    except (OSError, ValueError, EOFError, tarfile.TarError) as err:
        found = None
        problems.append(f"{path}: not a whole tar ({err})")
    if found is not None:
        if size == shard.bytes and found.sha256 != shard.sha256:
            problems.append(f"{path}: sha256 differs from the index (corrupted or replaced)")
        if found.samples != shard.samples:
            problems.append(f"{path}: {found.samples} samples, index says {shard.samples}")
        elif shard.has_records:
            problems += _record_problems(path, found, shard)
    problems += _decode_problems(path, index)
    return problems


def _record_problems(path: Path, found: ShardInfo, shard: ShardInfo) -> list[str]:
    """The samples whose byte range, key or digest differ from the index's records."""
    problems = []
    for i, key in enumerate(shard.keys):
        where = (shard.offsets[i], shard.offsets[i + 1])
        if (found.offsets[i], found.offsets[i + 1]) != where:
            problems.append(f"{path}: key {key}: at bytes {found.offsets[i]}:{found.offsets[i + 1]}, the index "
                            f"says {where[0]}:{where[1]}")
        elif found.keys[i] != key:
            problems.append(f"{path}: bytes {where[0]}:{where[1]} hold key {found.keys[i]}, the index says {key}")
        elif found.blake3[i] != shard.blake3[i]:
            problems.append(f"{path}: key {key}: its bytes differ from the index's digest (changed since packed)")
    return problems


def _decode_problems(path: Path, index: ShardIndex) -> list[str]:
    problems, count = [], 0
    try:
        with tarfile.open(path, "r:") as tar:
            for sample in tar_samples(tar):
                count += 1
                problem = _check_sample(sample.members, index)
                if problem:
                    problems.append(f"{path}: key {sample.key}: {problem}")
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{path}: unreadable tar after {count} samples ({err})")
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
