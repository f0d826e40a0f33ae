#!/bin/bash
# One node's part of a SLURM job: train.sbatch runs it once per node through srun, with
# MAIN_ADDR, MAIN_PORT, NUM_MACHINES, NUM_PROCESSES and ACCELERATE_CONFIG exported.
set -euo pipefail

# The launcher and torchrun's agent would die on USR1 (its default action); ignoring it here is
# inherited by them, while the training processes install their own handler and checkpoint on it.
trap '' USR1
exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NUM_MACHINES" --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    train/main.py --resume auto "$@"
