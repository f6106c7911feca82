"""One-GPU training benchmark: configs/small.yaml in bf16 for ~50 steps.

    python bench/gpu_train_small.py [--steps 50] [--out bench/results]

Runs launch/pretrain.py as one process (ZeRO-3, bf16 by ``precision: auto``)
on the Shakespeare shards (data/shakespeare: made by
data_prep/prepare_shakespeare.py, or carried to the GPU machine), then writes
``gpu_train_small.json`` with tokens/s, MFU and peak memory, taken as medians over
the logged steps after the first 10 (compilation and warm-up excluded). Needs a
CUDA device; prepared on CPU (``--cpu-smoke`` runs 3 steps of a shrunken model
to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--run-dir", type=Path, default=Path("/tmp/liquid_gpu_train_small"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="3 steps of a tiny model on CPU: checks the script, measures nothing")
    args = p.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine", file=sys.stderr)
        return 2
    steps = 3 if args.cpu_smoke else args.steps
    sets = [f"train.run_dir={args.run_dir}", f"train.max_steps={steps}", "train.log_every=1",
            f"train.ckpt_every={steps}", f"train.eval_every={steps}", "train.eval_steps=2",
            "train.warmup_steps=10", "data.num_workers=2"]
    if args.cpu_smoke:
        sets += ["model.d_model=64", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
                 "model.max_encoder_length=128", "model.max_decoder_length=64",
                 "data.encoder_length=128", "data.decoder_length=64",
                 "train.micro_batch_size=2", "data.num_workers=0"]
    cmd = [sys.executable, "launch/pretrain.py", "--config", "configs/small.yaml",
           "--resume", "none"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        print(f"training failed with status {proc.returncode}", file=sys.stderr)
        return proc.returncode

    from liquid_dist.train.metrics import read_metrics

    train = read_metrics(args.run_dir, "train")
    steady = [r for r in train if r["step"] > min(10, steps - 1)] or train
    start_event = read_metrics(args.run_dir, "event")[0]
    evals = read_metrics(args.run_dir, "eval")

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    result = {
        "benchmark": "gpu_train_small", "config": "configs/small.yaml", "steps": steps,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "precision": start_event.get("precision"), "parameters": start_event.get("parameters"),
        "real_tokens_per_s": med("real_tokens_per_s"),
        "target_tokens_per_s": med("target_tokens_per_s"),
        "positions_per_s": med("positions_per_s"), "step_time_s": med("step_time_s"),
        "tflops_per_s_positions": med("tflops_per_s_positions"),
        "mfu_positions": med("mfu_positions"), "mfu_real_tokens": med("mfu_real_tokens"),
        "peak_memory_gb": max(r["memory_gb"] for r in train),
        "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
        "val_ce": evals[-1]["val_ce"] if evals else None, "wall_s": round(wall, 1),
        "cpu_smoke": args.cpu_smoke,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu_train_small_cpu_smoke.json" if args.cpu_smoke else "gpu_train_small.json"
    (args.out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
