#!/usr/bin/env bash
# Multi-node pretraining under Slurm, requeued after a preemption or a crash.
#
#   sbatch --nodes=4 slurm/pretrain.sh [pretrain.py arguments, e.g. --set train.max_steps=1000]
#
# One srun task per node runs slurm/node_launch.sh, which starts torchrun with
# GPUS_PER_NODE ranks; all nodes meet at the first host of the allocation
# (c10d rendezvous). Variables (environment, or `sbatch --export=ALL,CONFIG=...`):
#   CONFIG         run config                       (configs/small.yaml)
#   RUN_DIR        train.run_dir, on a filesystem every node shares (runs/<job name>)
#   GPUS_PER_NODE  ranks per node                   ($SLURM_GPUS_ON_NODE, else 8)
#   NNODES         nodes                            ($SLURM_JOB_NUM_NODES)
#   MASTER_PORT    rendezvous port                  (29500 + job id mod 1000)
#   VENV           environment with liquid_dist     (.venv)
#   TORCHRUN       per-node launcher                ($VENV/bin/torchrun)
#   RDZV_TIMEOUT   seconds to wait for every node at the rendezvous (600)
# Without GPUs (a CPU cluster): sbatch --gpus-per-node=0 --cpus-per-task=1 with
# GPUS_PER_NODE=1 (--gres=none is refused while the #SBATCH GPU line stands).
#
# Before the ranks start, `python -m liquid_dist.train.requeue check` loads the
# config (a bad one ends the job with status 2). After they exit, `... decide`
# reads RUN_DIR/EXIT, rank 0's exit record, and the job: ends with 0 when the
# run finished; is requeued after a preemption (120 s before the time limit
# Slurm sends USR1, the ranks save a checkpoint and exit 75; a SIGTERM
# preemption the same) and after a crash (no record: a rank's exception, a
# killed rank, a lost node); ends with the run's status when retrying cannot
# help (2 bad input, 3 non-finite loss); ends with 4 after more than
# train.max_restarts_without_progress crashes in a row without a new
# checkpoint. A requeued job resumes from RUN_DIR's newest valid checkpoint
# (--resume auto). Logs append across requeues (--open-mode=append).
# docs/training.md, "Exit statuses and requeue".
#SBATCH --job-name=liquid-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${SLURM_JOB_ID:?run this script with sbatch}"
export CONFIG="${CONFIG:-configs/small.yaml}"
export RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME:-liquid-pretrain}}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
export NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
export MASTER_PORT="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
export VENV="${VENV:-.venv}"
export TORCHRUN="${TORCHRUN:-$VENV/bin/torchrun}"
# sed, not head: head would close the pipe early and pipefail would fail the script
HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
export HEAD_NODE

echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x" \
     "$GPUS_PER_NODE rank(s), rendezvous $HEAD_NODE:$MASTER_PORT, config $CONFIG, run $RUN_DIR"
mkdir -p "$RUN_DIR"
REQUEUE=("$VENV/bin/python" -m liquid_dist.train.requeue)
RUN_ARGS=(--config "$CONFIG" --set "train.run_dir=$RUN_DIR" "$@")
verdict=0
"${REQUEUE[@]}" check "${RUN_ARGS[@]}" || verdict=$?
if [ "$verdict" != 0 ]; then
    echo "$(date -Is) not started: the run config is refused (status $verdict)"
    exit "$verdict"
fi

status=0
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash slurm/node_launch.sh "$@" || status=$?

echo "$(date -Is) training exited with status $status"
"${REQUEUE[@]}" decide "$status" "${RUN_ARGS[@]}" || verdict=$?
if [ "$verdict" = 75 ]; then
    echo "$(date -Is) requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$verdict"
