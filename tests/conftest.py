"""Shared test helpers: launch lines, tiny networks and runs, synthetic images and shards."""

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a training subprocess: CPU only, W&B offline, one steady thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    return proc


def accelerate_cmd(num_processes: int = 1) -> list[str]:
    """The launch line that really starts synced gloo processes on CPU: `--cpu --num_processes 2`
    would silently run one process, so 2 processes are `--multi_gpu` with ACCELERATE_USE_CPU=1."""
    base = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if num_processes > 1:
        return base + ["--multi_gpu", "--num_processes", str(num_processes)]
    return base + ["--num_processes", "1", "--cpu"]


@pytest.fixture
def one_thread():
    """Two intra-op threads on a shared 2-core machine mostly wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (it holds the reference data sets; users do not have it)")
    return SHARED


# A network with every part of Restormer (4 levels, refinement) that runs in milliseconds.
TINY_NET = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8])
# The same network as the tools' command-line options.
TINY_NET_ARGS = ["--dim", "8", "--num-blocks", "1", "1", "1", "1", "--num-refinement-blocks", "1",
                 "--heads", "1", "2", "4", "8"]
# Trainer overrides: TINY_NET, two 3-step stages, a validation and a checkpoint every 3 steps.
TINY_RUN = [
    "model.dim=8", "model.num_blocks=[1,1,1,1]", "model.num_refinement_blocks=1",
    "progressive.iters=[3,3]", "progressive.patch=[16,24]", "progressive.batch=[2,2]",
    "data.num_workers=0", "data.noise_sigma=25", "train.threads=1", "train.log_every=1",
    "val.every=3", "val.grid_crop=32", "train.ckpt_every=3", "tracking.wandb=disabled",
    "lr.schedule=cosine", "optim.lr=1e-3",
]


def tiny_net(preset: str = "default", seed: int = 0, identity: bool = False):
    """TINY_NET for `preset`, in eval mode. identity: the output convolution zeroed, so the global
    residual makes output == input exactly."""
    import torch

    from model import build_model

    torch.manual_seed(seed)
    model = build_model(preset, **TINY_NET).eval()
    if identity:
        torch.nn.init.zeros_(model.output.weight)
    return model


def write_png(path: Path, array: np.ndarray) -> np.ndarray:
    from data_shards.codec import encode_png

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))
    return array


def random_png(path: Path, height: int, width: int, channels: int = 3, bits: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 2**bits, (height, width, channels)).astype(np.uint16 if bits == 16 else np.uint8)
    return write_png(path, array)


def image_bomb(path: Path, width: int, height: int, bits: int = 8) -> Path:
    """A file of a few hundred bytes whose header claims a width x height image (8-bit gray or 16-bit
    RGB; .png, .tif or .npy): decoding it would allocate the whole image."""
    import struct
    import zlib

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".png":
        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        header = struct.pack(">IIBBBBB", width, height, bits, 0 if bits == 8 else 2, 0, 0, 0)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                         + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b""))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, np.zeros((1, 1) if bits == 8 else (1, 1, 3), np.uint8 if bits == 8 else np.uint16),
                         metadata=None)
        data = bytearray(path.read_bytes())  # little-endian classic TIFF: patch width, length, rows per strip
        (ifd,) = struct.unpack_from("<I", data, 4)
        (count,) = struct.unpack_from("<H", data, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack_from("<HH", data, entry)
            if tag in (256, 257, 278):
                struct.pack_into("<I" if kind == 4 else "<H", data, entry + 8, width if tag == 256 else height)
        path.write_bytes(bytes(data))
    else:
        header = {"descr": "<u1" if bits == 8 else "<u2", "fortran_order": False,
                  "shape": (height, width) if bits == 8 else (height, width, 3)}
        with open(path, "wb") as file:
            np.lib.format.write_array_header_1_0(file, header)
    return path


def synthetic_images(folder: Path, count: int = 10, size: int = 40, flat: bool = False) -> list[Path]:
    """Smooth colour fields with an edge, as 8-bit PNGs img0.png ... `flat`: each image one distinct
    grey level (10, 30, ..., 190), so a training crop tells which image it came from."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    paths = []
    for i in range(count):
        if flat:
            img = np.full((size, size, 3), (10 + 20 * i) / 255.0)
        else:
            a, b, c = rng.uniform(0, 1, 3)
            img = np.stack([a * xx + (1 - a) * yy, (b * xx * yy) % 1, (xx > c) * 0.8 + 0.1], -1)
        paths.append(folder / f"img{i}.png")
        write_png(paths[-1], np.round(img * 255).astype(np.uint8))
    return paths


def pack_images(out: Path, flat: bool = False, *pack_args: str) -> Path:
    """synthetic_images packed as shards under out/shards: 8 train, 2 val."""
    from data_shards.pack import main as pack_main

    synthetic_images(out / "images", flat=flat)
    assert pack_main([str(out / "images"), "--out", str(out / "shards"), "--val-fraction", "0.2",
                      "--no-progress", *pack_args]) == 0
    return out / "shards"


def format1_index(split: Path, records: bool = True) -> dict:
    """A split's index.json as format 1 wrote it, before the records file: the per-sample records as
    JSON lists in each shard entry, or none at all (records=False: packed before they were recorded).
    Old indexes are still read, so hostile ones are tried in this shape too."""
    from data_shards.index import INDEX_NAME, ShardIndex

    data = json.loads((split / INDEX_NAME).read_text(encoding="utf-8"))
    data["format_version"] = 1
    del data["records"]
    if records:
        for entry, shard in zip(data["shards"], ShardIndex.load(split).shards, strict=True):
            entry.update(offsets=list(shard.offsets), keys=list(shard.keys), blake3=list(shard.blake3))
    return data


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """The shared tiny data set (read only): pack_images in a session folder."""
    return pack_images(tmp_path_factory.mktemp("data"))


def records(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl, tolerating a last line that is being written while we read."""
    path = run_dir / "metrics.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return found


# ---------------------------------------------------------------- an http server with faults, on 127.0.0.1


@dataclass
class Plan:
    """What the server does next; tests change it, every request is logged."""

    files: dict[str, bytes] = field(default_factory=dict)
    drops: int = 0  # the next `drops` responses stop after `drop_after` bytes and close the connection
    drop_after: int = 50_000
    status: int | None = None  # answer every request with this error status
    stall: bool = False  # send headers and a little, then nothing
    ignore_range: bool = False  # answer a Range request with 200 and the whole file
    # A lying answer to a Range request (206 all the same): "from_zero" (the asked length, from byte 0),
    # "wider" (from the asked start to the end of the file), "no_content_range" (the right bytes, no header).
    lie: str | None = None
    lies: int | None = None  # how many answers lie (None: all)
    lie_paths: set[str] | None = None  # the files whose answers lie (None: all)
    auth: str | None = None  # required Authorization header
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def lying(self, path: str) -> str | None:
        if self.lie is None or (self.lie_paths is not None and path not in self.lie_paths) or self.lies == 0:
            return None
        if self.lies is not None:
            self.lies -= 1
        return self.lie


class _FaultyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's name)
        plan: Plan = self.server.plan
        plan.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if plan.status is not None:
            return self.send_error(plan.status)
        if plan.auth is not None and self.headers.get("Authorization") != plan.auth:
            return self.send_error(401)
        path = self.path.split("?")[0]
        data = plan.files.get(path)
        if data is None:
            return self.send_error(404)
        ranged = self.headers.get("Range") is not None and not plan.ignore_range
        start, end = 0, len(data)
        if ranged:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) + 1 if last else len(data)
        if start > len(data):
            return self.send_error(416)
        lie = plan.lying(path) if ranged else None
        if lie == "from_zero":
            start, end = 0, end - start
        elif lie == "wider":
            end = len(data)
        body = data[start:end]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        if ranged and lie != "no_content_range":
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if plan.drops > 0:
            plan.drops -= 1
            self.wfile.write(body[:plan.drop_after])
            self.close_connection = True
            return None
        if plan.stall:
            self.wfile.write(body[:1000])
            self.wfile.flush()
            plan.release.wait(30)
            self.close_connection = True
            return None
        self.wfile.write(body)
        return None

    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up on a lying answer is what the tests provoke


@contextlib.contextmanager
def loopback_http(files: dict[str, bytes] | None = None):
    """A ThreadingHTTPServer on 127.0.0.1 serving server.plan (a Plan), stopped on exit."""
    server = _QuietServer(("127.0.0.1", 0), _FaultyHandler)
    server.plan = Plan(files=dict(files or {}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.plan.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------- the commands of docs/scaling.md

SCALING_DOC = ROOT / "docs" / "scaling.md"


def doc_commands() -> list[str]:
    """The commands in docs/scaling.md's ```bash blocks, one per line (comments skipped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", SCALING_DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(line.strip())
    return commands


def doc_command(key: str) -> list[str]:
    """The one command of docs/scaling.md containing `key`, as argv (`accelerate` -> this Python)."""
    found = [c for c in doc_commands() if key in c]
    assert len(found) == 1, f"{len(found)} commands in {SCALING_DOC} contain {key!r}: {found}"
    argv = shlex.split(found[0])
    if argv[:2] == ["accelerate", "launch"]:
        argv[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
    return argv


def recipe_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that shrink the docs' recipe (gaussian_color_denoising_blind) to seconds on a CPU."""
    return [f"data.train={shards}/train", f"data.val={shards}/val", f"output_dir={out}", *TINY_RUN,
            "data.noise_sigma_range=null", *extra]


def with_flags(argv: list[str], **flags) -> list[str]:
    """Sets launcher flags (those before train/main.py) to test-sized values: replaced or added."""
    script = argv.index("train/main.py")
    head, tail = list(argv[:script]), argv[script:]
    for name, value in flags.items():
        flag = f"--{name}"
        if flag in head:
            head[head.index(flag) + 1] = str(value)
        else:
            head += [flag, str(value)]
    return head + tail
