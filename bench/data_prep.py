"""Shard preparation throughput: make_shards.py with 1 and 2 tasks, against a baseline.

    python bench/data_prep.py [--copies 64] [--baseline-checkout DIR]
        [--out bench/results/data_prep.json]

The Shakespeare corpus (prepare_shakespeare.py, in a temporary folder) is
copied ``--copies`` times into one input folder; each row runs the
command-line tool exactly as a user does (a fresh process: interpreter,
imports and tokenizer load included) into an empty output and reports the
tokens written per second of wall time, and the peak resident memory of its
largest process. Rows: ``--tasks 1`` and ``--tasks 2
--workers 2`` of this checkout, then, with ``--baseline-checkout``, that
checkout's ``data_prep/make_shards.py`` with ``--workers 1`` and ``2`` on
the same inputs (its own ``liquid_dist`` first on PYTHONPATH), so the ratios
come from one run on one machine. Results, with machine and date, go to a
JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data_prep"))
sys.path.insert(0, str(ROOT / "bench"))
import prepare_shakespeare  # noqa: E402
from data_loader import machine  # noqa: E402

from liquid_dist.data import read_manifest  # noqa: E402

# runs a command and prints the largest resident set of it and its descendants, in KiB
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
             "sys.exit(code)")


def timed(label: str, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    """Run ``cmd`` (a make_shards.py command writing ``out``): tokens/s of the manifest and
    the peak resident memory of its largest process."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label}: exit {done.returncode}\n{done.stderr[-3000:]}")
    totals = read_manifest(out)["totals"]
    tokens = totals["train"]["tokens"] + totals["val"]["tokens"]
    shutil.rmtree(out)
    return {"run": label, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds),
            "peak_rss_mib": round(int(done.stderr.split()[-1]) / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=64, help="copies of the corpus (1.8M tokens each)")
    p.add_argument("--baseline-checkout", type=Path,
                   help="another checkout whose make_shards.py is the baseline")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_prep.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        data = scratch / "shakespeare"
        prepare_shakespeare.prepare(data)
        inputs = scratch / "inputs"
        inputs.mkdir()
        for i in range(args.copies):
            shutil.copy(data / "text" / "shakespeare.jsonl", inputs / f"copy{i:03d}.jsonl")
        common = ["--tokenizer", str(data / "tokenizer" / "tokenizer.model"), "--input",
                  str(inputs), "--shard-size-mb", "8", "--val-fraction", "0.05"]
        env = dict(os.environ)
        rows = []
        for tasks in (1, 2):
            out = scratch / f"tasks{tasks}"
            rows.append(timed(f"make_shards --tasks {tasks}", [
                sys.executable, str(ROOT / "data_prep" / "make_shards.py"), *common,
                "--output", str(out), "--tasks", str(tasks), "--workers", str(tasks)], out, env))
        if args.baseline_checkout is not None:
            base = args.baseline_checkout.resolve()
            base_env = dict(env, PYTHONPATH=str(base))
            for workers in (1, 2):
                out = scratch / f"baseline{workers}"
                rows.append(timed(f"baseline make_shards --workers {workers}", [
                    sys.executable, str(base / "data_prep" / "make_shards.py"), *common,
                    "--output", str(out), "--workers", str(workers)], out, base_env))
        first = rows[0]["tokens_per_s"]
        for row in rows:
            row["ratio_to_tasks_1"] = round(row["tokens_per_s"] / first, 3)
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "corpus": {"copies": args.copies, "bytes": sum(
                f.stat().st_size for f in inputs.iterdir())},
            "baseline": str(args.baseline_checkout) if args.baseline_checkout else None,
            "rows": rows,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
