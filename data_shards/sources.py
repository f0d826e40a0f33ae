"""Finds the samples of a data set: a folder of clean images, paired folders, or a CSV/Parquet manifest."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from data_shards.codec import IMAGE_SUFFIXES

_NAME = re.compile(r"^[a-z0-9]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


class SourceError(ValueError):
    """The data set as a whole cannot be packed (empty, malformed manifest); the message says why."""


@dataclass(frozen=True)
class SampleSpec:
    key: str
    target: Path
    inputs: tuple[tuple[str, Path], ...]  # (member name, file), in the order given by the user
    source: str  # the target's path relative to its root, for messages and provenance
    split: str | None = None  # from a manifest; None lets the pack's --val-fraction decide


@dataclass
class Scan:
    samples: list[SampleSpec]
    problems: list[tuple[str, str]]  # (file, reason): samples that cannot be formed
    ignored: list[str]  # files that are not images


def input_member(name: str | None) -> str:
    """Member name of an input: 'input' when unnamed, 'input_<name>' for named inputs (dual-pixel)."""
    if name is None:
        return "input"
    if not _NAME.match(name):
        raise SourceError(f"input name {name!r}: use lowercase letters and digits only (e.g. left, right)")
    return f"input_{name}"


def sanitize_key(relative_stem: str) -> str:
    """A webdataset key from a relative path without suffix.

    webdataset splits key from extension at the first dot of the file name and treats names like
    `__x__` as metadata, so dots and other unsafe characters become '_' and such parts get a prefix.
    """
    parts = [_UNSAFE.sub("_", part) or "_" for part in relative_stem.replace(os.sep, "/").split("/")]
    return "/".join(f"k{part}" if part.startswith("__") else part for part in parts)


def scan_clean(root: Path) -> Scan:
    files, ignored = _image_files(root)
    samples = [SampleSpec(key=sanitize_key(stem), target=path, inputs=(), source=rel)
               for stem, (rel, path) in sorted(files.items())]
    return _dedupe(samples, [], ignored)


def scan_paired(inputs: list[tuple[str | None, Path]], target_root: Path) -> Scan:
    """Pairs files by relative path without suffix (GoPro, SIDD, Rain100, DPDD layouts)."""
    targets, ignored = _image_files(target_root)
    named = []
    for name, root in inputs:
        files, more_ignored = _image_files(root)
        named.append((input_member(name), files))
        ignored += more_ignored
    problems = []
    for member, files in named:
        for stem in sorted(files.keys() - targets.keys()):
            problems.append((str(files[stem][1]), f"{member} has no target (no {stem}.* under {target_root})"))
    samples = []
    for stem, (rel, path) in sorted(targets.items()):
        missing = [member for member, files in named if stem not in files]
        if missing:
            problems.append((str(path), f"target has no {', '.join(missing)} file"))
            continue
        pairs = tuple((member, files[stem][1]) for member, files in named)
        samples.append(SampleSpec(key=sanitize_key(stem), target=path, inputs=pairs, source=rel))
    return _dedupe(samples, problems, ignored)


def read_manifest(path: Path) -> Scan:
    """CSV or Parquet with a `target` column, optional `input` or `input_<name>` columns, `split`, `key`.

    Relative paths are relative to the manifest's folder.
    """
    import pandas as pd

    try:
        table = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except ImportError as err:
        raise SourceError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`), "
                          "or save the manifest as CSV") from err
    except Exception as err:
        raise SourceError(f"{path}: cannot read manifest ({err})") from err
    if "target" not in table.columns:
        raise SourceError(f"{path}: manifest needs a 'target' column (has {list(table.columns)})")
    input_columns = [c for c in table.columns if c == "input" or c.startswith("input_")]
    for column in input_columns:
        if column != "input":
            input_member(column.removeprefix("input_"))  # validates the name
    base = path.parent

    def resolve(value) -> Path:
        candidate = Path(str(value))
        return candidate if candidate.is_absolute() else base / candidate

    targets = [resolve(v) for v in table["target"]]
    if not targets:
        raise SourceError(f"{path}: manifest has no rows")
    root = Path(os.path.commonpath([p.parent for p in targets]))
    samples, problems = [], []
    for row_number, (row, target) in enumerate(zip(table.itertuples(index=False), targets, strict=True)):
        values = row._asdict()
        empty = [c for c in ["target", *input_columns] if pd.isna(values[c]) or str(values[c]) == ""]
        if empty:
            problems.append((f"{path}:row {row_number + 2}", f"empty {', '.join(empty)}"))
            continue
        rel = target.relative_to(root).as_posix()
        key_value = values.get("key")
        stem = str(key_value) if key_value is not None and not pd.isna(key_value) else rel.rsplit(".", 1)[0]
        split = values.get("split")
        split = None if split is None or pd.isna(split) else str(split)
        if split is not None and not _NAME.match(split):
            raise SourceError(f"{path}:row {row_number + 2}: split {split!r} must be lowercase letters/digits")
        inputs = tuple((c, resolve(values[c])) for c in input_columns)
        samples.append(SampleSpec(key=sanitize_key(stem), target=target, inputs=inputs, source=rel, split=split))
    return _dedupe(sorted(samples, key=lambda s: s.key), problems, [])


def _image_files(root: Path) -> tuple[dict[str, tuple[str, Path]], list[str]]:
    """{relative path without suffix: (relative path, path)} of the images under root, and non-images."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder")
    files, ignored = {}, []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(str(path))
                continue
            stem = rel[: -len(path.suffix)]
            if stem in files:  # a.png next to a.jpg: ambiguous, keep the first and report the other
                ignored.append(f"{path} (same name as {files[stem][1].name})")
                continue
            files[stem] = (rel, path)
    if not files:
        raise SourceError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, ignored


def _dedupe(samples: list[SampleSpec], problems: list[tuple[str, str]], ignored: list[str]) -> Scan:
    """Drops samples whose sanitised key repeats an earlier one (e.g. 'a.b.png' next to 'a_b.png')."""
    seen: dict[str, SampleSpec] = {}
    kept = []
    for sample in samples:
        if sample.key in seen:
            problems.append((str(sample.target), f"key {sample.key!r} already used by {seen[sample.key].target}"))
            continue
        seen[sample.key] = sample
        kept.append(sample)
    return Scan(kept, problems, ignored)
