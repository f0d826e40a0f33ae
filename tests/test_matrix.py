"""Every recipe x every launch mode (benchmarks/matrix.py): each cell trains, validates, checkpoints,
resumes and exports weights that load elsewhere, or is refused up front; none crashes.

One launch per mode (a test each), every recipe's cell inside it; the comparisons across modes use
the cells the mode tests left in the module's cache (run in file order)."""

import importlib
import math
import sys

import pandas as pd
import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow

sys.path.insert(0, str(ROOT / "benchmarks"))
matrix = importlib.import_module("matrix")
RECIPES = sorted(p.stem for p in (ROOT / "train" / "configs").glob("*.yaml"))
_CELLS: dict[str, dict[str, "matrix.Cell"]] = {}


def _spandrel_loads() -> bool:
    try:
        importlib.import_module("spandrel")
        importlib.import_module("spandrel_extra_arches")
    except Exception:  # absent, or its torchvision does not load against this torch build
        return False
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    return out, matrix.make_data(out / "data")


def cells_of(mode: str, work) -> dict[str, "matrix.Cell"]:
    """One launch of `mode` running every recipe's cell (once per test session)."""
    if mode not in _CELLS:
        out, data = work
        found = matrix.run_matrix([mode], RECIPES, 2, out, 1200, data, cpu=True)
        _CELLS[mode] = {c.recipe: c for c in found}
    return _CELLS[mode]


@pytest.mark.timeout(1300)
@pytest.mark.parametrize("mode", list(matrix.MODES))
def test_every_recipe_runs_or_is_refused_up_front(mode, work):
    found = cells_of(mode, work)
    assert sorted(found) == RECIPES
    failed = [f"{r}: {c.message[:400]}" for r, c in found.items() if c.status not in ("ok", "refused")]
    assert not failed, "\n".join(failed)
    for recipe, c in found.items():
        if c.status == "refused":
            # The refusals on a CPU: accelerate gives fp16 no autocast or GradScaler there, and
            # DeepSpeed has fp16 kernels only on CPUs with AVX512-FP16/AMX-FP16.
            assert mode in ("ddp_fp16", "zero2_fp16") and "fp16 (--mixed_precision / train.mixed_precision)" in c.message
            continue
        assert math.isfinite(c.l1) and math.isfinite(c.l1_resumed), recipe
        assert c.val_psnr is not None and c.val_psnr > 5, recipe
        assert c.export.startswith("Restormer"), (recipe, c.export)
        if _spandrel_loads():
            assert "= spandrel" in c.export, (recipe, c.export)


@pytest.mark.timeout(3000)
def test_precisions_train_the_same_model(work):
    """At equal seeds and data the training L1 after N steps stays close to DDP fp32's; ZeRO-3 computes ZeRO-2's."""
    reference = cells_of(matrix.REFERENCE_MODE, work)
    for mode in matrix.MODES:
        if mode == "1proc_fp32":  # one process sees other data than two
            continue
        # bf16 keeps 8 significant bits, fp16 11 (DeepSpeed fp16 runs on CPUs with AVX512-FP16, where its
        # L1 after N steps sat 1.1% from fp32's), fp32 only differs by the order of sums.
        bound = {"bf16": 0.05, "fp16": 0.02}.get(mode.rsplit("_", 1)[-1], 0.01)
        for recipe, c in cells_of(mode, work).items():
            if c.status == "ok":
                assert abs(c.l1 - reference[recipe].l1) <= bound * reference[recipe].l1, (mode, recipe)
    for recipe, c in cells_of("zero3_bf16", work).items():
        assert c.l1 == pytest.approx(cells_of("zero2_bf16", work)[recipe].l1, rel=1e-3), recipe


@pytest.mark.timeout(1300)
def test_validation_scores_as_the_evaluate_tool_does(work, tmp_path):
    """One scoring function: evaluating the exported run gives the trainer's last validation figure."""
    out, data = work
    found = cells_of("1proc_fp32", work)
    for recipe, kind in (("deraining", "paired_rgb"), ("single_image_defocus", "paired_rgb16")):
        csv = tmp_path / f"{recipe}.csv"
        proc = run([sys.executable, "-m", "tools.evaluate", "-w", str(out / "runs" / "1proc_fp32" / recipe),
                    "--shards", data[kind]["val"], "--csv", str(csv)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert pd.read_csv(csv)["psnr"].mean() == pytest.approx(found[recipe].val_psnr, abs=1e-4)
