"""Forward+backward throughput of the model on CPU, per component, and the
growth of FrequencyHyenaAttention's time with sequence length.

    python bench/model_cpu.py [--quick] [--out bench/results/model_cpu.json]

Prints tokens/s for whole-model training steps (``tiny`` and ``small`` at
several lengths), the time of one forward+backward of each component at a
fixed length, and FrequencyHyenaAttention's time from L to 8L next to the
L·log L ratio. Results (with machine and date) go to a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.attention import CrossAttention, EnhancedLocalAttentionWithGQA
from liquid_dist.model.block import FeedForward
from liquid_dist.model.conv import OptimizedGatedConvolution
from liquid_dist.model.frequency import FrequencyHyenaAttention
from liquid_dist.model.memory import EnhancedLSTM
from liquid_dist.model.moe import MoELayer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8000


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def model_cfg(name: str, length: int):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml").model
    return dataclasses.replace(cfg, vocab_size=VOCAB, max_encoder_length=length,
                               max_decoder_length=length)


def bench_model(name: str, length: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = model_cfg(name, length)
    model = LiquidFoundationModelOptimized(cfg).train()
    enc = torch.randint(4, VOCAB, (1, length))
    dec = torch.randint(4, VOCAB, (1, length))

    def step():
        model.zero_grad(set_to_none=True)
        model(enc, dec, labels=dec).loss.backward()

    sec = timed(step, repeats)
    return {"config": name, "length": length, "tokens_per_step": 2 * length,
            "seconds": sec, "tokens_per_s": 2 * length / sec}


def component_modules(cfg) -> dict:
    return {
        "FrequencyHyenaAttention(encoder)": (FrequencyHyenaAttention(cfg), False),
        "FrequencyHyenaAttention(decoder, causal)": (FrequencyHyenaAttention(cfg, causal=True),
                                                     False),
        "EnhancedLocalAttentionWithGQA(encoder)": (EnhancedLocalAttentionWithGQA(cfg, False),
                                                   False),
        "EnhancedLocalAttentionWithGQA(decoder)": (EnhancedLocalAttentionWithGQA(cfg, True),
                                                   False),
        "CrossAttention": (CrossAttention(cfg), True),
        "OptimizedGatedConvolution(encoder)": (OptimizedGatedConvolution(cfg, False), False),
        "OptimizedGatedConvolution(decoder)": (OptimizedGatedConvolution(cfg, True), False),
        "MoELayer": (MoELayer(cfg.moe, cfg.d_model), False),
        "FeedForward": (FeedForward(cfg), False),
        "EnhancedLSTM": (EnhancedLSTM(cfg), False),
    }


def bench_components(name: str, length: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = model_cfg(name, length)
    x = torch.randn(1, length, cfg.d_model, requires_grad=True)
    out = {}
    for label, (module, cross) in component_modules(cfg).items():
        def step(module=module, cross=cross):
            y = module(x, x) if cross else module(x)
            y = y[0] if isinstance(y, tuple) else y
            y.float().square().mean().backward()
        out[label] = timed(step, repeats)
    return out


def bench_frequency_growth(name: str, base: int, factors, repeats: int) -> list:
    rows = []
    first = None
    for f in factors:
        length = base * f
        torch.manual_seed(0)
        cfg = model_cfg(name, length)
        module = FrequencyHyenaAttention(cfg)
        x = torch.randn(1, length, cfg.d_model, requires_grad=True)

        def step(module=module, x=x):
            module(x).square().mean().backward()

        sec = timed(step, repeats)
        first = first or (sec, length * math.log2(length))
        rows.append({"length": length, "seconds": sec, "time_ratio": sec / first[0],
                     "L_log_L_ratio": length * math.log2(length) / first[1],
                     "L_squared_ratio": (length / base) ** 2})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="short lengths, one repeat")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_cpu.json"))
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    plan = ([("tiny", 256)] if args.quick else
            [("tiny", 512), ("tiny", 2048), ("tiny", 8192), ("small", 512), ("small", 2048)])
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": [],
    }
    for name, length in plan:
        row = bench_model(name, length, repeats)
        result["model"].append(row)
        print(f"{name:>6} L={length:>5}  fwd+bwd {row['seconds']:.3f}s  "
              f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
    comp_len = 256 if args.quick else 2048
    result["components"] = {"config": "tiny", "length": comp_len,
                            "seconds": bench_components("tiny", comp_len, repeats)}
    print(f"\nper component, tiny, L={comp_len}, forward+backward:")
    for label, sec in result["components"]["seconds"].items():
        print(f"  {label:<44} {1e3 * sec:8.1f} ms")
    base = 256 if args.quick else 1024
    result["frequency_growth"] = bench_frequency_growth("tiny", base, (1, 2, 4, 8), repeats)
    print("\nFrequencyHyenaAttention(encoder) growth, tiny:")
    for row in result["frequency_growth"]:
        print(f"  L={row['length']:>5}  {row['seconds'] * 1e3:8.1f} ms"
              f"  time x{row['time_ratio']:.2f}"
              f"  L·logL x{row['L_log_L_ratio']:.2f}  L² x{row['L_squared_ratio']:.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
