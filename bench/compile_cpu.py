"""``train.compile`` on CPU: training-step time of compiled vs eager blocks, in one process.

    python bench/compile_cpu.py [--quick] [--out bench/results/compile_cpu.json]

The ``tiny`` model (4k vocabulary, as the demo) at the shapes of its two
objectives (span corruption 128/29 and prefix LM 128/64, batch 8): the first
call of each shape (compilation included) and the median of the following
forward+backward+AdamW steps, eager and with every ImprovedTransformerBlock
compiled (``liquid_dist.parallel.compile.compile_blocks``), alternating the two
so that machine noise hits both alike. Results (with machine and date) go to a
JSON file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.parallel.compile import compile_blocks

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4000
SHAPES = {"span_corruption": (128, 29), "prefix_lm": (128, 64)}


def _batch(enc_len: int, dec_len: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    enc = torch.randint(4, VOCAB, (8, enc_len), generator=g)
    dec = torch.randint(4, VOCAB, (8, dec_len), generator=g)
    return {"encoder_input_ids": enc, "decoder_input_ids": dec,
            "encoder_attention_mask": torch.ones_like(enc, dtype=torch.bool), "labels": dec}


def _step(model, opt, batch) -> float:
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile_cpu.json"))
    args = p.parse_args()
    steps = 2 if args.quick else 10
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.vocab_size={VOCAB}"])
    torch.manual_seed(0)
    eager = LiquidFoundationModelOptimized(cfg.model).train()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    models = {"eager": (eager, torch.optim.AdamW(eager.parameters(), lr=1e-3)),
              "compiled": (compiled, torch.optim.AdamW(compiled.parameters(), lr=1e-3))}
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": "configs/tiny.yaml", "batch_size": 8, "timed_steps": steps, "shapes": {},
    }
    for name, (le, ld) in SHAPES.items():
        first = {k: _step(m, o, _batch(le, ld, 0)) for k, (m, o) in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(steps):
            for k, (m, o) in models.items():
                times[k].append(_step(m, o, _batch(le, ld, i + 1)))
        row = {k: {"first_call_s": round(first[k], 3),
                   "median_step_s": round(statistics.median(times[k]), 4)} for k in models}
        row["speedup"] = round(row["eager"]["median_step_s"] / row["compiled"]["median_step_s"],
                               3)
        result["shapes"][f"{name} ({le}, {ld})"] = row
        print(f"{name:>16} ({le}, {ld}): eager {row['eager']['median_step_s']:.4f} s, "
              f"compiled {row['compiled']['median_step_s']:.4f} s (x{row['speedup']:.2f}); "
              f"first call {row['eager']['first_call_s']:.1f} s vs "
              f"{row['compiled']['first_call_s']:.1f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
