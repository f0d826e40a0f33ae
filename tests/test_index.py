"""The index's records file: hostile copies refused before use, one download per node, old indexes upgraded."""

import json
import multiprocessing
import pickle
import shutil
import threading

import blake3
import numpy as np
import pytest

from conftest import format1_index, loopback_http
from data_shards.index import INDEX_NAME, RECORDS_NAME, ShardIndex
from data_shards.index import main as index_main
from data_shards.records import layout
from data_shards.remote import RemoteSettings
from data_shards.stream import Catalog


@pytest.fixture
def split(shards, tmp_path):
    """A copy of the shared tiny pack's train split (8 samples in one shard)."""
    folder = tmp_path / "train"
    shutil.copytree(shards / "train", folder)
    return folder


def _rewrite(split, change, rehash=True):
    """Changes the records file's bytes with change(data: bytearray, sections), and records the new
    size and hash in index.json as a forger who controls both files would (rehash=False: as damage)."""
    path = split / RECORDS_NAME
    data = bytearray(path.read_bytes())
    samples, shards, key_bytes = np.frombuffer(bytes(data[8:32]), "<u8").tolist()
    change(data, layout(samples, shards, key_bytes))
    path.write_bytes(bytes(data))
    if rehash:
        index = json.loads((split / INDEX_NAME).read_text())
        index["records"].update(bytes=len(data), blake3=blake3.blake3(bytes(data)).hexdigest())
        (split / INDEX_NAME).write_text(json.dumps(index))


def _int64(data, at, value):
    data[at:at + 8] = np.array([value], "<i8").tobytes()


def _offsets_at(sections, i):
    return sections["offsets"][0] + 8 * i


HOSTILE = {
    "truncated": (lambda d, s: d.__delitem__(slice(len(d) - 5, None)), False, "bytes, the index says"),
    "wrong_hash": (lambda d, s: d.__setitem__(s["digests"][0], d[s["digests"][0]] ^ 1), False,
                   "its BLAKE3 hash differs from the one index.json records"),
    "past_the_shard": (lambda d, s: _int64(d, _offsets_at(s, 8), 10**9), True, "past the shard's"),
    "offset_1e12": (lambda d, s: _int64(d, _offsets_at(s, 3), 10**12), True, "spans bytes"),
    "backwards": (lambda d, s: _int64(d, _offsets_at(s, 2), 0), True, "in increasing order"),
    "escape_key": (lambda d, s: d.__setitem__(s["keys"][0], 0x1B), True, "is not printable text"),
    "not_utf8": (lambda d, s: d.__setitem__(s["keys"][0], 0xFF), True, "is not UTF-8"),
    "key_past_text": (lambda d, s: _int64(d, s["key_end"][0] + 8, 10**6), True, "keys take 1 to"),
    "bad_header": (lambda d, s: d.__setitem__(slice(0, 8), b"NOTRECS!"), True, "not a records file"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_records_file_is_refused_with_one_line(split, case, capsys):
    change, rehash, message = HOSTILE[case]
    _rewrite(split, change, rehash)
    with pytest.raises(ValueError, match=message) as caught:
        ShardIndex.load(split)
    assert "\n" not in str(caught.value) and str(split / RECORDS_NAME) in str(caught.value)
    assert index_main([str(split)]) == 2  # the command says the same, in one line
    assert message.split()[-1] in capsys.readouterr().err


def test_a_missing_or_escaping_records_file_is_named(split):
    (split / RECORDS_NAME).rename(split / "elsewhere")
    with pytest.raises(ValueError, match=f"{RECORDS_NAME}: missing; index.json needs its records file"):
        ShardIndex.load(split)
    index = json.loads((split / INDEX_NAME).read_text())
    index["records"]["name"] = "../train/elsewhere"
    (split / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match='records name a string "../train/elsewhere" is not allowed'):
        ShardIndex.load(split)


def test_an_old_index_is_read_and_upgraded_to_the_records_file(shards, split):
    packed = ShardIndex.load(split)
    (split / INDEX_NAME).write_text(json.dumps(format1_index(split)))
    (split / RECORDS_NAME).unlink()
    old = ShardIndex.load(split)  # format 1 still reads, its records into memory
    assert old.shards == packed.shards and old.records_problem() is None
    assert index_main([str(split)]) == 0
    assert json.loads((split / INDEX_NAME).read_text())["format_version"] == 2
    upgraded = ShardIndex.load(split)
    assert upgraded == packed and (split / RECORDS_NAME).read_bytes() == (shards / "train" / RECORDS_NAME).read_bytes()


def test_a_catalog_crosses_into_a_spawned_worker_as_a_mapping_of_the_same_file(split):
    index = ShardIndex.load(split)
    catalog = Catalog.from_index(index, index.shard_urls, str(split))
    copy = pickle.loads(pickle.dumps(catalog))
    assert isinstance(copy.records.key_end, np.memmap) and copy.records.path == str(split / RECORDS_NAME)
    assert [copy.key(i) for i in range(copy.size)] == list(index.shards[0].keys)
    assert copy.locate(3) == catalog.locate(3)


def _load(url, cache):
    ShardIndex.load(url, RemoteSettings(cache_dir=cache, cache_limit_bytes=1 << 30))


def test_a_remote_index_is_fetched_once_per_node(split, tmp_path):
    files = {f"/train/{path.name}": path.read_bytes() for path in split.iterdir()}
    cache = str(tmp_path / "node")
    with loopback_http(files) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/train/{INDEX_NAME}"
        threads = [threading.Thread(target=_load, args=(url, cache)) for _ in range(3)]
        processes = [multiprocessing.get_context("fork").Process(target=_load, args=(url, cache)) for _ in range(3)]
        for worker in threads + processes:
            worker.start()
        for worker in threads + processes:
            worker.join(60)
        assert [p.exitcode for p in processes] == [0, 0, 0]
        fetched = [path for path, _, _ in server.plan.requests if path.endswith(RECORDS_NAME)]
        assert len(fetched) == 1  # six loaders, one download; the others waited and mapped the copy
        assert ShardIndex.load(url, RemoteSettings(cache_dir=cache, cache_limit_bytes=1 << 30)) == ShardIndex.load(split)
