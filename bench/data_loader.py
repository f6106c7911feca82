"""Throughput of the data loader on the Shakespeare corpus (preparing shards: bench/data_prep.py).

    python bench/data_loader.py [--data DIR] [--out bench/results/data_loader.json]

The loader's raw tokens/s drawn per loader worker for each objective
(encoder 512 / decoder 128, batch 16) with 0 (in-process), 1 and 2 workers,
the time to the first batch of a resumed loader, and what staging costs per
step (``stages``: one stage against the same shares in a new stage every 10
steps), and what apportioning each step's examples to the sources costs
(``mixer``: the in-process loader's step at S = 16, and S = 1024 over three
sources).

``--data`` is a prepare_shakespeare.py output (made in a temporary folder
when absent). Results, with machine and date, go to a JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import torch
import webdataset

from liquid_dist.config import DataConfig
from liquid_dist.data import build_train_loader, read_manifest
from liquid_dist.data.stream import Mixer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data_prep"))
import prepare_shakespeare  # noqa: E402


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
            "webdataset": getattr(webdataset, "__version__", "?")}


def _cfg(data: Path, objective: str, workers: int) -> DataConfig:
    return DataConfig(tokenizer=str(data / "tokenizer" / "tokenizer.model"),
                      train_shards=str(data / "shards"), objective=objective,
                      encoder_length=512, decoder_length=128, num_workers=workers,
                      shuffle_buffer=1000, batches_per_epoch=320)


def timed_epoch(loader: Any) -> tuple[int, float, int]:
    """(raw tokens, seconds, batches) of the rest of the loader's epoch after 20 batches
    (worker start-up and the shuffle buffer fill are not throughput)."""
    it = iter(loader)
    for _ in range(20):
        next(it)
    before = sum(loader.stats()["tokens_per_source"].values())
    start = time.perf_counter()
    n = sum(1 for _ in it)
    seconds = time.perf_counter() - start
    return sum(loader.stats()["tokens_per_source"].values()) - before, seconds, n


def bench_loader(data: Path, objective: str, workers: int) -> dict:
    loader = build_train_loader(_cfg(data, objective, workers), rank=0, world_size=1,
                                batch_size=16, seed=0)
    tokens, seconds, n = timed_epoch(loader)
    return {"objective": objective, "num_workers": workers, "batches": n,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds),
            "tokens_per_s_per_worker": round(tokens / seconds / max(1, workers)),
            "encoder_fill": round(loader.stats()["encoder_fill"], 3),
            "decoder_fill": round(loader.stats()["decoder_fill"], 3)}


def bench_stages(data: Path, repeats: int = 5) -> dict:
    """What staging costs the loader per step. End to end: tokens/s (in-process, mixture
    objective) over two sources (the corpus under two names) in one stage, against the same
    shares in a new stage every 10 steps (32 stages), so that only the staging differs,
    and against the one stage again (the machine's noise); alternating ``repeats`` times,
    the median and range of each ratio. Directly: the time of what staging adds to a
    step (finding the step's stage among 32, its shares as an array) against the
    loader's time per step."""
    sources = [{"name": n, "shards": str(data / "shards")} for n in ("a", "b")]
    weights = {"a": 1, "b": 1}
    runs = {"one_stage": [{"start_step": 0, "weights": weights}],
            "stage_every_10_steps": [{"start_step": k * 10, "weights": weights}
                                     for k in range(32)],
            "one_stage_again": [{"start_step": 0, "weights": weights}]}  # the noise
    rates: dict[str, list[float]] = {name: [] for name in runs}
    step_seconds = []
    specs = {}
    for _ in range(repeats):
        for name, stages in runs.items():
            cfg = dataclasses.replace(_cfg(data, "mixture", 0), sources=sources, stages=stages)
            loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=16, seed=0)
            tokens, seconds, n = timed_epoch(loader)
            rates[name].append(tokens / seconds)
            step_seconds.append(seconds / n)
            specs[name] = loader.spec
    spec = specs["stage_every_10_steps"]
    assert len(spec.stages) == 32
    calls = 100_000
    start = time.perf_counter()
    for step in range(calls):
        np.array(spec.stage(step % 320).shares, dtype=np.float64)
    lookup = (time.perf_counter() - start) / calls

    def ratio(name: str) -> dict:
        r = sorted(a / b for a, b in zip(rates[name], rates["one_stage"], strict=True))
        return {"median": round(r[len(r) // 2], 3), "range": [round(r[0], 3), round(r[-1], 3)]}

    per_step = float(np.median(step_seconds))
    return {"staging_us_per_step": round(lookup * 1e6, 2),
            "loader_ms_per_step": round(per_step * 1e3, 3),
            "staging_share_of_a_step": round(lookup / per_step, 6),
            **{f"{k}_tokens_per_s": round(float(np.median(v))) for k, v in rates.items()},
            "ratio_staged": ratio("stage_every_10_steps"),
            "ratio_control": ratio("one_stage_again"), "repeats": repeats}


def bench_mixer(data: Path) -> dict:
    """The time of Mixer.step (which source each of a step's S examples reads) for S = 16
    and 1024 examples over two and three sources: the work each loader worker of each rank
    does per step for any mixture of sources, staged or not."""
    out = {}
    for sources in (2, 3):
        cfg = dataclasses.replace(_cfg(data, "mixture", 0), sources=[
            {"name": f"s{i}", "shards": str(data / "shards"), "weight": i + 1}
            for i in range(sources)])
        spec = build_train_loader(cfg, rank=0, world_size=1, batch_size=16, seed=0).spec
        for streams in (16, 1024):
            mixer = Mixer(dataclasses.replace(spec, batch_size=streams))
            start = time.perf_counter()
            for step in range(200):
                mixer.step(step, 0)
            out[f"ms_per_step_S{streams}_{sources}_sources"] = round(
                (time.perf_counter() - start) / 200 * 1e3, 4)
    return out


def bench_resume(data: Path) -> dict:
    cfg = _cfg(data, "mixture", 2)
    first = build_train_loader(cfg, rank=0, world_size=1, batch_size=16, seed=0)
    it = iter(first)
    for _ in range(60):
        next(it)
    state = first.state_dict()
    del it
    resumed = build_train_loader(cfg, rank=0, world_size=1, batch_size=16, seed=0)
    resumed.load_state_dict(state)
    start = time.perf_counter()
    next(iter(resumed))
    return {"after_batches": 60, "state_bytes": len(json.dumps(state)),
            "first_batch_seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a prepare_shakespeare.py output directory")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_loader.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = args.data
        if data is None:
            data = scratch / "shakespeare"
            prepare_shakespeare.prepare(data)
        manifest = read_manifest(data / "shards")
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "note": "shared 2-core VM (other jobs running): treat as a lower bound",
            "corpus": {"documents": manifest["totals"]["train"]["documents"],
                       "train_tokens": manifest["totals"]["train"]["tokens"],
                       "vocab_size": manifest["vocab_size"]},
            "loader": [bench_loader(data, objective, workers)
                       for objective in ("span_corruption", "prefix_lm", "mixture")
                       for workers in (0, 1, 2)],
            "resume": bench_resume(data),
            "stages": bench_stages(data),
            "mixer": bench_mixer(data),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
