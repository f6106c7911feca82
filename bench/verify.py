"""What verifying a checkpoint costs: seconds per GB of ``verify_checkpoint``.

    python bench/verify.py                    # 2 GiB in 8 files; bench/results/verify.json
    python bench/verify.py --gib 0.01 --output X.json     # the smoke test

A checkpoint-shaped directory of random files (``--files`` of ``--gib`` in all)
gets its ``checksums.json`` from the library's own functions (as
``CheckpointManager.save`` writes it), then ``verify_checkpoint`` reads it back,
``--repeats`` times: with the files in the page cache (just written: the
hashing alone, what one core of this machine does), and, where the kernel lets
root drop the page cache, cold (the disk too). Then ``--ranks`` gloo processes
verify it together as a launch does (``find_damage_together``: each hashes its
share), page cache warm, against one process in the same run. Results:
seconds, GB/s and seconds per GB, with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from liquid_dist.checkpoint_format import (  # noqa: E402
    CHECKSUMS,
    checksummed_files,
    file_digest,
    verify_checkpoint,
)


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _together(rank: int, world: int, store: str, ckpt: str, repeats: int,
              out: str) -> None:
    import torch.distributed as dist

    from liquid_dist.train.checkpoint import find_damage_together

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        assert find_damage_together(Path(ckpt)) == []
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _time_together(ckpt: Path, world: int, repeats: int) -> list[float]:
    """Seconds for ``world`` gloo processes to verify ``ckpt`` together (barrier to
    barrier), ``repeats`` times."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="verify_pg_") as tmp:
        out = Path(tmp) / "times.json"
        mp.spawn(_together, args=(world, str(Path(tmp) / "store"), str(ckpt), repeats,
                                  str(out)), nprocs=world)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2,
                   help="processes that verify together (default 2: this machine's cores)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "verify.json")
    args = p.parse_args(argv)
    size = int(args.gib * (1 << 30)) // args.files
    with tempfile.TemporaryDirectory(prefix="verify_bench_") as tmp:
        ckpt = Path(tmp) / "step_00000001"
        ckpt.mkdir()
        for i in range(args.files):
            with open(ckpt / f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt", "wb") as fh:
                left = size
                while left:
                    n = min(left, 64 << 20)
                    fh.write(os.urandom(n))
                    left -= n
        total = sum(f.stat().st_size for f in ckpt.iterdir())
        start = time.perf_counter()
        files = {name: file_digest(ckpt / name) for name in checksummed_files(ckpt)}
        record_s = time.perf_counter() - start
        (ckpt / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}))
        results = {}
        for mode in ("warm", "cold"):
            times = []
            for _ in range(args.repeats):
                if mode == "cold" and not _drop_page_cache():
                    break
                start = time.perf_counter()
                verify_checkpoint(ckpt)
                times.append(time.perf_counter() - start)
            if times:
                s = statistics.median(times)
                results[mode] = {"seconds": times, "median_s": s, "gb_per_s": total / s / 1e9,
                                 "s_per_gb": s / (total / 1e9)}
        if "cold" not in results:
            results["cold"] = "not measured: the page cache cannot be dropped here"
        verify_checkpoint(ckpt)  # the page cache warm again
        for mode, world in (("together_1", 1), (f"together_{args.ranks}", args.ranks)):
            times = _time_together(ckpt, world, args.repeats)
            s = statistics.median(times)
            results[mode] = {"ranks": world, "seconds": times, "median_s": s,
                             "gb_per_s": total / s / 1e9, "s_per_gb": s / (total / 1e9)}
        results["speedup"] = (results["together_1"]["median_s"]
                              / results[f"together_{args.ranks}"]["median_s"])
    out = {"date": datetime.date.today().isoformat(),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version()},
           "settings": {"bytes": total, "files": args.files, "repeats": args.repeats,
                        "ranks": args.ranks, "algorithm": "sha256"},
           "record_s": record_s, "verify": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    warm = results["warm"]
    print(f"{total / 1e9:.2f} GB in {args.files} files: verify {warm['median_s']:.2f} s "
          f"({warm['s_per_gb']:.2f} s/GB, page cache warm); cold: "
          + (f"{results['cold']['s_per_gb']:.2f} s/GB" if isinstance(results["cold"], dict)
             else results["cold"]) + f"; {args.ranks} ranks together: "
          f"{results[f'together_{args.ranks}']['s_per_gb']:.2f} s/GB, "
          f"{results['speedup']:.2f}x one; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
