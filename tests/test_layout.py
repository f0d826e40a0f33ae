"""The house's import rules, read from the source: each floor imports only from the floors below it."""

import ast

from conftest import ROOT

# package -> the packages it may import from (itself included).
FLOORS = {
    "data_shards": {"data_shards"},
    "model": {"model", "data_shards"},
    "train": {"model", "data_shards", "train"},
    "tools": {"model", "data_shards", "train", "tools"},
}
PROJECT = {*FLOORS, "benchmarks", "tests"}


def imported_modules(path):
    """Top-level project module names a file imports ('train.config', 'test_trainer', ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside its own package
            names.add(path.relative_to(ROOT).parts[0])
    return names


def test_packages_import_only_downwards():
    wrong = []
    for package, allowed in FLOORS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top in PROJECT and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    # model may use data_shards' pixel geometry, atomic file writes and printable text (names read from
    # a stranger's weights file) only, so data_shards never needs model back.
    allowed = ("data_shards.geometry", "data_shards.atomic", "data_shards.remote.text")
    for path in sorted((ROOT / "model").rglob("*.py")):
        wrong += [f"{path.relative_to(ROOT)} imports {n}" for n in imported_modules(path)
                  if n.startswith("data_shards") and n not in allowed]
    assert not wrong, "\n".join(wrong)


def test_test_modules_do_not_import_each_other_or_benchmarks():
    test_names = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    bench_names = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    wrong = [f"{path.name} imports {name}" for path in sorted((ROOT / "tests").glob("*.py"))
             for name in imported_modules(path)
             if name.split(".")[0] in test_names | bench_names or name.startswith("benchmarks")]
    assert not wrong, "\n".join(wrong)


def test_text_files_are_opened_with_an_explicit_encoding():
    """open() in text mode, read_text() and write_text() name their encoding: the locale's default
    (e.g. ASCII under LANG=C) would turn one odd byte into a UnicodeDecodeError traceback."""
    wrong = []
    for package in (*FLOORS, "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
                    continue
                func = node.func
                if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {func.attr}()")
                elif isinstance(func, ast.Name) and func.id == "open":
                    mode = node.args[1] if len(node.args) > 1 else next(
                        (k.value for k in node.keywords if k.arg == "mode"), None)
                    if not (isinstance(mode, ast.Constant) and "b" in mode.value):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} open() in text mode")
    assert not wrong, "\n".join(wrong)
