"""data_shards.publish.build_once: a folder appears complete or not at all."""

import pytest

from data_shards.publish import build_once


def _complete(path):
    return (path / "done").exists()


def test_builds_once_then_reuses(tmp_path):
    out, calls = tmp_path / "out", []

    def build(staging):
        calls.append(staging)
        staging.mkdir()
        (staging / "done").write_text("1")

    build_once(out, build, _complete)
    build_once(out, build, _complete)
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_build_leaves_nothing_and_an_incomplete_copy_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "half").write_text("")  # e.g. an outdated or half-deleted copy

    def failing(staging):
        staging.mkdir()
        raise RuntimeError("bad input")

    with pytest.raises(RuntimeError, match="bad input"):
        build_once(out, failing, _complete)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "half").exists()

    def build(staging):
        staging.mkdir()
        (staging / "done").write_text("1")

    build_once(out, build, _complete)
    assert sorted(p.name for p in out.iterdir()) == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
