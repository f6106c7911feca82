"""Useful tokens: real-token fraction and target tokens/s, fixed-width vs per-objective batches.

    python bench/padding.py [--quick] [--out bench/results/padding.json]

For each objective of ``configs/tiny.yaml`` (on the demo's Shakespeare data,
prepared if missing) it compares, in one process:

* **fixed** — the previous batching rule: every example padded to the
  configured ``(encoder_length, decoder_length)`` = (128, 64), prefix LM split
  at a uniform random point of a ``max(E, D) - 1`` chunk, the mixture drawn per
  example. Built here from the same token stream the loader reads;
* **per-objective** — the loader as it is: one objective per batch, at that
  objective's exact shape (``liquid_dist.data.example_shape``).

It reports the fraction of encoder and decoder positions that hold real tokens
and the real target tokens per second of a tiny training step (forward,
backward, AdamW; one process, batch 8), interleaving the two so that machine
noise hits both alike. Results (with machine and date) go to a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from liquid_dist.config import load_config
from liquid_dist.data import IGNORE_INDEX, Tokenizer, build_train_loader, collate
from liquid_dist.model import LiquidFoundationModelOptimized

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "shakespeare"
BATCH = 8


def _pad(batch: dict[str, torch.Tensor], enc: int, dec: int) -> dict[str, torch.Tensor]:
    """A per-objective batch padded to the fixed widths, as the previous loader padded it."""
    values = {"encoder_input_ids": 0, "encoder_attention_mask": False, "decoder_input_ids": 0,
              "labels": IGNORE_INDEX}
    return {k: F.pad(batch[k], (0, (enc if k.startswith("encoder") else dec)
                                - batch[k].shape[1]), value=v) for k, v in values.items()}


def _random_split_prefix_lm(batch: dict[str, torch.Tensor], enc: int, dec: int,
                            rng: np.random.Generator, eos: int) -> dict[str, torch.Tensor]:
    """The previous prefix-LM rule on the same stream: a ``max(E, D) - 1`` chunk (taken from
    the start of each row's window) split at a uniform random point, targets + EOS."""
    n = max(enc, dec) - 1
    examples = []
    for row_enc, row_lab in zip(batch["encoder_input_ids"], batch["labels"], strict=True):
        chunk = torch.cat([row_enc[:-1], row_lab]).numpy()[:n]
        s = int(rng.integers(max(1, n - (dec - 1)), min(enc - 1, n - 1) + 1))
        examples.append((np.append(chunk[:s], eos), np.append(chunk[s:], eos)))
    arrays = collate(examples, encoder_length=enc, decoder_length=dec, pad_id=0,
                     decoder_start_id=0)
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def _batches(cfg, objective: str, steps: int, seed: int) -> dict[str, list]:
    """``steps`` batches of ``objective`` under both rules, from the same loader stream."""
    tok = Tokenizer(cfg.data.tokenizer)
    enc, dec = cfg.data.encoder_length, cfg.data.decoder_length

    def loader(name: str):
        data = dataclasses.replace(cfg.data, objective=name, num_workers=0)
        return iter(build_train_loader(data, rank=0, world_size=1, batch_size=BATCH,
                                       seed=seed))

    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"fixed": [], "per_objective": []}
    if objective == "mixture":
        mixed, span, prefix = loader("mixture"), loader("span_corruption"), loader("prefix_lm")
        for _ in range(steps):
            out["per_objective"].append(next(mixed))
            old_span = _pad(next(span), enc, dec)
            old_prefix = _random_split_prefix_lm(next(prefix), enc, dec, rng, tok.eos_id)
            pick = torch.from_numpy(rng.random(BATCH) < 0.5).view(-1, 1)  # per example
            out["fixed"].append({k: torch.where(pick, old_span[k], old_prefix[k])
                                 for k in old_span})
        return out
    stream = loader(objective)
    for _ in range(steps):
        batch = next(stream)
        out["per_objective"].append(batch)
        out["fixed"].append(_pad(batch, enc, dec) if objective == "span_corruption" else
                            _random_split_prefix_lm(batch, enc, dec, rng, tok.eos_id))
    return out


def _fill(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    mask = [b["encoder_attention_mask"] for b in batches]
    labels = [b["labels"] != IGNORE_INDEX for b in batches]
    return {"encoder": sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask),
            "decoder": sum(int(t.sum()) for t in labels) / sum(t.numel() for t in labels)}


def _step(model, opt, batch) -> None:
    out = model(batch["encoder_input_ids"], batch["decoder_input_ids"],
                encoder_attention_mask=batch["encoder_attention_mask"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_objective(cfg, objective: str, steps: int, warmup: int) -> dict:
    batches = _batches(cfg, objective, steps + warmup, seed=0)
    result = {"objective": objective}
    models = {}
    for rule in batches:
        torch.manual_seed(0)
        model = LiquidFoundationModelOptimized(cfg.model).train()
        models[rule] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    seconds = {rule: 0.0 for rule in batches}
    for i in range(steps + warmup):
        for rule, (model, opt) in models.items():  # interleaved: noise hits both rules
            t0 = time.perf_counter()
            _step(model, opt, batches[rule][i])
            if i >= warmup:
                seconds[rule] += time.perf_counter() - t0
    for rule, bs in batches.items():
        timed = bs[warmup:]
        targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in timed)
        real = targets + sum(int(b["encoder_attention_mask"].sum()) for b in timed)
        positions = sum(b["encoder_input_ids"].numel() + b["labels"].numel() for b in timed)
        result[rule] = {"fill": _fill(bs), "seconds": seconds[rule],
                        "target_tokens_per_s": targets / seconds[rule],
                        "real_tokens_per_s": real / seconds[rule],
                        "positions_per_s": positions / seconds[rule],
                        "shapes": sorted({(b["encoder_input_ids"].shape[1],
                                           b["labels"].shape[1]) for b in bs})}
    result["target_tokens_per_s_ratio"] = (result["per_objective"]["target_tokens_per_s"]
                                           / result["fixed"]["target_tokens_per_s"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps (a smoke run)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "padding.json"))
    args = p.parse_args()
    if not (DATA / "shards" / "manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare_shakespeare.py"),
                        "--output", str(DATA)], check=True)
    vocab = Tokenizer(DATA / "tokenizer" / "tokenizer.model").vocab_size
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.vocab_size={vocab}"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, tokenizer=str(DATA / "tokenizer" / "tokenizer.model"),
        train_shards=str(DATA / "shards")))
    steps, warmup = (2, 1) if args.quick else (12, 2)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": "configs/tiny.yaml", "batch_size": BATCH, "timed_steps": steps,
        "objectives": [],
    }
    for objective in ("span_corruption", "prefix_lm", "mixture"):
        row = bench_objective(cfg, objective, steps, warmup)
        result["objectives"].append(row)
        for rule in ("fixed", "per_objective"):
            r = row[rule]
            print(f"{objective:>16} {rule:>13}: fill enc {r['fill']['encoder']:.3f} "
                  f"dec {r['fill']['decoder']:.3f}  {r['target_tokens_per_s']:,.0f} target "
                  f"tok/s  {r['real_tokens_per_s']:,.0f} real tok/s  shapes {r['shapes']}",
                  flush=True)
        print(f"{'':>16} real target tokens/s x{row['target_tokens_per_s_ratio']:.2f}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
