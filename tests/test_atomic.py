"""data_shards.atomic: a file appears whole under its name or not at all, and no temporary file is left."""

import pytest

from data_shards.atomic import atomic_write, replace_durably


def test_a_completed_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    for text in ("old", "new"):
        with atomic_write(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".state.json.") and tmp != target
            tmp.write_text(text, encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "new"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_deletes_the_temporary(tmp_path):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.safetensors"]


def test_a_named_temporary_and_a_writer_that_holds_its_own(tmp_path):
    """The shard cache names its temporary files (its cleanup knows them); a tar writer renames its own."""
    with atomic_write(tmp_path / "manifest.txt", tmp_path / ".tmp-manifest-1-2") as tmp:
        assert tmp.name == ".tmp-manifest-1-2"
        tmp.write_text("a\n", encoding="utf-8")
    (tmp_path / "shard.tar.tmp").write_bytes(b"tar")
    replace_durably(tmp_path / "shard.tar.tmp", tmp_path / "shard.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.txt", "shard.tar"]
