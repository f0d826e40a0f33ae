"""A network of one's own by import path (model.arch, train/network.py): the config's checks in-process,
then one chain of fresh processes that trains it, resumes exactly and restores with it."""

import os
import re
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, TINY_RUN, random_png, records, run
from model import read_state_dict
from train.config import ConfigError, load_config

# A user's file: a small residual conv net, nothing of Restormer's shape (no patch_embed, no output).
MY_NETS = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, width, blocks=1):
        super().__init__()
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GELU())
                                    for _ in range(blocks)])
        self.ending = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, x):
        return x + self.ending(self.body(self.intro(x)))


def tiny_net(width):
    return TinyNet(width, blocks=2)


NOT_A_NETWORK = 3
'''
ARCH = "model.arch=my_nets:TinyNet"


@pytest.fixture
def my_nets(tmp_path, monkeypatch):
    """my_nets.py in a folder of its own, importable in this process."""
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "my_nets.py").write_text(MY_NETS)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("my_nets", None)


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=my_nets.TinyNet"], "model.arch='my_nets.TinyNet': give package.module:Class"),
    (["model.arch=no_such_module:Net"], "model.arch=no_such_module:Net: no module named 'no_such_module' on the "
                                        "Python path; put the folder that holds no_such_module.py on PYTHONPATH"),
    (["model.arch=my_nets:Missing"], "has no 'Missing'; its nn.Module classes: TinyNet"),
    (["model.arch=my_nets:NOT_A_NETWORK"], "NOT_A_NETWORK is 3, not an nn.Module class or a function returning one"),
    (["model.arch=collections:OrderedDict"], "OrderedDict is a class but not a torch.nn.Module"),
    (["model.arch=torch.nn:Identity"], "the network has no trainable parameters"),
    ([ARCH, "model.kwargs={widht: 8}"], "model.kwargs {'widht': 8} do not fit my_nets:TinyNet: TypeError"),
    ([ARCH, "model.kwargs=[8]"], "model.kwargs (from override 'model.kwargs=[8]'): expected a mapping"),
    ([ARCH, "model.kwargs={width: 2024-01-01}"], "width is a date"),
    ([ARCH, "model.kwargs={width: 8}", "model.dim=16"], "model.dim=16 set Restormer's shape, but model.arch=my_nets:"),
    ([ARCH, "model.kwargs={width: 8}", "model.channels=[3]"], "model.channels=[3]: give [input, output]"),
    (["model.kwargs={width: 8}"], "model.kwargs goes with model.arch"),
])
def test_a_bad_network_by_import_path_is_a_one_line_config_error(my_nets, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config("demo", overrides)
    assert "\n" not in str(err.value)


def test_the_resolved_config_names_the_network_and_calibration_builds_it(my_nets, tmp_path):
    from train.memory_plan import CalibrationStep
    from train.network import network_changes, network_record, parameter_count

    # model.arch on the command line replaces the recipe's Restormer (demo.yaml sets preset, dim, blocks).
    cfg = load_config("demo", ["model.arch=my_nets:tiny_net", "model.kwargs={width: 4}", "model.kwargs.width=6"])
    assert (cfg.model.arch, cfg.model.kwargs, cfg.model.preset, cfg.model.dim) == ("my_nets:tiny_net", {"width": 6},
                                                                                   "default", None)
    (tmp_path / "resolved.yaml").write_text(cfg.to_yaml())
    assert load_config(str(tmp_path / "resolved.yaml")) == cfg
    # A resume compares the networks: class, arguments and channels.
    other = load_config("demo", ["model.arch=my_nets:tiny_net", "model.kwargs={width: 4}"])
    (tmp_path / "checkpoint.yaml").write_text(other.to_yaml())
    assert network_changes(cfg, tmp_path / "checkpoint.yaml") == [
        "model.kwargs: checkpoint {'width': 4} vs now {'width': 6}"]
    # The memory plan calibrates this network, with the config's channels (no Restormer attributes).
    record = network_record(cfg.model)
    step = CalibrationStep(record, "no", "lean", asdict(cfg.loss))
    net = step.network(torch.device("cpu"))
    step.run(net, 16, torch.device("cpu"))
    assert type(net).__name__ == "TinyNet" and len(net.body) == 2
    assert parameter_count(record) == sum(p.numel() for p in net.parameters())
    assert all(p.grad.abs().sum() > 0 for p in net.parameters())


def test_the_networks_channels_are_checked_against_the_data(my_nets, shards):
    from train.data import check_data
    from train.schedule import plan_stages

    cfg = load_config("demo", [ARCH, "model.kwargs={width: 8}", "model.channels=[1, 1]", "data.noise_sigma=25"])
    with pytest.raises(ConfigError, match=re.escape("gives 3-channel inputs and 3-channel targets, but model.channels "
                                                    "is [1, 1]: set model.channels=[3, 3]")):
        check_data(cfg, plan_stages(cfg, 1), f"{shards}/train", None)


def test_a_network_by_import_path_trains_resumes_exactly_and_restores(shards, my_nets, tmp_path, capsys):
    """Fresh processes, as a user runs them: 2 steps straight, and 1 step + a resume for the second."""
    from tools.restore import main as restore

    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{my_nets}"}
    setup = [*(o for o in TINY_RUN if not o.startswith("model.")), ARCH, "model.kwargs={width: 8}",
             "train.ema_decay=0.9", "progressive.iters=[1,1]"]

    def train(out, *extra):
        cmd = [sys.executable, "train/main.py", f"data.train={shards}/train", f"data.val={shards}/val",
               f"output_dir={out}", *setup, *extra]
        proc = run(cmd, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = train(straight)
    assert "model_official.pth skipped: the official .pth is Restormer's format" in proc.stderr
    assert sorted(p.name for p in (straight / "export").iterdir()) == ["config.yaml", "model.safetensors"]
    assert [r["step"] for r in records(straight) if r.get("event") == "val"] == [2]
    train(split, "train.max_steps=1")
    resumed = train(split, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "step 1" in resumed.stdout
    for weights in ("export/model.safetensors", "checkpoints/step_00000002/model.safetensors",
                    "checkpoints/step_00000002/ema.safetensors"):
        a, b = read_state_dict(straight / weights), read_state_dict(split / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights

    random_png(tmp_path / "photo.png", 20, 28)
    proc = run([sys.executable, "-m", "tools.restore", str(tmp_path / "photo.png"), "-w", str(split),
                "-o", str(tmp_path / "restored")], **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "my_nets:TinyNet(width=8)" in proc.stderr and (tmp_path / "restored" / "photo.png").is_file()
    # Where the module cannot be imported, the tools say so in one line, with the fix.
    sys.modules.pop("my_nets", None)
    sys.path.remove(str(my_nets))
    assert restore([str(tmp_path / "photo.png"), "-w", str(split), "-o", str(tmp_path / "again")]) == 2
    error = capsys.readouterr().err.strip()
    config = split / "export" / "config.yaml"  # the export's own: it describes the weights restored
    assert error.startswith(f"error: {config}: model.arch=my_nets:TinyNet: no module named 'my_nets'")
    assert "PYTHONPATH" in error and "\n" not in error
