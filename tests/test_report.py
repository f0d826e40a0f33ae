"""python -m tools.report: charts, stage boundaries, resumed runs, sample grids, errors."""

import json

import numpy as np
import pytest
from PIL import Image

from tools.report import main, read_metrics


def train_record(step, stage, patch, batch, loss):
    return {"time": 1.0 + step, "step": step, "stage": stage, "patch": patch, "batch": batch, "accum": 1,
            "lr": 3e-4 * (1 - step / 200), "loss": loss, "l1": loss, "l2": loss**2 / 2, "grad_norm": 0.5,
            "skipped_steps": 0, "images_per_s": 10.0 + stage, "images_per_s_per_proc": 5.0 + stage / 2,
            "pixels_per_s": 1e5, "data_wait_share": 0.1, "data_wait_share_max": 0.2, "peak_mem_gb_max": 1.5}


def val_record(step, psnr):
    return {"event": "val", "step": step, "val/psnr": psnr, "val/ssim": 0.8, "val/psnr_degraded": 20.0,
            "val/ssim_degraded": 0.5, "val/images": 4, "best": psnr}


def make_run(run_dir, broken_tail=False):
    lines = [{"event": "stage", "stage": 0, "patch": 64, "batch": 4, "accum": 1}]
    lines += [train_record(s, 0, 64, 4, 0.1 - s / 2000) for s in range(10, 60, 10)]
    lines += [val_record(50, 25.0), {"event": "stage", "stage": 1, "patch": 96, "batch": 2, "accum": 1}]
    lines += [train_record(s, 1, 96, 2, 0.07) for s in range(60, 90, 10)]
    # A resume from the step-60 checkpoint logs steps 70 and 80 again; those later records win.
    lines += [train_record(s, 1, 96, 2, 0.05) for s in range(70, 110, 10)]
    lines += [val_record(100, 26.5), {"event": "end", "step": 100, "stopped_by": None}]
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 110, "lo' if broken_tail else ""))
    for step in (25, 50, 75, 100):
        grid = np.full((20, 60, 3), step, np.uint8)
        (run_dir / "samples").mkdir(exist_ok=True)
        Image.fromarray(grid).save(run_dir / "samples" / f"step_{step:08d}.png")


def test_metrics_are_read_with_stages_and_resumed_steps(tmp_path):
    make_run(tmp_path / "run", broken_tail=True)
    run = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in run.train] == list(range(10, 110, 10))
    assert run.train[6]["loss"] == 0.05  # step 70 from after the resume
    assert [(s["step"], s["patch"]) for s in run.stages] == [(0, 64), (50, 96)]
    assert [v["step"] for v in run.val] == [50, 100]
    assert run.end["step"] == 100
    assert run.bad_lines == 1


def test_report_writes_charts_samples_and_markdown(tmp_path, capsys):
    make_run(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--samples", "2"]) == 0
    out_dir = tmp_path / "run" / "report"
    for name in ("loss", "psnr", "ssim", "lr", "throughput", "data_wait", "overview"):
        with Image.open(out_dir / f"{name}.png") as chart:
            assert chart.width > 300 and chart.height > 200
            # Something is drawn: not a blank canvas.
            assert len(np.unique(np.asarray(chart.convert("L")))) > 10
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["step_00000075.png", "step_00000100.png"]
    markdown = (out_dir / "report.md").read_text()
    assert "![loss](loss.png)" in markdown and "![step_00000100](samples/step_00000100.png)" in markdown
    assert "26.50 dB at step 100" in markdown
    printed = capsys.readouterr().out
    assert "last validation" in printed and "step 100: PSNR 26.50 dB (input 20.00)" in printed


def test_report_without_validation_or_samples(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(train_record(10, 0, 64, 4, 0.1)) + "\n")
    assert main([str(run_dir), "-o", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "psnr.png").is_file()
    assert not (tmp_path / "elsewhere" / "samples").exists()


@pytest.mark.parametrize("content,message", [(None, "no metrics file"), ("", "no training or validation records")])
def test_a_folder_that_is_no_run_is_explained(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    assert main([str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
