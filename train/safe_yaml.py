"""YAML from users and from checkpoints, read with bounds: a bad file is one line of error, never a
traceback, a stall or a blown memory.

PyYAML's SafeLoader runs no code, but it composes recursively (a 20000-deep document raises
RecursionError) and an alias stands for the whole node it names, so 500 bytes of nested aliases
("billion laughs") expand to 10^9 values once anything walks them. The loader here counts every node
as composed, an alias as the size of the node it names, and stops past MAX_NODES or MAX_DEPTH, before
anything is built from the document.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# A config is a few sections of scalars and short lists (the largest recipe is about 100 nodes,
# 3 levels, 2 kB): these bounds are far above any real one and refuse a hostile one in milliseconds.
MAX_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_NODES = 10_000


class YAMLInputError(ValueError):
    """YAML that is refused; the one-line message names the source, the place and the reason."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, text: str):
        super().__init__(text)
        self.depth = 0
        self.nodes = 0
        self.sizes: dict[int, int] = {}  # id(anchored node) -> nodes it stands for, once composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # raises on an undefined alias
            if id(node) not in self.sizes:
                raise _Refused(f"alias *{event.anchor} is used inside the node it names (a recursive alias)", event)
            self._count(self.sizes[id(node)], event)
            return node
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event)
        before = self.nodes
        node = super().compose_node(parent, index)
        self.depth -= 1
        self._count(1, event)
        if event.anchor is not None:
            self.sizes[id(node)] = self.nodes - before
        return node

    def _count(self, nodes: int, event) -> None:
        self.nodes += nodes
        if self.nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} values once aliases are expanded (an alias bomb?)", event)


# YAML 1.2's booleans (true/false) only: YAML 1.1 also reads yes/no/on/off as booleans, which made
# train.mixed_precision=no the boolean false instead of the setting "no".
_BoundedLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))


class _Refused(yaml.MarkedYAMLError):
    def __init__(self, problem: str, event):
        super().__init__(problem=problem, problem_mark=event.start_mark)


def parse_yaml(text: str, source: str) -> Any:
    """The document in `text`; YAMLInputError naming `source` when it is not valid or over a bound."""
    if len(text) > MAX_BYTES:
        raise YAMLInputError(f"{source}: {len(text):,} characters, more than the {MAX_BYTES:,} a config may have")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters at once
        return loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        raise YAMLInputError(f"{source}: {_one_line(_describe(err))}") from err
    except (yaml.YAMLError, ValueError, OverflowError) as err:  # ReaderError; a constructor's int() or date()
        raise YAMLInputError(f"{source}: not valid YAML: {_one_line(str(err))}") from err
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: Path) -> Any:
    """The document in the file at `path`, read as UTF-8 up to MAX_BYTES."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as err:
        raise YAMLInputError(f"{path}: cannot read ({err.strerror or err})") from err
    if len(data) > MAX_BYTES:
        raise YAMLInputError(f"{path}: larger than the {MAX_BYTES:,} bytes a config may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YAMLInputError(f"{path}: not a text file (byte {data[err.start]:#04x} at offset {err.start} is not "
                             "UTF-8)") from err
    return parse_yaml(text, str(path))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if isinstance(err, _Refused):
        return f"refused: {err.problem}{where}"
    context = f"{err.context}: " if err.context else ""
    return f"not valid YAML: {context}{err.problem}{where}"
