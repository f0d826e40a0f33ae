"""A run's charts and sample grids as local files, for anyone without W&B.

    python -m tools.report runs/demo            # writes runs/demo/report/
    python -m tools.report runs/demo -o /tmp/r --samples 5

Reads RUN_DIR/metrics.jsonl and RUN_DIR/samples/step_*.png, writes PNG charts (L1/L2 loss, validation
PSNR and SSIM against the degraded input's, learning rate, images/s, data-wait share; progressive
stage boundaries marked on each), an overview.png with all of them, copies of the newest sample grids
and a report.md that shows everything with a summary table.
A resumed run may log a step twice: the later record wins.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and no GUI toolkit is imported
import matplotlib.pyplot as plt  # noqa: E402


class ReportError(ValueError):
    pass


@dataclass
class RunMetrics:
    train: list[dict[str, Any]] = field(default_factory=list)  # training records, by step
    val: list[dict[str, Any]] = field(default_factory=list)  # validation records, by step
    stages: list[dict[str, Any]] = field(default_factory=list)  # stage starts: step, stage, patch, batch
    end: dict[str, Any] | None = None
    bad_lines: int = 0


def read_metrics(path: Path) -> RunMetrics:
    """Parses metrics.jsonl; unparsable lines (a run killed mid-write) are counted, not fatal."""
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file (is {path.parent} a run folder written by train.main?)")
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    stages: dict[int, dict] = {}
    run = RunMetrics()
    last_step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            run.bad_lines += 1
            continue
        event = record.get("event")
        if event is None and "step" in record:
            train[record["step"]] = record
            last_step = record["step"]
        elif event == "val":
            val[record["step"]] = record
        elif event == "stage":
            # The stage starts after the last logged step (exact when the record carries its step).
            step = record.get("step", last_step)
            stages[step] = {**record, "step": step}
        elif event == "end":
            run.end = record
    run.train = [train[s] for s in sorted(train)]
    run.val = [val[s] for s in sorted(val)]
    run.stages = [stages[s] for s in sorted(stages)]
    return run


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged `key`."""
    logged = [r for r in records if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in logged], [float(r[key]) for r in logged]


@dataclass(frozen=True)
class Line:
    records: list[dict]
    key: str
    label: str
    style: str  # matplotlib format string


@dataclass(frozen=True)
class Chart:
    title: str
    ylabel: str
    lines: list[Line]
    log_y: bool = False


def _charts(run: RunMetrics) -> dict[str, Chart]:
    t, v = run.train, run.val
    return {
        "loss": Chart("Training loss", "loss", [Line(t, "l1", "L1", "-"), Line(t, "l2", "L2 (MSE)", "-")], log_y=True),
        "psnr": Chart("Validation PSNR", "dB", [Line(v, "val/psnr", "restored", "o-"),
                                               Line(v, "val/psnr_y", "restored (Y)", "s-"),
                                               Line(v, "val/psnr_degraded", "degraded input", "--")]),
        "ssim": Chart("Validation SSIM", "SSIM", [Line(v, "val/ssim", "restored", "o-"),
                                                 Line(v, "val/ssim_y", "restored (Y)", "s-"),
                                                 Line(v, "val/ssim_degraded", "degraded input", "--")]),
        "lr": Chart("Learning rate", "lr", [Line(t, "lr", "lr", "-")]),
        "throughput": Chart("Throughput", "images/s", [Line(t, "images_per_s", "all processes", "-"),
                                                       Line(t, "images_per_s_per_proc", "per process", ":")]),
        "data_wait": Chart("Share of step time waiting for data", "share", [
            Line(t, "data_wait_share", "mean over processes", "-"),
            Line(t, "data_wait_share_max", "slowest process", ":")]),
    }


def _draw(ax, run: RunMetrics, chart: Chart) -> None:
    drawn = 0
    log = chart.log_y
    for line in chart.lines:
        steps, values = _series(line.records, line.key)
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            continue
        ax.plot(steps, values, line.style, label=line.label, markersize=3, linewidth=1.2)
        drawn += 1
        if log and min(finite) <= 0:
            log = False  # a log axis cannot show zeros (e.g. a loss that reached exactly 0)
    for stage in run.stages:
        ax.axvline(stage["step"], color="grey", linestyle=":", linewidth=0.8)
        ax.text(stage["step"], 0.97, f"stage {stage.get('stage', '?')}: {stage.get('patch', '?')} px",
                transform=ax.get_xaxis_transform(), rotation=90, va="bottom", ha="right", fontsize=7, color="grey",
                rotation_mode="anchor")
    if drawn == 0:
        ax.text(0.5, 0.5, "no records", transform=ax.transAxes, ha="center", va="center", color="grey")
    elif log:
        ax.set_yscale("log")
    if drawn > 1:
        ax.legend(fontsize=8)
    ax.set_title(chart.title)
    ax.set_xlabel("step")
    ax.set_ylabel(chart.ylabel)
    ax.grid(alpha=0.3)


def write_charts(run: RunMetrics, out_dir: Path) -> list[Path]:
    """One PNG per chart plus overview.png with all of them."""
    charts = _charts(run)
    paths = []
    for name, chart in charts.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
        _draw(ax, run, chart)
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8), layout="constrained")
    for ax, chart in zip(axes.flat, charts.values()):
        _draw(ax, run, chart)
    paths.append(out_dir / "overview.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def copy_samples(run_dir: Path, out_dir: Path, count: int) -> list[Path]:
    """The newest `count` sample grids (degraded | restored | target), copied beside the charts."""
    grids = sorted((run_dir / "samples").glob("step_*.png"))[-count:] if count > 0 else []
    copies = []
    for grid in grids:
        target = out_dir / "samples" / grid.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, target)
        copies.append(target)
    return copies


def summary_rows(run: RunMetrics) -> list[tuple[str, str]]:
    rows = []
    if run.train:
        last = run.train[-1]
        rows += [("last logged step", f"{last['step']} (stage {last.get('stage')}, {last.get('patch')}px, "
                                      f"batch {last.get('batch')} x accum {last.get('accum')})"),
                 ("loss / L1 / L2", " / ".join(f"{last.get(k, float('nan')):.4g}" for k in ("loss", "l1", "l2"))),
                 ("learning rate", f"{last.get('lr', float('nan')):.3g}"),
                 ("images/s (all processes)", f"{last.get('images_per_s', float('nan')):.3g}"),
                 ("data-wait share", f"{last.get('data_wait_share', float('nan')):.1%}"),
                 ("peak memory (GB, max over the run)",
                  f"{max((r['peak_mem_gb_max'] for r in run.train if 'peak_mem_gb_max' in r), default=math.nan):.2f}"),
                 ("skipped (non-finite) steps", str(last.get("skipped_steps", 0)))]
    if run.val:
        last = run.val[-1]
        rows.append(("last validation", f"step {last['step']}: PSNR {last.get('val/psnr', float('nan')):.2f} dB "
                                        f"(input {last.get('val/psnr_degraded', float('nan')):.2f}), "
                                        f"SSIM {last.get('val/ssim', float('nan')):.4f}"))
        best = max(run.val, key=lambda r: r.get("val/psnr_y", r.get("val/psnr", -math.inf)))
        key = "val/psnr_y" if "val/psnr_y" in best else "val/psnr"
        rows.append(("best validation PSNR" + (" (Y)" if key.endswith("_y") else ""), f"{best[key]:.2f} dB at step {best['step']}"))
    if run.end is not None:
        rows.append(("finished", "stopped by " + run.end["stopped_by"] if run.end.get("stopped_by")
                     else f"at step {run.end.get('step')}"))
    return rows


def write_markdown(run_dir: Path, run: RunMetrics, charts: list[Path], samples: list[Path], out_dir: Path) -> Path:
    lines = [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in summary_rows(run)]
    lines += ["", "## Charts", ""]
    lines += [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in charts if p.stem != "overview"]
    if samples:
        lines += ["", "## Latest sample grids (degraded | restored | target)", ""]
        for path in reversed(samples):
            lines += [f"step {int(path.stem.split('_')[1])}:", "", f"![{path.stem}]({path.relative_to(out_dir).as_posix()})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, samples: int = 3) -> dict[str, Any]:
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    run = read_metrics(run_dir / "metrics.jsonl")
    if not run.train and not run.val:
        raise ReportError(f"{run_dir / 'metrics.jsonl'}: no training or validation records yet")
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(run, out)
    grids = copy_samples(run_dir, out, samples)
    markdown = write_markdown(run_dir, run, charts, grids, out)
    return {"run": run, "charts": charts, "samples": grids, "markdown": markdown}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (runs/NAME) holding metrics.jsonl")
    parser.add_argument("-o", "--output", default=None, metavar="DIR", help="where to write the report (default RUN_DIR/report)")
    parser.add_argument("--samples", type=int, default=3, metavar="N", help="newest sample grids to include (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = build_report(args.run_dir, args.output, args.samples)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run: RunMetrics = result["run"]
    for name, value in summary_rows(run):
        print(f"{name:38s} {value}")
    if run.bad_lines:
        print(f"note: {run.bad_lines} unparsable line(s) in metrics.jsonl were skipped")
    print(f"charts: {', '.join(p.name for p in result['charts'])}")
    print(f"sample grids: {len(result['samples'])}; report: {result['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
