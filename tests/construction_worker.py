"""One rank of the construction checks (run by tests/test_construction.py via torchrun).

    torchrun --nproc_per_node W tests/construction_worker.py OUT_JSON MODE EP [OVERRIDE ...]

Builds ``configs/tiny.yaml`` (with the overrides) for ZeRO-3 on W ranks with
``parallel.ep_size=EP``, MODE:

* ``partitioned``: the trainer's construction
  (:func:`liquid_dist.parallel.construction.build_model`; from ``train.init_from``
  when an override sets it);
* ``whole``: the construction it replaced, kept here as the negative control —
  the whole model built on every rank, then partitioned by ZeRO-3.

Rank 0 writes OUT_JSON: each rank's peak growth of resident anonymous memory
during the construction (bytes, sampled every millisecond from just before it,
once a meta-device build has loaded the code; the file pages of a memory-mapped
``init_from`` are the kernel's page cache, reclaimable, and not counted) and,
for ``partitioned``, the SHA-256 of every parameter's full value, gathered
from the partitions and the expert-parallel ranks.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from liquid_dist.parallel.distributed import exit_process


def _rss_anon() -> int:
    """This process's resident anonymous memory, bytes (not the file pages it maps)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class _PeakSampler(threading.Thread):
    """The highest :func:`_rss_anon` seen, sampled every millisecond until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_anon()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, _rss_anon())


def main() -> int:
    out_path, mode, ep_size, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    import deepspeed

    from liquid_dist.config import load_config
    from liquid_dist.model import LiquidFoundationModelOptimized
    from liquid_dist.parallel.build_plan import resolve_build
    from liquid_dist.parallel.construction import build_model
    from liquid_dist.parallel.distributed import init_distributed
    from liquid_dist.parallel.ds_compat import expert_parallel_group, is_expert_parameter

    env, device = init_distributed()
    cfg = load_config("configs/tiny.yaml", [*overrides, "parallel.zero_stage=3",
                                            f"parallel.ep_size={ep_size}"])
    plan = resolve_build(cfg, world_size=env.world_size, device_type="cpu")
    with torch.device("meta"):  # loads the code a first build imports (~80 MiB): not the model
        LiquidFoundationModelOptimized(cfg.model)
    dist.barrier()
    before = _rss_anon()
    sampler = _PeakSampler()
    sampler.start()
    if mode == "partitioned":
        built = build_model(plan, device=device, init_from=cfg.train.init_from)
        model, layout = built.model, built.expert_layout
    else:
        model = LiquidFoundationModelOptimized(cfg.model, seed=cfg.train.seed)
        deepspeed.zero.Init(module=model, config_dict_or_path=plan.ds_config)
        layout = None
    peak = sampler.stop()
    growth = torch.tensor([float(peak - before)])
    growths = [torch.zeros(1) for _ in range(env.world_size)]
    dist.all_gather(growths, growth)
    result = {"rss_growth": [float(g) for g in growths],
              "parameters": sum(int(getattr(p, "ds_numel", p.numel()))
                                for p in model.parameters()),
              "largest": max(int(getattr(p, "ds_numel", p.numel()))
                             for p in model.parameters())}
    if mode == "partitioned":
        hashes = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone()
            if layout is not None and is_expert_parameter(p):
                group = expert_parallel_group(layout.group_name)
                parts = [torch.empty_like(full) for _ in range(layout.ep_size)]
                dist.all_gather(parts, full, group=group)
                full = torch.cat(parts)
            hashes[name] = [list(full.shape), str(full.dtype),
                            hashlib.sha256(full.contiguous().numpy().tobytes()).hexdigest()]
        result["sha256"] = hashes
    if env.rank == 0:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh)
    dist.barrier()
    dist.destroy_process_group()  # as the trainer's entry point does, before the exit
    return 0


if __name__ == "__main__":
    exit_process(main())
