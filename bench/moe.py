"""Throughput of the MoE layer per expert-compute backend, and the all-to-all share of its time.

    python bench/moe.py [--quick] [--out bench/results/moe_cpu.json]

1. One process: forward+backward tokens/s of ``MoELayer`` (router, dispatch,
   experts, combine, auxiliary losses) for each importable backend
   (``grouped_mm``, ``loop``; ``megablocks`` only where it imports, i.e. with
   MegaBlocks on CUDA) at a few token counts.
2. Two gloo processes (``torchrun``-free: ``torch.multiprocessing`` with a
   local rendezvous), ``ep_size = 2``: the same layer expert-parallel, its
   forward+backward time and the part of it spent inside the two
   ``all_to_all_single`` exchanges (and their backward), per token count.

Results (with machine and date) go to a JSON file. On a shared 2-core CPU the
absolute numbers are noisy; the ratios are what the file is for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from liquid_dist.config import MoEConfig
from liquid_dist.model.moe import MoELayer

ROOT = Path(__file__).resolve().parents[1]
D_MODEL, FFN, EXPERTS = 256, 512, 8


def _layer(backend: str) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=EXPERTS, top_k=1, dynamic_k=True, k_max=2,
                    expert_ffn_dim=FFN, expert_type="mlp", backend=backend)
    return MoELayer(cfg, d_model=D_MODEL)


def _step(layer: MoELayer, x: torch.Tensor) -> None:
    y, aux = layer(x)
    (y.square().mean() + aux["moe_entropy"] + aux["moe_overuse"]).backward()


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def backend_throughput(token_counts: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """{backend: {tokens: tokens/s of forward+backward}}; unavailable backends get the error."""
    out: dict[str, dict[str, float]] = {}
    for backend in ("grouped_mm", "loop", "megablocks"):
        layer = _layer(backend)
        row: dict[str, float] = {}
        try:
            for n in token_counts:
                x = torch.randn(n, D_MODEL)
                row[str(n)] = n / _median_time(lambda layer=layer, x=x: _step(layer, x), repeats)
        except RuntimeError as exc:
            out[backend] = {"unavailable": str(exc).split(";")[0]}  # type: ignore[dict-item]
            continue
        out[backend] = row
    return out


def _ep_worker(rank: int, port: int, token_counts: list[int], repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from liquid_dist.parallel.distributed import init_distributed
    from liquid_dist.parallel.expert_parallel import _AllToAll, apply_expert_parallel

    init_distributed()
    holder = torch.nn.Module()
    holder.moe = _layer("grouped_mm")
    apply_expert_parallel(holder, ep_size=2)
    # time spent inside the exchanges: wrap the autograd function's both directions
    spent = [0.0]
    forward, backward = _AllToAll.forward, _AllToAll.backward

    def timed_forward(ctx, *args):
        t0 = time.perf_counter()
        out = forward(ctx, *args)
        spent[0] += time.perf_counter() - t0
        return out

    def timed_backward(ctx, grad):
        t0 = time.perf_counter()
        out = backward(ctx, grad)
        spent[0] += time.perf_counter() - t0
        return out

    _AllToAll.forward, _AllToAll.backward = staticmethod(timed_forward), staticmethod(
        timed_backward)
    result = {}
    for n in token_counts:
        torch.manual_seed(rank)
        x = torch.randn(n, D_MODEL)
        _step(holder.moe, x)  # warm-up
        totals, shares = [], []
        for _ in range(repeats):
            dist.barrier()
            spent[0] = 0.0
            t0 = time.perf_counter()
            _step(holder.moe, x)
            total = time.perf_counter() - t0
            totals.append(total)
            shares.append(spent[0] / total)
        result[str(n)] = {"tokens_per_s_per_rank": n / statistics.median(totals),
                          "all_to_all_share": statistics.median(shares)}
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def expert_parallel_share(token_counts: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """ep_size 2 over 2 gloo processes: per token count (per rank), tokens/s and a2a share."""
    from liquid_dist.parallel import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ep_worker, args=(free_port(), token_counts, repeats, queue), nprocs=2,
                       join=True, start_method="spawn")
    return queue.get(timeout=10)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer token counts and repeats")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_cpu.json"))
    args = p.parse_args()
    counts = [256, 1024] if args.quick else [256, 1024, 4096]
    repeats = 3 if args.quick else 5
    torch.set_num_threads(1)  # one core per process, as the 2-process run has
    single = backend_throughput(counts, repeats)
    ep = expert_parallel_share(counts, repeats)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1},
        "layer": {"d_model": D_MODEL, "expert_ffn_dim": FFN, "num_experts": EXPERTS,
                  "top_k": 1, "dynamic_k": True, "k_max": 2, "dtype": "float32",
                  "measure": "forward+backward, median"},
        "note": ("ep2_gloo: 2 processes on this machine, 1 thread each, tokens per rank; "
                 "all_to_all_share = time inside the exchanges (forward and backward, "
                 "waiting for the other rank included) / the layer's forward+backward"),
        "single_process_tokens_per_s": single,
        "ep2_gloo": ep,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
