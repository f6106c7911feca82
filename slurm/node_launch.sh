#!/usr/bin/env bash
# One node's share of slurm/pretrain.sh (run by srun, one task per node):
# torchrun with GPUS_PER_NODE ranks joining the c10d rendezvous on HEAD_NODE.
#
# Signals: torchrun would die of a SIGUSR1 (it has no handler for it), so it is
# started with USR1 ignored, and this script forwards USR1 to the training
# processes (torchrun's children) itself, until they are gone; SIGTERM goes to torchrun, which
# passes it on to its ranks. Either way the ranks checkpoint and stop
# (liquid_dist/train/signals.py). Arguments are passed on to launch/pretrain.py.
#
# Hangs: local rank 0 starts the node's watchdog itself (liquid_dist.train.watchdog,
# as under any launcher); when it stops the node's ranks, torchrun fails and the
# job ends as after a crash.
set -euo pipefail
: "${NNODES:?}" "${GPUS_PER_NODE:?}" "${HEAD_NODE:?}" "${MASTER_PORT:?}"
: "${CONFIG:?}" "${RUN_DIR:?}" "${TORCHRUN:?}" "${SLURM_JOB_ID:?}"
# how long torchrun lets its ranks checkpoint after passing on a SIGTERM
# before it kills them (recent torch reads it; Slurm's KillWait/GraceTime bound it too)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
# how long torchrun waits for all NNODES nodes to join the rendezvous before it
# fails with a RendezvousTimeoutError (torch's default: 600 s)
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"

(
    trap '' USR1
    exec "$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$MASTER_PORT" \
        --rdzv_id "$SLURM_JOB_ID" --rdzv_conf "join_timeout=$RDZV_TIMEOUT" --max_restarts 0 \
        launch/pretrain.py --config "$CONFIG" --resume auto \
        --set "train.run_dir=$RUN_DIR" "$@"
) &
launcher=$!

# A rank that has not installed its handler yet ignores USR1 (it inherits the
# SIG_IGN above), and Slurm may warn while the ranks still start: repeat the
# signal every 5 s until torchrun exits (the ranks' flag is idempotent).
# shellcheck disable=SC2329  # invoked by the trap below
forward_usr1() {
    [ -n "${forwarding:-}" ] && return
    forwarding=1
    (while kill -0 "$launcher" 2>/dev/null; do
        pkill -USR1 -P "$launcher" || true
        sleep 5
    done) &
}
trap forward_usr1 USR1
trap 'kill -TERM "$launcher" 2>/dev/null || true' TERM

# a trapped signal interrupts `wait`; keep waiting until torchrun is gone
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher" || true
done
status=0
wait "$launcher" || status=$?
exit "$status"
