"""What a checkpoint costs the training loop: synchronous against asynchronous saves.

    python bench/checkpoint.py                 # the committed protocol (about 15 minutes)
    python bench/checkpoint.py --smoke         # a micro model (the test)

Each mode launches the real trainer (``launch/pretrain.py`` under ``torchrun``,
gloo, fp32, ZeRO-3, W = 2) with ``configs/base-moe.yaml`` cut to 4 + 4 layers
(0.37 B parameters, bench/memory.py's ``scaling`` model and short sequences)
on the embedded Shakespeare data, a checkpoint after every step. From the
``checkpoint`` events of ``metrics.jsonl`` it records, per save, ``blocked_s``
(the time the step loop waited) and ``total_s`` (from the start of the save to
``latest`` moving), and the run's wall time; from outside, every rank's peak
resident memory (``VmHWM``; bench/memory.py's polling):
an asynchronous save holds each rank's share in a host buffer. Results, with
machine and date, go to ``--output`` (default ``bench/results/checkpoint.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402  (bench/, the script's own directory)

MIB = 1 << 20


def _events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "event"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a micro model (the test)")
    args = p.parse_args(argv)
    output = args.output or (Path(tempfile.mkdtemp(prefix="checkpoint_smoke_"))
                             / "checkpoint.json" if args.smoke
                             else ROOT / "bench" / "results" / "checkpoint.json")
    if not (args.data / "shards").is_dir():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare_shakespeare.py"),
                        "--output", str(args.data)], check=True)
    from liquid_dist.data import Tokenizer

    vocab = Tokenizer(str(args.data / "tokenizer" / "tokenizer.model")).vocab_size
    layers = 1 if args.smoke else 4
    model = [*(memory.SMOKE_MODEL if args.smoke else []), f"model.n_encoder_layers={layers}",
             f"model.n_decoder_layers={layers}"]
    facts = memory.model_facts([*model, *memory.SHORT], vocab)
    data = [f"data.tokenizer={args.data / 'tokenizer' / 'tokenizer.model'}",
            f"data.train_shards={args.data / 'shards'}", "data.val_shards=null"]
    rows = []
    for mode in ("sync", "async"):
        run_dir = Path(tempfile.mkdtemp(prefix=f"checkpoint_{mode}_"))
        launch = [str(ROOT / "launch" / "pretrain.py"), "--config",
                  str(ROOT / "configs" / "base-moe.yaml"), "--resume", "none"]
        for o in [*model, *memory.SHORT, *data, f"train.max_steps={args.steps}",
                  f"train.run_dir={run_dir}", "train.ckpt_every=1", "train.keep_last=1",
                  f"train.async_checkpoint={str(mode == 'async').lower()}"]:
            launch += ["--set", o]
        print(f"{mode}: W={args.world}, {facts['parameters']:,} parameters ...", flush=True)
        try:
            run = memory.launch_ranks(args.world, launch, ROOT, {"PYTHONPATH": str(ROOT)},
                                 run_dir / "metrics.jsonl", args.steps, args.timeout)
            saves = [e for e in _events(run_dir) if e["event"] == "checkpoint"]
            size = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*")
                       if f.is_file())
        finally:  # a checkpoint is GBs: never leave it behind
            shutil.rmtree(run_dir, ignore_errors=True)
        if run["returncode"] != 0:
            print(run["tail"], file=sys.stderr)
            return 1
        # the last save ends the run: the loop has nothing to overlap it with
        inner = saves[:-1] or saves
        rows.append({
            "mode": mode, "returncode": run["returncode"], "wall_s": round(run["wall_s"], 1),
            "checkpoint_bytes": size,
            "saves": [{k: e[k] for k in ("step", "blocked_s", "total_s")} for e in saves],
            "median_blocked_s": statistics.median(e["blocked_s"] for e in inner),
            "median_total_s": statistics.median(e["total_s"] for e in inner),
            "peak_mib": [v / MIB if v else None for v in run["peak"]]})
        print(json.dumps(rows[-1]), flush=True)
    sync, asyn = rows
    result = {"date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "settings": {"config": "configs/base-moe.yaml", "layers": layers,
                           "short": memory.SHORT, "steps": args.steps, "world": args.world,
                           "parameters": facts["parameters"]},
              "rows": rows,
              "blocked_ratio_async_to_sync": asyn["median_blocked_s"] / sync["median_blocked_s"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
