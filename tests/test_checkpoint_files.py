import json

import pytest

from train.checkpoint import (
    CheckpointError, STATE_FILE, checkpoint_name, clean_stale_tmp, complete_checkpoints, prune, publish,
    resolve_resume,
)


def make(root, step, complete=True):
    path = root / checkpoint_name(step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    make(tmp_path, 100)
    newest = make(tmp_path, 300)
    make(tmp_path, 400, complete=False)  # a folder without its state file is never chosen
    (tmp_path / ".tmp-step_00000500").mkdir()
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing_here") is None


def test_resume_path_must_be_complete(tmp_path):
    partial = make(tmp_path, 100, complete=False)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(partial), tmp_path)


def test_keep_last_k_and_the_best(tmp_path):
    paths = [make(tmp_path, s) for s in (100, 200, 300, 400, 500)]
    removed = prune(tmp_path, keep_last=2, keep={paths[1]})
    assert sorted(p.name for p in removed) == [paths[0].name, paths[2].name]
    assert complete_checkpoints(tmp_path) == [paths[1], paths[3], paths[4]]


def test_publish_replaces_and_stale_tmp_is_cleaned(tmp_path):
    old = make(tmp_path, 100)
    tmp = tmp_path / ".tmp-step_00000100"
    tmp.mkdir()
    (tmp / STATE_FILE).write_text(json.dumps({"step": 100, "new": True}))
    publish(tmp, old)
    assert json.loads((old / STATE_FILE).read_text())["new"] is True and not tmp.exists()
    (tmp_path / ".tmp-step_00000200").mkdir()
    clean_stale_tmp(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
