"""Where a rank's resident memory peaks within a ZeRO-3 step: the trainer run under
``torchrun`` through this script, which samples each rank's resident set every 2 ms
and keeps its peak per phase.

    python bench/memory_phases.py            # the committed protocol (about 15 minutes)
    python bench/memory_phases.py --smoke    # a micro model at W = 2 (the test)

The protocol is bench/memory.py's ``eight`` case with ``parallel.ep_size=8``:
``configs/base-moe.yaml`` cut to 6 + 6 layers (0.53 B parameters), W = 8, its
short sequences, fp32, 2 steps, no validation data (no evaluation). Each rank
runs ``launch/pretrain.py`` unchanged as ``__main__`` of this script (``--out DIR
-- SCRIPT ARGS``): phases are the start (imports, construction) up to
``deepspeed.initialize``, the initialisation, then
each call of the DeepSpeed engine's ``forward``, ``backward`` and ``step`` and
the time after it. A rank writes ``DIR/rankR.json`` (per phase: its resident set,
``VmRSS``, at the start and the peak) after its initialisation, after every
optimizer step and at exit. Results (per phase, the range over ranks; machine,
date, settings) go to ``--output`` (default ``bench/results/memory_phases.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory  # noqa: E402  (bench/, the script's own directory)

MIB = 1 << 20


class PhasePeaks:
    """This process's resident set: its value at the start of each phase and its peak
    within it, sampled by a daemon thread."""

    def __init__(self, out: Path, rank: int, period_s: float = 0.002):
        self.out, self.rank, self.period_s = out, rank, period_s
        self.phases: list[dict[str, Any]] = []
        self.enter("start")
        threading.Thread(target=self._sample, daemon=True).start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def enter(self, name: str) -> None:
        now = self.rss()
        self.phases.append({"phase": name, "start": now, "peak": now})

    def _sample(self) -> None:
        while True:
            current = self.phases[-1]
            current["peak"] = max(current["peak"], self.rss())
            time.sleep(self.period_s)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        rows = [{"phase": p["phase"], "start_mib": p["start"] / MIB, "peak_mib": p["peak"] / MIB}
                for p in self.phases]
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(rows, indent=1) + "\n")


def run(out: Path, script: list[str]) -> None:
    """Run ``script`` (a path and its arguments) as ``__main__`` with the phases observed."""
    peaks = PhasePeaks(out, int(os.environ.get("RANK", "0")))
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    initialize = deepspeed.initialize

    def observed_initialize(*args, **kwargs):
        peaks.enter("initialize")
        result = initialize(*args, **kwargs)
        peaks.enter("after initialize")
        peaks.write()
        return result

    deepspeed.initialize = observed_initialize
    for name in ("forward", "backward", "step"):
        method = getattr(DeepSpeedEngine, name)

        def observed(self, *args, _name=name, _method=method, **kwargs):
            peaks.enter(_name)
            result = _method(self, *args, **kwargs)
            peaks.enter(f"after {_name}")
            if _name == "step":
                peaks.write()
            return result

        setattr(DeepSpeedEngine, name, observed)
    sys.argv = script
    runpy.run_path(script[0], run_name="__main__")
    peaks.write()


def summarise(directory: Path) -> dict[str, Any]:
    ranks = sorted(directory.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    if not ranks:
        raise SystemExit(f"{directory}: no rank*.json (run the trainer through this script)")
    per_rank = [json.loads(p.read_text()) for p in ranks]
    count = min(len(rows) for rows in per_rank)
    phases = []
    for i in range(count):
        names = {rows[i]["phase"] for rows in per_rank}
        if len(names) != 1:
            raise SystemExit(f"{directory}: the ranks' phase {i} differs: {sorted(names)}")
        phases.append({"phase": names.pop(),
                       **{f"{key}_mib": [round(min(r[i][f"{key}_mib"] for r in per_rank)),
                                         round(max(r[i][f"{key}_mib"] for r in per_rank))]
                          for key in ("start", "peak")}})
    return {"date": datetime.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "ranks": len(per_rank), "phases": phases}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:  # a rank: run the trainer observed
        cut = argv.index("--")
        p = argparse.ArgumentParser()
        p.add_argument("--out", type=Path, required=True)
        run(p.parse_args(argv[:cut]).out, argv[cut + 1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a micro model at W = 2 (the test)")
    args = p.parse_args(argv)
    if args.smoke:
        args.world, args.layers, args.ep = 2, 1, 2
    output = args.output or (Path(tempfile.mkdtemp(prefix="phases_smoke_")) / "phases.json"
                             if args.smoke else ROOT / "bench" / "results" / "memory_phases.json")
    if not (args.data / "shards").is_dir():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare_shakespeare.py"),
                        "--output", str(args.data)], check=True)
    settings = [*(memory.SMOKE_MODEL if args.smoke else []),
                f"model.n_encoder_layers={args.layers}", f"model.n_decoder_layers={args.layers}",
                f"parallel.ep_size={args.ep}", *memory.SHORT,
                f"train.max_steps={args.steps}"]
    run_dir, out = Path(tempfile.mkdtemp(prefix="phases_run_")), Path(tempfile.mkdtemp(
        prefix="phases_ranks_"))
    launch = [str(Path(__file__).resolve()), "--out", str(out), "--",
              str(ROOT / "launch" / "pretrain.py"), "--config",
              str(ROOT / "configs" / "base-moe.yaml"), "--resume", "none"]
    for o in [*settings, f"data.tokenizer={args.data / 'tokenizer' / 'tokenizer.model'}",
              f"data.train_shards={args.data / 'shards'}", "data.val_shards=null",
              f"train.run_dir={run_dir}"]:
        launch += ["--set", o]
    print(f"W={args.world}, {args.layers} + {args.layers} layers, ep_size {args.ep} ...",
          flush=True)
    try:
        ran = memory.launch_ranks(args.world, launch, ROOT, {"PYTHONPATH": str(ROOT)}, None,
                                  args.steps, args.timeout)
    finally:  # a run's checkpoint is GBs: never leave it behind
        shutil.rmtree(run_dir, ignore_errors=True)
    if ran["returncode"] != 0:
        print(ran["tail"], file=sys.stderr)
        return 1
    result = {**summarise(out), "settings": {"config": "configs/base-moe.yaml",
                                             "world": args.world, "overrides": settings},
              "peak_mib": [v / MIB if v else None for v in ran["peak"]]}
    shutil.rmtree(out, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    for ph in result["phases"]:
        print(f"  {ph['phase']:<18} start {ph['start_mib'][0]:>6}-{ph['start_mib'][1]:<6} "
              f"peak {ph['peak_mib'][0]:>6}-{ph['peak_mib'][1]:<6} MiB")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
