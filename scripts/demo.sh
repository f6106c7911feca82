#!/usr/bin/env bash
# The CPU demo: Shakespeare corpus -> tokenizer -> shards -> 2-process ZeRO-3
# pretraining of configs/tiny.yaml (gloo) -> loss curve -> checkpoint -> a
# generated sample -> RUN_DIR/loss.png. About 4-5 minutes on 2 cores. Run
# scripts/setup_env.sh first (it installs matplotlib, for the plot).
#
#   bash scripts/demo.sh [extra pretrain.py arguments, e.g. --set train.max_steps=100]
#
# RUN_DIR (default runs/demo-tiny) is emptied first: the demo always trains from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
RUN_DIR="${RUN_DIR:-runs/demo-tiny}"
[ -x "$PY" ] || { echo "no $PY: run bash scripts/setup_env.sh first" >&2; exit 1; }
start=$(date +%s)

echo "== 1/5 data: Shakespeare text, tokenizer, shards (kept if already there)"
"$PY" data_prep/prepare_shakespeare.py --output data/shakespeare

echo "== 2/5 pretraining: configs/tiny.yaml, 2 CPU processes, ZeRO-3, gloo"
rm -rf "$RUN_DIR"
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# one loader process per rank would compete with the two ranks for the two cores
DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 "$VENV/bin/deepspeed" --num_gpus 2 --master_port "$port" \
    launch/pretrain.py --config configs/tiny.yaml --resume none \
    --set "train.run_dir=$RUN_DIR" --set data.num_workers=0 "$@" 2>&1 \
    | sed -u -e '/^\[20[0-9-]* [0-9:,]*\] \[INFO\]/d' -e '/untested optimizer/d' \
             -e '/apply_to_tensors_only/d' -e '/Unable to find hostfile/d'

echo "== 3/5 loss curve ($RUN_DIR/metrics.jsonl)"
"$PY" - "$RUN_DIR" <<'PYEOF'
import sys
from liquid_dist.train.metrics import read_metrics
train = read_metrics(sys.argv[1], "train")
evals = read_metrics(sys.argv[1], "eval")
first, last = train[0], train[-1]
print(f"train loss: step {first['step']} {first['loss']:.3f} -> step {last['step']} "
      f"{last['loss']:.3f} (cross-entropy {first['ce']:.3f} -> {last['ce']:.3f})")
for e in evals:
    print(f"val cross-entropy at step {e['step']}: {e['val_ce']:.3f} (ppl {e['val_ppl']:.1f})")
if not last["loss"] < first["loss"]:
    sys.exit("the loss did not fall")
PYEOF
ls "$RUN_DIR/checkpoints"

echo "== 4/5 greedy and top-p continuations of a validation prompt (single process, from the checkpoint)"
"$PY" launch/sample.py --checkpoint "$RUN_DIR" --max-new-tokens 48

echo "== 5/5 training curves (python -m liquid_dist.plot, docs/evaluation.md)"
"$PY" -m liquid_dist.plot "$RUN_DIR" --output "$RUN_DIR/loss.png" > /dev/null
echo "wrote $RUN_DIR/loss.png"
echo "demo finished in $(( $(date +%s) - start )) s"
