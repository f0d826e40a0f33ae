"""Weights from strangers: a damaged or hostile weights file is one line naming it, exit 2, at every entry
point (model.read_state_dict, tools.restore / evaluate / export, the trainer's model.init_weights)."""

import json
import struct
import sys

import pytest
import torch

from conftest import TINY_RUN, random_png, run, tiny_net
from model import WeightsFileError, read_state_dict, save_official_pth, save_safetensors


def safetensors_bytes(header, data: bytes = b"", declared: int | None = None) -> bytes:
    """A safetensors file: an 8-byte little-endian header length (`declared` may lie), the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def tensor(dtype: str, shape: list[int], start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


HOSTILE = {
    "header length past any file": safetensors_bytes(b"{}", declared=1 << 60),
    "header length past the end": safetensors_bytes(b'{"a": 1}', declared=10_000),
    "header not UTF-8": safetensors_bytes(b"\xff\xfe{\x80}"),
    "header not JSON": safetensors_bytes(b"{this is not json"),
    "offsets past the end": safetensors_bytes({"w": tensor("F32", [4], 0, 16)}, bytes(8)),
    "overlapping tensors": safetensors_bytes({"a": tensor("F32", [2], 0, 8), "\x1b[2Jb": tensor("F32", [2], 4, 12)},
                                             bytes(12)),
    "size unlike dtype x shape": safetensors_bytes({"w": tensor("F32", [3], 0, 8)}, bytes(8)),
    "unknown dtype": safetensors_bytes({"w": tensor("Q99", [2], 0, 8)}, bytes(8)),
    "shape that overflows": safetensors_bytes({"w": tensor("F32", [1 << 40, 1 << 40], 0, 8)}, bytes(8)),
    "empty": b"",
}


def one_line_naming(text: str, path) -> bool:
    return text.count("\n") <= 1 and str(path) in text and "\x1b" not in text and "Traceback" not in text


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_loader_refuses_a_hostile_safetensors_file_in_one_line(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(HOSTILE[case])
    with pytest.raises(WeightsFileError, match="is not a readable weights file") as caught:
        read_state_dict(path)
    assert one_line_naming(str(caught.value), path), str(caught.value)


def test_the_loader_refuses_damaged_pth_files_in_one_line(tmp_path):
    torch.save({"params": tiny_net().state_dict()}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    files = {"truncated.pth": whole[: len(whole) // 2], "empty.pth": b"",
             "safetensors_named.pth": HOSTILE["header not JSON"]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsFileError) as caught:
            read_state_dict(tmp_path / name)
        assert one_line_naming(str(caught.value), tmp_path / name), str(caught.value)


def test_each_tool_refuses_a_hostile_file_with_exit_2(tmp_path, capsys):
    from tools.evaluate import main as evaluate
    from tools.export import main as export
    from tools.restore import main as restore

    weights = tmp_path / "evil.safetensors"
    weights.write_bytes(HOSTILE["offsets past the end"])
    random_png(tmp_path / "photos" / "a.png", 16, 16)
    runs = {
        "restore": lambda: restore([str(tmp_path / "photos"), "-w", str(weights), "-o", str(tmp_path / "out")]),
        "evaluate": lambda: evaluate(["-w", str(weights), "--target", str(tmp_path / "photos"), "--sigma", "25",
                                      "--csv", str(tmp_path / "e.csv")]),
        "export": lambda: export(["-w", str(weights), "-o", str(tmp_path / "exported")]),
    }
    for tool, call in runs.items():
        assert call() == 2, tool
        err = capsys.readouterr().err
        assert err.startswith("error: ") and one_line_naming(err, weights), (tool, err)


def test_export_refuses_a_damaged_other_half_of_a_weights_pair(tmp_path, capsys):
    """An export folder's model.safetensors is fine, its model_official.pth (the EMA partner) is not."""
    from tools.export import main as export

    folder = tmp_path / "export"
    save_safetensors(tiny_net(), folder / "model.safetensors")
    save_official_pth(tiny_net(), folder / "model_official.pth")
    partner = folder / "model_official.pth"
    partner.write_bytes(partner.read_bytes()[:100])
    assert export(["-w", str(folder / "model.safetensors"), "-o", str(tmp_path / "out"), "--formats",
                   "safetensors"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: ") and str(partner) in err, err


def test_the_trainer_refuses_hostile_init_weights_before_any_step(shards, tmp_path):
    weights = tmp_path / "evil.safetensors"
    weights.write_bytes(HOSTILE["header not UTF-8"])
    out = tmp_path / "run"
    proc = run([sys.executable, "train/main.py", f"data.train={shards}/train", f"data.val={shards}/val",
                f"output_dir={out}", *TINY_RUN, f"model.init_weights={weights}"], timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: model.init_weights={weights}: ") and "not a readable weights file" in line, line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
