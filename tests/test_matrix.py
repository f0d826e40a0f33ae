"""Every recipe x every launch mode (benchmarks/matrix.py): each cell trains, validates, checkpoints,
resumes and exports weights that load elsewhere, or is refused up front; none crashes."""

import importlib
import json
import math
import sys

import pandas as pd
import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow

sys.path.insert(0, str(ROOT / "benchmarks"))
matrix = importlib.import_module("matrix")


def _spandrel_loads() -> bool:
    try:
        importlib.import_module("spandrel")
    except Exception:  # absent, or its torchvision does not load against this torch build
        return False
    return True


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """The whole matrix, once: one launch per mode, every recipe's cell inside it."""
    out = tmp_path_factory.mktemp("matrix")
    proc = run([sys.executable, "benchmarks/matrix.py", "--out", str(out), "--json", str(out / "cells.json")],
               timeout=1500)
    assert (out / "cells.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # the table, in the test log
    found = [matrix.Cell(**c) for c in json.loads((out / "cells.json").read_text())]
    return out, {(c.mode, c.recipe): c for c in found}, proc


def test_every_cell_runs_or_is_refused_up_front(cells):
    _, found, proc = cells
    recipes = sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.yaml"))
    assert sorted({r for _, r in found}) == recipes and sorted({m for m, _ in found}) == sorted(matrix.MODES)
    failed = [f"{m}/{r}: {c.message[:300]}" for (m, r), c in found.items() if c.status != "ok" and c.status != "refused"]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0
    for (mode, recipe), c in found.items():
        if c.status == "refused":
            # The one refusal on a CPU: accelerate gives fp16 no autocast or GradScaler there.
            assert mode == "ddp_fp16" and "fp16 (--mixed_precision / train.mixed_precision)" in c.message
            continue
        assert math.isfinite(c.loss) and math.isfinite(c.loss_resumed), (mode, recipe)
        assert c.val_psnr is not None and c.val_psnr > 5, (mode, recipe)
        assert c.export.startswith("Restormer"), (mode, recipe, c.export)
        if _spandrel_loads():
            assert "= spandrel" in c.export, (mode, recipe, c.export)


def test_precisions_train_the_same_model(cells):
    """At equal seeds and data the loss after N steps stays close to DDP fp32's; ZeRO-3 computes ZeRO-2's."""
    _, found, _ = cells
    for (mode, recipe), c in found.items():
        reference = found["ddp_fp32", recipe].loss
        if c.status != "ok" or mode == "1proc_fp32":  # one process sees other data than two
            continue
        bound = 0.01 if mode.endswith("fp32") or mode.endswith("fp16") else 0.05
        assert abs(c.loss - reference) <= bound * reference, (mode, recipe, c.loss, reference)
        if mode == "zero3_bf16":
            assert c.loss == pytest.approx(found["zero2_bf16", recipe].loss, rel=1e-3)


def test_validation_scores_as_the_evaluate_tool_does(cells, tmp_path):
    """One scoring function: evaluating the exported run gives the trainer's last validation figure."""
    out, found, _ = cells
    for recipe, kind in (("deraining", "paired_rgb"), ("single_image_defocus", "paired_rgb16")):
        run_dir = out / "runs" / "1proc_fp32" / recipe
        csv = tmp_path / f"{recipe}.csv"
        proc = run([sys.executable, "-m", "tools.evaluate", "-w", str(run_dir), "--shards",
                    str(out / "data" / "shards" / kind / "val" / "val"), "--csv", str(csv)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert pd.read_csv(csv)["psnr"].mean() == pytest.approx(found["1proc_fp32", recipe].val_psnr, abs=1e-4)
