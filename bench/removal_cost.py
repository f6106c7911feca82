"""Each removable component's share of the training step time, measured in one process.

    python bench/removal_cost.py [--steps 30] [--repeats 5] [--output FILE]
    python bench/removal_cost.py --smoke --output X.json     # 3 steps, 2 repeats (the test)

``tiny`` (vocabulary 4000) and its six single removals (``model.ablate``, docs/model.md)
run forward + backward on the same random batch (8 examples, encoder 128 and
decoder 64 tokens: the ablation benchmark's shapes), one thread, interleaved —
one step of each model in turn, ``full`` included — so that machine noise hits
all alike. A repeat is ``--steps`` such rounds; per repeat, a variant's ratio is
``median(its step) / median(full's step)`` over the rounds after ``--warmup``,
and its share of the step ``1 - ratio``. The results give, per variant, each
repeat's figures and their median, min, max and std over the ``--repeats``
repeats. bench/ablations.py measures quality; its step times come from separate
processes and carry their noise, this does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liquid_dist.config import ABLATIONS, load_config  # noqa: E402
from liquid_dist.model import LiquidFoundationModelOptimized  # noqa: E402


def spread(xs: list[float]) -> dict[str, Any]:
    """Median, min, max and sample std (None with one value) of ``xs``, and ``xs`` itself."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else None, "by_repeat": list(xs)}


def time_repeat(models: dict[str, torch.nn.Module], enc: torch.Tensor, dec: torch.Tensor,
                steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward + backward step of each model over ``steps`` interleaved
    rounds (one step of each model in turn), the first ``warmup`` rounds left out."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            start = time.perf_counter()
            model(enc, dec, labels=dec).loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {name: statistics.median(t[warmup:]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="interleaved rounds per repeat")
    p.add_argument("--warmup", type=int, default=5,
                   help="first rounds of each repeat left out of its medians")
    p.add_argument("--repeats", type=int, default=5,
                   help="independent repeats, all in this process, for the spread")
    p.add_argument("--output", type=Path, default=None,
                   help="default bench/results/removal_cost.json (--smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="3 steps, 1 warm-up, 2 repeats (the test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 3, 1, 2
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup}: expected 0 .. steps - 1 = {args.steps - 1}")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: expected at least 1")
    output = args.output or (Path(tempfile.mkdtemp()) / "removal_cost.json" if args.smoke
                             else ROOT / "bench" / "results" / "removal_cost.json")
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()
    cfg = dataclasses.replace(load_config(ROOT / "configs" / "tiny.yaml").model, vocab_size=4000)
    variants = {"full": cfg, **{f"no_{name}": dataclasses.replace(cfg, ablate=[name])
                                for name in ABLATIONS}}
    models = {name: LiquidFoundationModelOptimized(c, seed=0).train()
              for name, c in variants.items()}
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(4, 4000, (8, 128), generator=g)
    dec = torch.randint(4, 4000, (8, 64), generator=g)
    medians = []
    for repeat in range(args.repeats):
        medians.append(time_repeat(models, enc, dec, args.steps, args.warmup))
        print(f"repeat {repeat + 1}/{args.repeats}: full {medians[-1]['full'] * 1e3:.1f} ms/step",
              flush=True)
    rows = []
    for name in models:
        ratios = [m[name] / m["full"] for m in medians]
        rows.append({"variant": name, "step_s": spread([m[name] for m in medians]),
                     "ratio_to_full": spread(ratios),
                     "share_of_full_step": spread([1 - r for r in ratios])})
    result = {"date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": 1, "torch": torch.__version__},
              "conditions": {"loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                             "wall_s": round(time.perf_counter() - started, 1)},
              "settings": {"config": "configs/tiny.yaml", "vocab_size": 4000, "batch": 8,
                           "encoder_length": 128, "decoder_length": 64, "steps": args.steps,
                           "warmup": args.warmup, "repeats": args.repeats,
                           "order": "interleaved, full included, one process"},
              "rows": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        share = r["share_of_full_step"]
        print(f"{r['variant']:>20}: {r['step_s']['median'] * 1e3:7.1f} ms/step  share of full's "
              f"step {share['median']:+.1%} (min {share['min']:+.1%}, max {share['max']:+.1%}, "
              f"{args.repeats} repeats)")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
