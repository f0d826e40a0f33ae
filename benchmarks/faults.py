"""Fault-injection table: every failure a training run must survive, injected for real.

    python benchmarks/faults.py [--kills 6] [--only SUBSTRING] [--keep]

Runs each scenario of tests/test_faults.py (kill -9 at random moments, SIGTERM/SIGUSR1, a killed or
frozen DDP rank, damaged and swapped shards, lying http servers, hostile indexes, the cache's folder,
pickle payloads, NaN losses, a full disk, damaged checkpoints, two runs on one folder, DeepSpeed on
another process count, every bad config and pack argument, image bombs, hostile YAML) against real
train/main.py processes, and prints: scenario | expected | observed | pass, then the message each bad
input gets. Takes about 13 minutes on 2 CPU cores. docs/reliability.md
explains the guarantees. Exit status 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import test_faults as faults  # noqa: E402
from data_shards.remote import printable  # noqa: E402


def pytest_node(*nodes: str) -> str:
    """A scenario that another test file already covers, run as those tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodes], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:]
    return f"`pytest {' '.join(nodes)}` passed"


def _shown(argument: str) -> str:
    """A command-line argument as the message table shows it: short, control characters escaped."""
    short = argument if len(argument) <= 60 else f"{argument[:40]}... ({len(argument)} characters)"
    return printable(short)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="kill -9 restarts on one run (default 6)")
    parser.add_argument("--only", default="", help="run the scenarios whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway on a failure)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="faults-"))
    with contextlib.redirect_stdout(sys.stderr):  # the packer's report is not part of the table
        data = faults.make_shards(work / "data")
    base = work / "base" / "run"
    proc = faults.launch(data, base, "train.max_steps=3", resume=None)
    assert proc.wait() == 0, proc.stderr[-3000:]
    two = work / "two" / "run"  # step_3 and step_6, with EMA: what the damaged-checkpoint rows start from
    proc = faults.launch(data, two, faults.EMA, resume=None)
    assert proc.wait() == 0, proc.stderr[-3000:]
    moments = [("checkpoint", "step", "validation")[i % 3] for i in range(args.kills)]
    messages: dict[str, list[tuple[list[str], int, str]]] = {}

    def bad_inputs(kind: str):
        def run(folder: Path) -> str:
            if kind == "config":
                seen = faults.scenario_bad_inputs(faults.config_cases(data, folder), faults.run_main)
                common = {*faults.TINY_RUN, f"data.train={data}/train", f"data.val={data}/val", f"output_dir={folder}/run"}
                seen = [([a for a in argv if a not in common], code, line) for argv, code, line in seen]
            else:
                src = folder / "src"
                src.mkdir()
                for i in range(2):
                    Image.fromarray(np.full((24, 24, 3), 40 * i, np.uint8)).save(src / f"img{i}.png")
                seen = faults.scenario_bad_inputs(faults.pack_cases(src, folder), faults.run_pack)
            messages[kind] = seen
            return f"{len(seen)} cases: each exits 2 with its one-line message, no traceback (listed below)"
        return run

    def hostile(kind: str):
        def run(folder: Path) -> str:
            if kind == "cache":
                messages[kind] = faults.scenario_cache_in_run_folder(data, folder)
                return f"{len(messages[kind])} cases: each exits 2 before any work, the run folder's files untouched"
            make = faults.hostile_indexes if kind == "index" else faults.escaping_indexes
            messages[kind] = faults.scenario_bad_indexes(data, make(data, folder), folder)
            return (f"{len(messages[kind])} cases: each exits 2 with its one-line message from train/main.py and "
                    "`python -m data_shards.index`, restormer-verify reports it; no traceback (listed below)")
        return run

    def hostile_configs(folder: Path) -> str:
        observed, seen = faults.scenario_hostile_configs(folder)
        messages["hostile config"] = [([_shown(a) for a in argv], code, line) for argv, code, line in seen]
        return observed

    scenarios = [
        (f"kill -9 x{args.kills} on one run", "each --resume auto restart continues from the newest complete "
         "checkpoint; step and lr continue; no partial checkpoint loaded; stale .tmp cleaned",
         lambda w: faults.scenario_kill9_resume(data, w, moments=tuple(moments), seed=1)),
        ("SIGTERM", "complete checkpoint within seconds, exit 0",
         lambda w: faults.scenario_signal(data, w, signal.SIGTERM)),
        ("SIGUSR1", "complete checkpoint within seconds, exit 0",
         lambda w: faults.scenario_signal(data, w, signal.SIGUSR1)),
        ("DDP x2: rank 1 kill -9", "rank 0 stopped, launcher exits non-zero in bounded time; 2-process resume works",
         lambda w: faults.scenario_ddp_rank_killed(data, w)),
        ("DDP x2: rank 1 frozen (SIGSTOP)", "rank 0 fails after train.dist_timeout_s (10 s), no endless hang",
         lambda w: faults.scenario_ddp_rank_hung(data, w, timeout_s=10, launcher_reaps=True)),
        ("shards: corrupt PNG, truncated tar, odd extension", "skipped, counted, shard+key logged; run completes",
         lambda w: faults.scenario_bad_shards(data, w, strict=False)),
        ("same shards, data.strict=true", "one-line error naming shard and key, exit 2, no hang",
         lambda w: faults.scenario_bad_shards(data, w, strict=True)),
        ("pickle members (.pyd/.pickle) in a shard", "never unpickled (payload would mkdir)",
         lambda w: pytest_node("tests/test_stream.py::test_pickle_members_are_never_unpickled")),
        ("pickle payload as optimizer.bin", "not run; resume refused with a clear error, exit 2",
         lambda w: faults.scenario_checkpoint_pickle(data, w, base, "optimizer.bin")),
        ("pickle payload as random_states_0.pkl", "not run; resume refused with a clear error, exit 2",
         lambda w: faults.scenario_checkpoint_pickle(data, w, base, "random_states_0.pkl")),
        ("pickle payload as model.init_weights .pth", "not run; clear config error, exit 2",
         lambda w: faults.scenario_checkpoint_pickle(data, w, base, "init_weights")),
        ("NaN loss injected (step 2, then 5+)", "skipped and counted; exit 3 after max_nonfinite=3 in a row; "
         "last good checkpoint intact", lambda w: faults.scenario_nonfinite(data, w)),
        ("disk full while saving (tmpfs)", "previous checkpoint valid, clear error, nothing half-written, exit 2",
         lambda w: faults.scenario_disk_full(data, w, base, "tmpfs")),
        ("write fails while saving (RLIMIT_FSIZE)", "previous checkpoint valid, clear error, exit 2",
         lambda w: faults.scenario_disk_full(data, w, base, "rlimit")),
        *[(f"newest checkpoint: {damage}", "--resume PATH refuses naming the file (exit 2); --resume auto resumes "
           "the previous one, says why, keeps the damaged one in checkpoints/rejected/",
           lambda w, d=damage: faults.scenario_damaged_newest(data, w, two, d)) for damage in faults.DAMAGES],
        ("DDP x2: random_states_1.pkl damaged (only rank 1 reads it)", "both ranks refuse --resume PATH; "
         "--resume auto heals on both", lambda w: faults.scenario_damage_seen_by_one_rank(data, w)),
        ("checkpoint without manifest (older version)", "resumed with a warning that it is unverified",
         lambda w: faults.scenario_checkpoint_without_manifest(data, w, base)),
        ("hostile trainer_state.json: valid JSON with wrong types or a missing key (hash recomputed, or no manifest)",
         "--resume PATH refused naming file and key (exit 2); --resume auto passes over it",
         lambda w: pytest_node("tests/test_checkpoint_files.py::test_a_state_file_with_wrong_types_is_refused_naming_the_key")),
        ("two runs started on one run folder", "the second exits 2 naming host/pid/start of the first, which "
         "is unharmed; a dead holder's lock is taken over", lambda w: faults.scenario_two_runs_one_folder(data, w)),
        ("DeepSpeed ZeRO-2 resume 2 -> 1 and 1 -> 2 processes", "refused before the model is built, naming both "
         "counts", lambda w: pytest_node("tests/test_deepspeed.py::test_zero2_gives_ddp_weights_and_resumes_its_checkpoint",
                                         "tests/test_deepspeed.py::test_zero2_checkpoint_of_one_process_is_refused_on_two")),
        ("shards swapped after packing for another data set's (one the same size, one larger)", "every sample "
         "of both skipped, counted and named with shard and key; run completes",
         lambda w: faults.scenario_swapped_shards(w, strict=False)),
        ("same swapped shards, data.strict=true", "one-line error naming shard and key, exit 2",
         lambda w: faults.scenario_swapped_shards(w, strict=True)),
        *[(f"lying http server for one shard: {what}", "the read fails after data.retries and the shard's samples "
           "are skipped and named (a 200: its head discarded, nothing skipped); no wrong byte trained",
           lambda w, lie=lie: faults.scenario_lying_server(data, w, lie)) for lie, what in faults.LIES.items()],
        ("hostile index.json (types, missing fields, 10^12 offset, a sample over the bound, terminal escapes or 256 "
         "characters in keys, split, command; deep nesting, 1 GiB, binary)", "exit 2, one line naming the field",
         hostile("index")),
        ("index entries listed twice or escaping the split ('../', absolute, URL)", "exit 2, one line naming the "
         "entry", hostile("escaping")),
        ("data.cache_dir = the run folder, inside it, or holding it", "exit 2 before any work", hostile("cache")),
        ("foreign files in data.cache_dir (remote shards, eviction)", "only the cache's own copies are deleted",
         lambda w: faults.scenario_foreign_files_in_cache(data, w)),
        ("hostile cache manifest.txt (../ and absolute names, a link) or cache subfolder (a link)", "the names and "
         "the linked manifest ignored with a warning, nothing outside the cache deleted; the linked folder refused",
         lambda w: pytest_node("tests/test_remote.py::test_a_manifest_naming_files_outside_the_cache_deletes_none_of_them",
                               "tests/test_remote.py::test_a_linked_manifest_is_ignored_and_a_linked_cache_folder_refused")),
        ("every bad config value", "exit 2, message names the key and the fix", bad_inputs("config")),
        ("every bad restormer-pack argument", "exit 2, message names the problem", bad_inputs("pack")),
        # Hostile inputs of issue 28: a named skip or one line of error, never a traceback or a blown memory.
        ("image bombs (PNG, 16-bit PNG, TIFF, npy: ~200 bytes claiming 14000x14000) in restormer-pack",
         "each refused from its header, skipped and listed; the good images packed (exit 0); --strict: exit 2, "
         "one line", faults.scenario_image_bombs_pack),
        ("the same image bombs in tools.restore", "each skipped and named, the good images restored, exit 1",
         faults.scenario_image_bombs_restore),
        ("hostile config files and overrides: broken, 20000-deep, binary, alias bomb, 2 MB; NaN, negative, "
         "huge numbers", "exit 2 with one line each, refused in under a second", hostile_configs),
    ]

    rows, failed = [], 0
    for i, (name, expected, run) in enumerate(scenarios):
        if args.only and args.only not in name:
            continue
        folder = work / f"s{i:02d}"
        folder.mkdir()
        started = time.monotonic()
        try:
            observed, verdict = run(folder), "PASS"
        except pytest.skip.Exception as skip:
            observed, verdict = f"skipped: {skip.msg}", "SKIP"
        except Exception as err:  # noqa: BLE001 - a failed scenario is a row of the table, not a crash
            observed, verdict = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}", "FAIL"
            failed += 1
            traceback.print_exc()
        rows.append((name, expected, observed, verdict, time.monotonic() - started))
        print(f"[{verdict}] {name} ({rows[-1][4]:.0f} s)", file=sys.stderr, flush=True)

    print("| scenario | expected | observed | pass | s |\n|---|---|---|---|---|")
    for name, expected, observed, verdict, seconds in rows:
        print(f"| {name} | {expected} | {observed.replace('|', '/')} | {verdict} | {seconds:.0f} |")
    for kind, seen in messages.items():
        print(f"\n{kind} mistakes and their messages:\n\n| arguments | exit | message |\n|---|---|---|")
        for argv, code, line in seen:
            shown = " ".join(argv).replace(str(work), "<work>")
            print(f"| `{shown}` | {code} | {line.replace(str(work), '<work>').replace('|', '/')[:220]} |")
    if failed or args.keep:
        print(f"\nwork folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
