"""Each removable component's share of the training step time, measured in one process.

    python bench/removal_cost.py [--steps 30] [--output bench/results/removal_cost.json]
    python bench/removal_cost.py --smoke --output X.json     # 3 steps (the test)

``tiny`` (vocabulary 4000) and its six single removals (``model.ablate``, docs/model.md)
run forward + backward on the same random batch (8 examples, encoder 128 and
decoder 64 tokens: the ablation benchmark's shapes), one thread, interleaved —
one step of each model in turn — so that machine noise hits all alike. The
share of a component is ``1 - median(step without it) / median(step of full)``
over the steps after ``--warmup``. bench/ablations.py measures quality; its
step times come from separate processes and carry their noise, this does not.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liquid_dist.config import ABLATIONS, load_config  # noqa: E402
from liquid_dist.model import LiquidFoundationModelOptimized  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="3 steps, 1 warm-up (the test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 3, 1
    output = args.output or (Path(tempfile.mkdtemp()) / "removal_cost.json" if args.smoke
                             else ROOT / "bench" / "results" / "removal_cost.json")
    torch.set_num_threads(1)
    cfg = dataclasses.replace(load_config(ROOT / "configs" / "tiny.yaml").model, vocab_size=4000)
    variants = {"full": cfg, **{f"no_{name}": dataclasses.replace(cfg, ablate=[name])
                                for name in ABLATIONS}}
    models = {name: LiquidFoundationModelOptimized(c, seed=0).train()
              for name, c in variants.items()}
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(4, 4000, (8, 128), generator=g)
    dec = torch.randint(4, 4000, (8, 64), generator=g)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.steps):
        for name, model in models.items():
            start = time.perf_counter()
            model(enc, dec, labels=dec).loss.backward()
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    median = {name: statistics.median(t[args.warmup:]) for name, t in times.items()}
    full = median["full"]
    rows = [{"variant": name, "step_s": median[name], "ratio_to_full": median[name] / full,
             "share_of_full_step": 1 - median[name] / full} for name in models]
    result = {"date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": 1, "torch": torch.__version__},
              "settings": {"config": "configs/tiny.yaml", "vocab_size": 4000, "batch": 8,
                           "encoder_length": 128, "decoder_length": 64, "steps": args.steps,
                           "warmup": args.warmup, "order": "interleaved, one process"},
              "rows": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['variant']:>20}: {r['step_s'] * 1e3:7.1f} ms/step  "
              f"share of full's step {r['share_of_full_step']:+.1%}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
