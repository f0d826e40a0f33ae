"""data_shards.remote against real servers on 127.0.0.1: http.server with Range and faults, moto's S3 server."""

import hashlib
import io
import itertools
import multiprocessing
import os
import pickle
import socket
import tarfile
import threading
import time

import numpy as np
import pytest
import torch

from conftest import Plan, loopback_http, pack_images
from data_shards.index import ShardIndex
from data_shards.remote import (CACHE_SUBFOLDER, RemoteSettings, ShardCache, ShardReadError, open_shard, read_bytes,
                                redact)
from train.config import load_config
from train.data import remote_settings

FAST = RemoteSettings(retries=3, timeout_s=2.0, backoff_s=0.01)
DATA = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()


# ------------------------------------------------------------------ the http server with faults (conftest)


@pytest.fixture(scope="module")
def http_server():
    with loopback_http() as server:
        yield server


@pytest.fixture
def http(http_server):
    """(base URL, plan) with a fresh plan holding /shard.tar = DATA."""
    http_server.plan.release.set()
    http_server.plan = Plan(files={"/shard.tar": DATA})
    yield f"http://127.0.0.1:{http_server.server_address[1]}", http_server.plan
    http_server.plan.release.set()


def _read(url, offset=0, **kwargs):
    with open_shard(url, offset, settings=kwargs.pop("settings", FAST), **kwargs) as stream:
        return stream.read()


# ------------------------------------------------------------------ http


@pytest.mark.parametrize("ignore_range", [False, True])
def test_http_reads_from_any_offset(http, ignore_range):
    base, plan = http
    plan.ignore_range = ignore_range  # a server without Range support: the head is read and dropped
    for offset in (0, 1, 123_457, len(DATA) - 1, len(DATA)):
        assert _read(f"{base}/shard.tar", offset, size=len(DATA)) == DATA[offset:]
    assert _read(f"{base}/shard.tar") == DATA  # the plain call, size from the server
    assert _read(f"{base}/shard.tar", 5) == DATA[5:]


@pytest.mark.parametrize("ignore_range", [False, True])
def test_http_reads_just_the_range_asked_for(http, ignore_range):
    base, plan = http
    plan.ignore_range = ignore_range
    assert _read(f"{base}/shard.tar", 1000, length=500) == DATA[1000:1500]
    assert _read(f"{base}/shard.tar", 0, length=7, size=len(DATA)) == DATA[:7]
    assert [requested for _, requested, _ in plan.requests] == ["bytes=1000-1499", "bytes=0-6"]
    plan.ignore_range, plan.drops, plan.drop_after = False, 1, 200
    assert _read(f"{base}/shard.tar", 1000, length=500) == DATA[1000:1500]
    assert [requested for _, requested, _ in plan.requests[2:]] == ["bytes=1000-1499", "bytes=1200-1499"]
    with pytest.raises(ShardReadError, match=r"bytes 10\.\.20 are past the end of the shard \(15 bytes\)"):
        _read(f"{base}/shard.tar", 10, length=10, size=15)


def test_http_dropped_connection_resumes_from_the_byte_reached(http):
    base, plan = http
    plan.drops = 3
    assert _read(f"{base}/shard.tar", 1000) == DATA[1000:]
    ranges = [requested for _, requested, _ in plan.requests]
    assert ranges == [f"bytes={1000 + i * 50_000}-" for i in range(4)]


def test_drops_after_a_mebibyte_of_progress_start_a_new_count(http):
    base, plan = http
    one_retry = RemoteSettings(retries=1, timeout_s=2.0, backoff_s=0.01)
    plan.drops, plan.drop_after = 2, 1_200_000  # more drops than retries, each after 1.2 MB of progress
    assert _read(f"{base}/shard.tar", settings=one_retry) == DATA
    plan.drops, plan.drop_after = 2, 40_000  # a trickle: little progress, so the drops count in a row
    with pytest.raises(ShardReadError, match="gave up at byte 80000 after 1 retries"):
        _read(f"{base}/shard.tar", settings=one_retry)


def test_a_failing_server_gives_up_after_the_retries(http):
    base, plan = http
    plan.status = 503
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=r"shard http://127\.0\.0\.1:\d+/shard\.tar: gave up at byte 0 "
                                             r"after 3 retries: HTTPError: HTTP Error 503") as caught:
        _read(f"{base}/shard.tar")
    assert time.monotonic() - started < 10
    assert len(plan.requests) == 4 and caught.value.url == f"{base}/shard.tar"


@pytest.mark.parametrize("status", [404, 403])
def test_a_missing_or_forbidden_shard_is_not_retried(http, status):
    base, plan = http
    plan.status = status
    with pytest.raises(ShardReadError, match=f"HTTP Error {status}"):
        _read(f"{base}/shard.tar")
    assert len(plan.requests) == 1


def test_a_stalled_server_times_out_instead_of_hanging(http):
    base, plan = http
    plan.stall = True
    started = time.monotonic()
    with pytest.raises(ShardReadError, match="gave up at byte 2000 after 1 retries: TimeoutError"):
        _read(f"{base}/shard.tar", settings=RemoteSettings(retries=1, timeout_s=0.3, backoff_s=0.01))
    assert time.monotonic() - started < 5
    assert [requested for _, requested, _ in plan.requests] == [None, "bytes=1000-"]


def test_a_shard_unlike_the_index_is_an_error_not_a_short_read(http):
    base, plan = http
    with pytest.raises(ShardReadError, match=f"the shard has {len(DATA)} bytes but the index says {len(DATA) + 1}"):
        _read(f"{base}/shard.tar", size=len(DATA) + 1)
    # One sample's range needs only its own bytes: the ranges a truncated shard still holds are served.
    assert _read(f"{base}/shard.tar", 100, length=10, size=len(DATA) + 1) == DATA[100:110]
    with pytest.raises(ShardReadError, match=r"past the end of the shard \(3000000 bytes; truncated\?\)"):
        _read(f"{base}/shard.tar", len(DATA) - 5, length=6, size=len(DATA) + 1)
    assert len(plan.requests) == 3  # none of it retried
    with pytest.raises(ShardReadError, match="past the end"):
        _read(f"{base}/shard.tar", len(DATA) + 1, size=len(DATA))


def test_credentials_in_the_url_are_sent_and_never_shown(http):
    base, plan = http
    plan.auth = "Basic Ym9iOnMzY3JldA=="  # bob:s3cret
    url = base.replace("http://", "http://bob:s3cret@") + "/shard.tar?token=t0ps3cret"
    assert _read(url, 10) == DATA[10:]
    assert plan.requests[-1][0] == "/shard.tar?token=t0ps3cret"  # the query goes to the server as given
    for bad_url in (url.replace("s3cret@", "wrong@"), url.replace("shard.tar", "gone.tar")):
        with pytest.raises(ShardReadError) as caught:
            _read(bad_url)
        message = str(caught.value)
        assert "bob:***@" in message and "token=***" in message
        assert "s3cret" not in message and "wrong" not in message and "t0ps3cret" not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        again = pickle.loads(pickle.dumps(caught.value))  # as a loader worker hands it over
        assert str(again) == message and again.url == caught.value.url
    plan.files["/index.json"] = b"not json"
    with pytest.raises(ValueError, match="not a valid shard index") as caught:
        ShardIndex.load(url.replace("shard.tar", "index.json"))
    assert "s3cret" not in str(caught.value) and "t0ps3cret" not in str(caught.value)


def test_redact_masks_every_credential_shape():
    cases = {
        "https://user:pw@h/x?X-Amz-Signature=abc&Expires=1": "https://user:***@h/x?X-Amz-Signature=***&Expires=***",
        "https://ghp_token@h/x": "https://***@h/x",
        "pipe:curl -s -u bob:pw -H 'Authorization: Bearer xyz' https://h/x":
            "pipe:curl -s -u *** -H 'Authorization: Bearer ***' https://h/x",
        "pipe:AWS_SECRET_ACCESS_KEY=abc aws s3 cp s3://b/k -": "pipe:AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/k -",
    }
    for text, shown in cases.items():
        assert redact(text) == shown
    assert redact("/data/train-000001.tar") == "/data/train-000001.tar"


@pytest.mark.parametrize("lie,sent", [("from_zero", "the server sent bytes 0-499/3000000"),
                                      ("wider", "the server sent bytes 1000-2999999/3000000"),
                                      ("no_content_range", "the answer has no Content-Range")])
def test_a_range_answered_with_other_bytes_is_retried_then_refused(http, lie, sent):
    base, plan = http
    plan.lie, plan.lies = lie, 1  # one lying answer: the retry gets the bytes asked for
    assert _read(f"{base}/shard.tar", 1000, length=500) == DATA[1000:1500]
    assert [requested for _, requested, _ in plan.requests] == ["bytes=1000-1499"] * 2
    plan.lies = None  # a server that always lies: given up after the retries, like a dead connection
    with pytest.raises(ShardReadError, match=f"gave up at byte 1000 after 3 retries: asked for bytes 1000-1499, {sent}"):
        _read(f"{base}/shard.tar", 1000, length=500)
    assert len(plan.requests) == 2 + 4
    if lie != "wider":  # an open range ("bytes=1000-"), as a read to the shard's end asks
        with pytest.raises(ShardReadError, match="gave up at byte 1000 after 3 retries: asked for bytes 1000-"):
            _read(f"{base}/shard.tar", 1000)


def test_a_ranged_s3_answer_with_other_bytes_is_retried_then_refused(monkeypatch):
    """S3's ranged GetObject through the same check (moto answers correctly, so a stub client lies here)."""
    from data_shards.remote import s3_source

    asked = []

    class Lying:
        def get_object(self, Bucket, Key, Range):  # noqa: N803 (boto3's names)
            asked.append(Range)
            return {"Body": io.BytesIO(DATA[:500]), "ContentRange": f"bytes 0-499/{len(DATA)}", "ContentLength": 500}

    monkeypatch.setattr(s3_source, "s3_client", lambda timeout_s: Lying())
    with pytest.raises(ShardReadError, match="after 3 retries: asked for bytes 1000-1499, the server sent bytes 0-499/"):
        _read("s3://shards/train/shard.tar", 1000, length=500)
    assert asked == ["bytes=1000-1499"] * 4


def test_a_remote_index_is_read_with_the_runs_retries_and_timeout(http):
    from train.config import ConfigError
    from train.data import check_data
    from train.schedule import plan_stages

    base, plan = http
    plan.status = 503
    with pytest.raises(ShardReadError, match="gave up at byte 0 after 1 retries: HTTPError: HTTP Error 503"):
        ShardIndex.load(f"{base}/index.json", RemoteSettings(retries=1, timeout_s=2.0, backoff_s=0.01))
    assert len(plan.requests) == 2
    cfg = load_config("demo", [f"data.train={base}/train/index.json", "data.val=null", "data.retries=0"])
    with pytest.raises(ConfigError, match=r"data\.train: cannot read the shard index: shard http\S+/train/index\.json: gave up at byte 0 after 0 retries"):
        check_data(cfg, plan_stages(cfg, 1), cfg.data.train, None)
    assert len(plan.requests) == 3
    plan.status, plan.stall, plan.files["/train/index.json"] = None, True, b" " * 5000
    cfg = load_config("demo", [f"data.train={base}/train/index.json", "data.val=null", "data.retries=0",
                               "data.timeout_s=0.3"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match="after 0 retries: TimeoutError"):
        check_data(cfg, plan_stages(cfg, 1), cfg.data.train, None)
    assert time.monotonic() - started < 5  # the run's 0.3 s, not the default 60 s


# ------------------------------------------------------------------ local files and pipe:


def test_local_and_file_urls_seek_and_check_the_size(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(DATA)
    assert _read(str(path), 77) == DATA[77:] and _read(path.as_uri(), 77, size=len(DATA)) == DATA[77:]
    with pytest.raises(ShardReadError, match=f"the shard has {len(DATA)} bytes but the index says 5: truncated or"):
        _read(str(path), size=5)
    assert _read(str(path), 10, length=5, size=len(DATA) + 9)[:5] == DATA[10:15]  # a range: its bytes suffice
    with pytest.raises(ShardReadError, match=r"bytes 2999999\.\.3000001 are past the end of the shard"):
        _read(str(path), len(DATA) - 1, length=2, size=len(DATA) + 9)
    with pytest.raises(ShardReadError, match="FileNotFoundError"):
        _read(str(tmp_path / "missing.tar"))


def test_pipe_reads_discard_the_head_and_fail_boundedly(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(DATA)
    assert _read(f"pipe:cat {path}", 4321, size=len(DATA)) == DATA[4321:]
    with pytest.raises(ShardReadError, match="after 3 retries: the stream ended at byte 1000, before byte 3000000"):
        _read(f"pipe:head -c 1000 {path}", size=len(DATA))  # a short pipe is never a silent loss
    with pytest.raises(ShardReadError, match="after 3 retries: the command exited with status 3"):
        _read("pipe:exit 3")
    with pytest.raises(ShardReadError, match="status 127"):  # not found: not retried
        _read("pipe:no-such-command-here")
    started = time.monotonic()
    with pytest.raises(ShardReadError, match="TimeoutError: no output from the command"):
        _read("pipe:sleep 20", settings=RemoteSettings(retries=0, timeout_s=0.3))
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------ S3 (moto's server)


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_ACCESS_KEY_ID", "testing-key")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="shards")
        client.put_object(Bucket="shards", Key="train/shard.tar", Body=DATA)
        yield client
    server.stop()


def test_s3_reads_from_any_offset(s3_server):
    for offset in (0, 9, 250_001, len(DATA)):
        assert _read("s3://shards/train/shard.tar", offset, size=len(DATA)) == DATA[offset:]
    assert read_bytes("s3://shards/train/shard.tar") == DATA
    assert _read("s3://shards/train/shard.tar", 250_001, length=1000) == DATA[250_001:251_001]


def test_s3_missing_key_or_bucket_is_a_clear_error(s3_server):
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=r"shard s3://shards/train/nope\.tar: NoSuchKey: .*key does not exist"):
        _read("s3://shards/train/nope.tar")
    with pytest.raises(ShardReadError, match="NoSuchBucket"):
        _read("s3://no-bucket/train/shard.tar")
    assert time.monotonic() - started < 5  # not retried
    with pytest.raises(ShardReadError, match="looks like s3://bucket/path"):
        _read("s3://shards")


class _CuttingProxy:
    """TCP proxy in front of a server: its first `cuts` connections close after `after` response bytes."""

    def __init__(self, upstream: tuple[str, int], cuts: int, after: int):
        self.upstream, self.cuts, self.after = upstream, cuts, after
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            server = socket.create_connection(self.upstream)
            limit = self.after if self.cuts > 0 else None
            self.cuts -= 1
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    @staticmethod
    def _pump(source, target, limit):
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    target.sendall(data[:limit - sent])
                    break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, target):  # shutdown, not just close: it wakes the other pump's recv
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        self.thread.join()


def test_s3_dropped_connection_resumes_from_the_byte_reached(s3_server, monkeypatch):
    host, port = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://").split(":")
    proxy = _CuttingProxy((host, int(port)), cuts=2, after=200_000)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        assert _read("s3://shards/train/shard.tar", 77, size=len(DATA)) == DATA[77:]
        assert proxy.connections == 3
        proxy.cuts = 10
        with pytest.raises(ShardReadError, match=r"s3://shards/train/shard\.tar: gave up at byte \d+ after 3 retries"):
            _read("s3://shards/train/shard.tar")
    finally:
        proxy.close()


# ------------------------------------------------------------------ cache


def _cached(tmp_path, limit=10 * len(DATA)):
    return RemoteSettings(retries=3, timeout_s=2.0, backoff_s=0.01, cache_dir=str(tmp_path / "cache"),
                          cache_limit_bytes=limit)


_real_sha256 = hashlib.sha256


def _own(tmp_path):
    """The cache's own subfolder."""
    return tmp_path / "cache" / CACHE_SUBFOLDER


def _copies(tmp_path):
    """The cached shards (not the manifest, lock or temporary files)."""
    return sorted(p for p in _own(tmp_path).iterdir() if not p.name.startswith(".") and p.name != ShardCache.MANIFEST)


def _sha(data):
    return _real_sha256(data).hexdigest()


def test_cache_miss_then_hit(http, tmp_path):
    base, plan = http
    settings = _cached(tmp_path)
    for offset in (0, 1234, 0):
        assert _read(f"{base}/shard.tar", offset, size=len(DATA), sha256=_sha(DATA), settings=settings) == DATA[offset:]
    assert len(plan.requests) == 1
    assert _copies(tmp_path) == [ShardCache(settings).path_for(f"{base}/shard.tar")]


def test_cache_names_ignore_credentials_and_query(tmp_path):
    cache = ShardCache(_cached(tmp_path))
    path = cache.path_for("https://bob:pw@h/a/train-000001.tar?X-Amz-Signature=1")
    assert path == cache.path_for("https://h/a/train-000001.tar?X-Amz-Signature=2")
    assert path.name.endswith("-train-000001.tar") and "pw" not in path.name
    assert path != cache.path_for("https://h/b/train-000001.tar")


def test_cache_evicts_the_least_recently_used(http, tmp_path):
    base, plan = http
    for name in "abcd":
        plan.files[f"/{name}.tar"] = DATA
    settings = _cached(tmp_path, limit=int(2.5 * len(DATA)))
    for name in "aba":  # a, b fetched; a touched again: b is now the least recently used
        _read(f"{base}/{name}.tar", settings=settings)
        time.sleep(0.02)  # file times tick coarsely
    _read(f"{base}/c.tar", settings=settings)
    held = sorted(p.name.split("-", 1)[1] for p in _copies(tmp_path))
    assert held == ["a.tar", "c.tar"]
    assert sum(p.stat().st_size for p in _copies(tmp_path)) <= settings.cache_limit_bytes
    fetched = [path for path, _, _ in plan.requests]
    assert fetched == ["/a.tar", "/b.tar", "/c.tar"]


def test_corrupt_cached_copy_is_detected_and_fetched_again(http, tmp_path):
    base, plan = http
    settings, url = _cached(tmp_path), f"{base}/shard.tar"
    _read(url, settings=settings)
    copy = ShardCache(settings).path_for(url)
    flipped = bytearray(DATA)
    flipped[1000] ^= 1
    copy.with_name("rotten").write_bytes(bytes(flipped))  # as if left by an earlier run, rotted on disk: only
    os.replace(copy.with_name("rotten"), copy)  # the sha256 can tell (another file: hashed before its use here)
    with pytest.warns(UserWarning, match="does not match the index's sha256: fetching it again"):
        assert _read(url, 3, size=len(DATA), sha256=_sha(DATA), settings=settings) == DATA[3:]
    assert len(plan.requests) == 2 and copy.read_bytes() == DATA
    with open(copy, "r+b") as stream:  # truncated in place: the size is checked on every open
        stream.truncate(len(DATA) - 1)
    with pytest.warns(UserWarning, match=f"has {len(DATA) - 1} bytes, the index says {len(DATA)}"):
        assert _read(url, size=len(DATA), sha256=_sha(DATA), settings=settings) == DATA
    assert len(plan.requests) == 3 and copy.read_bytes() == DATA


def test_cache_hits_hash_a_copy_once_per_process(http, tmp_path, monkeypatch):
    base, _ = http
    settings, url, expected = _cached(tmp_path), f"{base}/shard.tar", _sha(DATA)
    _read(url, sha256=expected, settings=settings)  # fetched, and hashed while written
    hashed = []

    class Counting:
        def __init__(self, data=b""):
            self.inner = _real_sha256(data)

        def update(self, data):
            hashed.append(len(data))
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    for offset in (0, 5000, 123):
        with open_shard(url, offset, length=10, size=len(DATA), sha256=expected, settings=settings) as stream:
            assert stream.read(10) == DATA[offset:offset + 10]
    assert sum(hashed) == 0  # a reader seeking sample by sample does not re-hash the shard per sample
    copy = ShardCache(settings).path_for(url)
    copy.with_name("other").write_bytes(DATA)
    os.replace(copy.with_name("other"), copy)  # another file now: hashed before its first use here
    assert _read(url, size=len(DATA), sha256=expected, settings=settings) == DATA
    assert sum(hashed) == len(DATA)


def test_a_download_unlike_the_index_is_not_cached(http, tmp_path):
    base, _ = http
    settings = _cached(tmp_path)
    with pytest.raises(ShardReadError, match="downloaded sha256 .* differs from the index's"):
        _read(f"{base}/shard.tar", sha256=_sha(b"other"), settings=settings)
    assert _copies(tmp_path) == [] and not list(_own(tmp_path).glob(".tmp-*"))


def test_a_shard_larger_than_the_cache_is_streamed_not_kept(http, tmp_path):
    base, _ = http
    settings = _cached(tmp_path, limit=len(DATA) // 2)
    with pytest.warns(UserWarning, match="larger than the whole cache limit"):
        assert _read(f"{base}/shard.tar", 10, settings=settings) == DATA[10:]
    assert _copies(tmp_path) == [] and not list(_own(tmp_path).glob(".tmp-*"))


def test_temporary_files_of_dead_processes_are_cleaned(http, tmp_path):
    settings = _cached(tmp_path)
    folder = _own(tmp_path)
    folder.mkdir(parents=True)
    stale, fresh = folder / f".tmp-1-2-{'a' * 24}-old.tar", folder / f".tmp-3-4-{'b' * 24}-busy.tar"
    foreign = folder / ".tmp-notes.txt"  # not a name the cache gives its temporary files
    for path in (stale, fresh, foreign):
        path.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    os.utime(foreign, (time.time() - 7200, time.time() - 7200))
    _read(f"{http[0]}/shard.tar", settings=settings)
    assert not stale.exists() and fresh.exists() and foreign.exists()


def test_the_cache_deletes_only_what_it_wrote(http, tmp_path):
    """cache_dir given as a folder that holds other files (a run folder, a home): eviction and the removal
    of a bad copy touch only the copies its manifest lists."""
    base, plan = http
    for name in "abc":
        plan.files[f"/{name}.tar"] = DATA
    settings = _cached(tmp_path, limit=int(1.5 * len(DATA)))
    mine = ShardCache(settings)
    foreign = {tmp_path / "cache" / "run.lock": b"pid 1", tmp_path / "cache" / "big.tar": DATA + DATA,
               _own(tmp_path) / "notes.txt": b"x", mine.path_for(f"{base}/c.tar"): b"not the shard"}
    for path, content in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    os.utime(tmp_path / "cache" / "big.tar", (0, 0))  # the oldest file around: first in line for a plain LRU
    for name in "ab":
        assert _read(f"{base}/{name}.tar", settings=settings) == DATA
        time.sleep(0.02)
    assert not mine.path_for(f"{base}/a.tar").exists() and mine.path_for(f"{base}/b.tar").exists()  # a evicted
    with pytest.warns(UserWarning, match="the cache did not write it .* read without the cache"):
        assert _read(f"{base}/c.tar", size=len(DATA), settings=settings) == DATA  # a foreign file at c's copy name
    assert all(path.read_bytes() == content for path, content in foreign.items())
    assert (_own(tmp_path) / ShardCache.MANIFEST).read_text(encoding="utf-8").split() == [mine.path_for(f"{base}/b.tar").name]


def test_a_manifest_naming_files_outside_the_cache_deletes_none_of_them(http, tmp_path):
    """A damaged or hostile manifest.txt: names that path_for never gives (absolute, ../, a separator)
    are ignored with a warning, so eviction cannot reach the run folder or any other file."""
    base, plan = http
    for name in "ab":
        plan.files[f"/{name}.tar"] = DATA
    settings = _cached(tmp_path, limit=int(1.5 * len(DATA)))
    run = tmp_path / "run"
    run.mkdir()
    outside = {run / "config.yaml": b"run_name: live\n", tmp_path / "absolute.tar": DATA}
    for path, content in outside.items():
        path.write_bytes(content)
        os.utime(path, (1, 1))  # the oldest files listed: first in line for eviction
    _own(tmp_path).mkdir(parents=True)
    (_own(tmp_path) / ShardCache.MANIFEST).write_text(f"../../run/config.yaml\n{tmp_path / 'absolute.tar'}\n",
                                                      encoding="utf-8")
    with pytest.warns(UserWarning, match=r"ignored 2 name\(s\) that the cache never gives a copy, e.g. '\.\./\.\./run"):
        for name in "ab":  # the second download evicts
            assert _read(f"{base}/{name}.tar", settings=settings) == DATA
    assert all(path.read_bytes() == content for path, content in outside.items())
    listed = (_own(tmp_path) / ShardCache.MANIFEST).read_text(encoding="utf-8").split()
    assert listed == [ShardCache(settings).path_for(f"{base}/b.tar").name]


def test_a_linked_manifest_is_ignored_and_a_linked_cache_folder_refused(http, tmp_path):
    base, _ = http
    settings = _cached(tmp_path, limit=int(1.5 * len(DATA)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    foreign = _own(tmp_path) / f"{'0' * 24}-foreign.tar"  # named like a copy, not written by the cache
    listing = elsewhere / "names.txt"
    listing.write_text(f"{foreign.name}\n", encoding="utf-8")
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(DATA)
    os.utime(foreign, (1, 1))
    (_own(tmp_path) / ShardCache.MANIFEST).symlink_to(listing)
    with pytest.warns(UserWarning, match="manifest.txt is a symbolic link, not the file the cache writes: ignored"):
        assert _read(f"{base}/shard.tar", settings=settings) == DATA
    assert foreign.read_bytes() == DATA and listing.read_text(encoding="utf-8") == f"{foreign.name}\n"
    assert not (_own(tmp_path) / ShardCache.MANIFEST).is_symlink()  # replaced by the cache's own
    for path in _own(tmp_path).iterdir():
        path.unlink()
    _own(tmp_path).rmdir()
    _own(tmp_path).symlink_to(elsewhere)  # eviction would delete inside `elsewhere`
    with pytest.raises(ShardReadError, match=f"{CACHE_SUBFOLDER} is a symbolic link: the cache deletes the copies"):
        _read(f"{base}/shard.tar", settings=settings)
    assert sorted(elsewhere.iterdir()) == [listing]


def _read_all_shards(base, settings, names, results):
    got = []
    for name in names:
        with open_shard(f"{base}/{name}.tar", size=len(DATA), sha256=_sha(DATA), settings=settings) as stream:
            got.append(stream.read() == DATA)
    results.put(all(got))


@pytest.mark.parametrize("room", [10, 2.5])  # shards the limit holds: all, or fewer (evicting while others write)
def test_concurrent_readers_share_one_cache(http, tmp_path, room):
    base, plan = http
    names = [f"s{i}" for i in range(3)]
    for name in names:
        plan.files[f"/{name}.tar"] = DATA
    settings = _cached(tmp_path, limit=int(room * len(DATA)))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_read_all_shards, args=(base, settings, names[i % 3:] + names[:i % 3], results))
               for i in range(4)]
    for worker in workers:
        worker.start()
    threads = [threading.Thread(target=_read_all_shards, args=(base, settings, names[::-1], results)) for _ in range(2)]
    for thread in threads:
        thread.start()
    outcomes = [results.get(timeout=60) for _ in range(6)]
    for worker in workers:
        worker.join(timeout=30)
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == [True] * 6 and all(worker.exitcode == 0 for worker in workers)
    held = _copies(tmp_path)
    assert not list(_own(tmp_path).glob(".tmp-*"))
    assert all(p.read_bytes() == DATA for p in held) and 1 <= len(held) <= 3
    if room == 10:  # nothing evicted: each shard was downloaded once, the other readers waited for it
        assert sorted(path for path, _, _ in plan.requests) == ["/s0.tar", "/s1.tar", "/s2.tar"]


# ------------------------------------------------------------------ config and a packed split end to end


def test_config_fields_map_to_the_settings():
    cfg = load_config("demo", ["data.cache_dir=/ssd/shards", "data.cache_limit_gb=2.5", "data.retries=2",
                               "data.timeout_s=15"])
    assert remote_settings(cfg) == RemoteSettings(retries=2, timeout_s=15.0, cache_dir="/ssd/shards",
                                                  cache_limit_bytes=2_500_000_000)
    assert remote_settings(load_config("demo")) == RemoteSettings()


@pytest.fixture(scope="module")
def packed_split(tmp_path_factory):
    split = pack_images(tmp_path_factory.mktemp("packed"), False, "--shard-samples", "3") / "train"
    assert len(ShardIndex.load(split).shards) == 3
    return split


@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_packed_split_reads_back_byte_identically(packed_split, http_server, s3_server, tmp_path, where):
    files = {path.name: path.read_bytes() for path in packed_split.iterdir()}
    if where == "http":
        http_server.plan = Plan(files={f"/train/{name}": data for name, data in files.items()})
        base = f"http://127.0.0.1:{http_server.server_address[1]}/train"
    else:
        for name, data in files.items():
            s3_server.put_object(Bucket="shards", Key=f"packed/train/{name}", Body=data)
        base = "s3://shards/packed/train"
    index = ShardIndex.load(f"{base}/index.json")
    assert index == ShardIndex.load(packed_split)
    for settings in (FAST, _cached(tmp_path)):
        for url, shard in zip(index.shard_urls, index.shards, strict=True):
            local = files[shard.name]
            assert _read(url, size=shard.bytes, sha256=shard.sha256, settings=settings) == local
            # A tar reader started at the second member's header sees the rest of the shard.
            with tarfile.open(fileobj=io.BytesIO(local), mode="r|") as tar:
                members = [(m.name, m.offset) for m in tar]
            with open_shard(url, members[1][1], size=shard.bytes, settings=settings) as stream, \
                    tarfile.open(fileobj=stream, mode="r|") as tar:
                assert [m.name for m in tar] == [name for name, _ in members[1:]]


# ------------------------------------------------------------------ the stream over http and S3


@pytest.mark.parametrize("where", ["http", "s3"])
def test_the_stream_reads_remote_splits_like_local_ones(packed_split, http_server, s3_server, tmp_path, where):
    from data_shards.stream import NoiseConfig, StreamSettings, build_train_loader, build_val_loader

    files = {path.name: path.read_bytes() for path in packed_split.iterdir()}
    if where == "http":
        http_server.plan = Plan(files={f"/train/{name}": data for name, data in files.items()})
        index_url = f"http://127.0.0.1:{http_server.server_address[1]}/train/index.json"
    else:
        for name, data in files.items():
            s3_server.put_object(Bucket="shards", Key=f"stream/train/{name}", Body=data)
        index_url = "s3://shards/stream/train/index.json"
    noise = NoiseConfig(sigma=25)

    def train(source, remote):
        loader = build_train_loader(source, StreamSettings(patch=16, batch=2, num_workers=0, noise=noise, remote=remote))
        return [batch["target"] for batch in itertools.islice(iter(loader), 6)]

    def val(source, remote=None):
        return [(item["key"], item["target"]) for item in build_val_loader(source, noise=noise, remote=remote)]

    local_train, local_val = train(packed_split, FAST), val(packed_split)
    for remote in (FAST, _cached(tmp_path)):
        assert all(torch.equal(a, b) for a, b in zip(train(index_url, remote), local_train, strict=True))
        got = val(index_url, remote)
        assert [k for k, _ in got] == [k for k, _ in local_val]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, local_val, strict=True))


def test_a_missing_remote_shard_is_skipped_counted_and_named(packed_split, http_server):
    from data_shards.stream import NoiseConfig, StreamSettings, build_train_loader

    files = {path.name: path.read_bytes() for path in packed_split.iterdir()}
    index = ShardIndex.load(packed_split)
    gone = index.shards[1].name
    http_server.plan = Plan(files={f"/train/{name}": data for name, data in files.items() if name != gone},
                            auth="Basic Ym9iOnMzY3JldA==")
    url = f"http://bob:s3cret@127.0.0.1:{http_server.server_address[1]}/train/index.json"
    settings = StreamSettings(patch=16, batch=2, num_workers=0, noise=NoiseConfig(sigma=25), remote=FAST)
    with pytest.warns(UserWarning) as caught:
        batches = list(itertools.islice(iter(build_train_loader(url, settings)), 3))
    assert sum(int(b["skipped"]) for b in batches) >= index.shards[1].samples  # one epoch: each drawn once
    messages = [str(w.message) for w in caught]
    assert any(gone in m and "HTTP Error 404" in m for m in messages)
    assert not any("s3cret" in m for m in messages)


def test_a_swapped_remote_shard_is_refused_sample_by_sample(packed_split, http_server):
    """Another valid shard in a shard's place, read uncached over http: training's ranged reads and
    validation's front-to-back read both check every sample against the index's digest."""
    from data_shards.stream import NoiseConfig, StreamSettings, build_train_loader, build_val_loader

    files = {path.name: path.read_bytes() for path in packed_split.iterdir()}
    index = ShardIndex.load(packed_split)
    first, second = (shard.name for shard in index.shards[:2])
    files[second] = files[first].ljust(max(len(files[first]), len(files[second])), b"\0")  # zeros: still a valid tar
    http_server.plan = Plan(files={f"/train/{name}": data for name, data in files.items()})
    url = f"http://127.0.0.1:{http_server.server_address[1]}/train/index.json"
    noise = NoiseConfig(sigma=25)
    settings = StreamSettings(patch=16, batch=2, num_workers=0, noise=noise, remote=FAST)
    with pytest.warns(UserWarning) as caught:
        batches = list(itertools.islice(iter(build_train_loader(url, settings)), 4))  # 8 draws: one epoch and more
        val = build_val_loader(url, noise=noise, remote=FAST)
        keys = [item["key"] for item in val]
    assert sum(int(b["skipped"]) for b in batches) >= index.shards[1].samples
    assert val.skipped == index.shards[1].samples and not set(keys) & set(index.shards[1].keys)
    named = {key for key in index.shards[1].keys
             if any(f"{second} bytes" in str(w.message) and f"key {key}: ValueError: these bytes are not the sample "
                    "the index recorded" in str(w.message) for w in caught)}
    assert named == set(index.shards[1].keys)
