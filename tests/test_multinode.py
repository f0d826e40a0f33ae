"""Multi-node without a cluster: `accelerate launch` as machines 0 and 1 of a 2-node job on 127.0.0.1
(one CPU process each), by hand and through the SLURM script with stand-ins for srun/scontrol/scancel."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, doc_command, free_port, pack_images, recipe_args, records, run, with_flags

pytestmark = pytest.mark.slow

# Test-sized: world 1 accumulates 2 micro-batches where world 2 takes one each (global batch 4).
SMALL = ["train.reference_world_size=2", "train.ckpt_every=2", "data.mixup=false", "tracking.wandb=offline"]

# Runs train/main.py's main() unchanged, and records the grey levels (= which images) of the
# training targets each rank received: the data set's images are flat, one level each.
PROBE = """
import json, os, sys
sys.path.insert(0, {root!r})
import train.trainer
from train.main import main

original = train.trainer.train_batches

def recording(*args, **kwargs):
    for batch in original(*args, **kwargs):
        levels = sorted({{round(v) for v in (batch["target"] * 255).flatten().tolist()}})
        with open(os.path.join({out!r}, "rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
            f.write(json.dumps(levels) + "\\n")
        yield batch

train.trainer.train_batches = recording
sys.exit(main())
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pack_images(tmp_path_factory.mktemp("multinode"), flat=True)


def two_nodes(argvs: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv in argvs]
    done = []
    for argv, proc in zip(argvs, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr))
    return done


def test_two_node_job_on_one_machine_and_resume_across_node_counts(shards, tmp_path):
    out, seen = tmp_path / "run", tmp_path / "seen"
    seen.mkdir()
    one_node = with_flags(doc_command("--num_processes 1 --mixed_precision bf16"), main_process_port=free_port())
    first = run(one_node + recipe_args(shards, out, *SMALL, "train.max_steps=2"), timeout=300)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "global batch 4 kept as 2 x 2 accum x 1 proc = 4" in first.stdout

    # A checkpoint of the 1-node run resumes on 2 nodes ...
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(root=str(ROOT), out=str(seen)))
    port = free_port()
    nodes = []
    for machine in (doc_command("--machine_rank 0"), doc_command("--machine_rank 1")):
        argv = with_flags(machine, num_processes=2, main_process_ip="127.0.0.1", main_process_port=port)
        argv[argv.index("train/main.py")] = str(probe)
        nodes.append(argv + ["--resume", "auto"] + recipe_args(shards, out, *SMALL, "train.max_steps=4"))
    node0, node1 = two_nodes(nodes)
    assert node0.returncode == 0 and node1.returncode == 0, node0.stderr[-3000:] + node1.stderr[-3000:]
    assert "resumed from" in node0.stdout and "at step 2" in node0.stdout
    assert "running the recipe as written on 2 process(es)" in node0.stdout  # its reference world size
    assert "weights identical on every process: yes" in node0.stdout

    # ... and the 2-node job's checkpoint resumes on 1 node.
    last = run(with_flags(one_node, main_process_port=free_port()) + ["--resume", "auto"]
               + recipe_args(shards, out, *SMALL), timeout=300)
    assert last.returncode == 0, last.stderr[-4000:]
    assert "at step 4" in last.stdout and "2 x 2 accum x 1 proc = 4" in last.stdout

    recs = records(out)
    assert [r["step"] for r in recs if "event" not in r] == [1, 2, 3, 4, 5, 6]
    assert [(r["batch"], r["accum"]) for r in recs if r.get("event") == "stage"] == [(2, 2), (2, 1), (2, 1), (2, 2)]

    # The nodes read disjoint parts of the data (images are told apart by their grey level). The 1-node
    # run drew positions 0-7 (2 steps x 4): epoch 0 of the 8 training images; the 2-node run's 2 steps
    # x 4 are exactly epoch 1, re-cut over the new process count: every image once.
    levels = [{v for line in (seen / f"rank{r}.jsonl").read_text().splitlines() for v in json.loads(line)}
              for r in (0, 1)]
    assert levels[0] and levels[1] and not levels[0] & levels[1]
    assert levels[0] | levels[1] <= {10 + 20 * i for i in range(10)} and len(levels[0] | levels[1]) == 8

    # One tracker run holds both nodes' figures: rank 0 logged them, resumed runs reuse its id.
    two_node_steps = [r for r in recs if r.get("step") in (3, 4) and "event" not in r]
    assert all({"peak_mem_gb/rank0", "peak_mem_gb/rank1"} <= r.keys() for r in two_node_steps)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(runs) == 3 and len(run_ids) == 1  # one start per launch, all the same run
    assert b"peak_mem_gb/rank1" in (runs[1] / f"run-{run_ids.pop()}.wandb").read_bytes()  # the 2-node start


FAKE_SRUN = """#!/bin/bash
# Stand-in for srun: start the task once per node, as SLURM does on each node of the job.
echo "srun $*" >> "$FAKE_SLURM_DIR/log"
while [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
    pids+=("$!")
    echo "$!" >> "$FAKE_SLURM_DIR/tasks"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""
FAKE_SCANCEL = """#!/bin/bash
# Stand-in for scancel --signal=SIG JOB: signal every process of the job's steps (slurmstepd
# signals the step's whole process tree), not the batch shell.
echo "scancel $*" >> "$FAKE_SLURM_DIR/log"
tree() { echo "$1"; for child in $(pgrep -P "$1"); do tree "$child"; done; }
for task in $(cat "$FAKE_SLURM_DIR/tasks"); do
    for pid in $(tree "$task"); do kill -s "${1#--signal=}" "$pid" 2>/dev/null || true; done
done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM_DIR/log"
if [ "$1 $2" = "show hostnames" ]; then tr ',' '\\n' <<< "$3"; fi
"""


def test_slurm_script_checkpoints_on_the_time_limit_signal_requeues_and_resumes(shards, tmp_path):
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    argv = doc_command("sbatch --nodes")
    options = dict(zip(argv[1:5:2], argv[2:5:2]))
    assert options == {"--nodes": "2", "--gpus-per-node": "8"} and argv[5] == "launch/slurm/train.sbatch"
    out = tmp_path / "run"
    script = ["bash", argv[5], *argv[6:], *recipe_args(shards, out, "train.reference_world_size=2",
                                                          "progressive.iters=[30,30]", "val.every=1000",
                                                          "train.ckpt_every=1000")]
    # What sbatch would set; one CPU process per node instead of 8 GPUs.
    env = child_env(SLURM_JOB_ID="4242", SLURM_NNODES=options["--nodes"], SLURM_GPUS_PER_NODE="1",
                    SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", MAIN_PORT=str(free_port()),
                    FAKE_SLURM_DIR=str(fake), PATH=f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")

    job = subprocess.Popen(script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and job.poll() is None and not (metrics.exists() and metrics.read_text().count('"loss"')):
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    stdout, stderr = job.communicate(timeout=180)
    assert job.returncode == 0, stderr[-4000:]
    assert "stopped by SIGUSR1" in stdout and "requeueing job 4242" in stdout
    log = (fake / "log").read_text()
    assert "scancel --signal=USR1 4242" in log and "scontrol requeue 4242" in log
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    stopped_at = json.loads((saved[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < 60

    # SLURM restarts the requeued job: same script, same arguments.
    (fake / "tasks").unlink()
    restarted = subprocess.run(script, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"},
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    assert f"at step {stopped_at}" in restarted.stdout and "steps: 60" in restarted.stdout
    assert "running the recipe as written on 2 process(es)" in restarted.stdout
    assert (fake / "log").read_text().count("scontrol requeue") == 1
