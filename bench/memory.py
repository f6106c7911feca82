"""Peak resident memory per rank of ZeRO-3 training on CPU, against the ideal.

    python bench/memory.py                                   # the committed protocol
    python bench/memory.py --baseline-repo /tmp/before       # + another checkout's trainer
    python bench/memory.py --cases fits                      # re-measure one case (others kept)
    python bench/memory.py                                   # the baseline's rows kept
    python bench/memory.py --smoke [--output X.json]         # a micro model at W = 2 (the test)

Each case launches the real trainer (``launch/pretrain.py`` under ``torchrun``,
gloo, fp32, ZeRO-3) on the embedded Shakespeare data for ``--steps`` steps and
reads every rank's kernel high-water mark (``VmHWM`` in ``/proc/PID/status``)
from outside, polling, at three marks of rank 0's metrics log: when it logs the
``start`` event (the peak of construction: model, engine, checkpoint restore),
when it logs the last step's ``train`` record (the peak of construction and the
training steps: what the bound speaks of), and before the rank exits (the
peak of the whole run, with the final evaluation and checkpoint save).
``idle`` is the peak of the same
run with a micro model (0.6 M parameters): a rank process with everything but
the model (the stack's code, the process group, the data pipeline).

Every rank runs as users launch it: the trainer fixes glibc's mmap threshold itself
(liquid_dist.train.allocator; a ``--baseline-repo`` trainer from before that runs with
glibc's default). The figures are set
against ZeRO-3's ideal for fp32 AdamW: 16 bytes per
parameter / W (weights, gradients, two moments), plus the bounded working set
of the DeepSpeed config (``zero3_working_set_bytes``: live gathered parameters,
a prefetch and a reduction bucket, the optimizer step's transients of one
sub-group) — and, for the ``new``
trainer, the check ``steps peak <= idle + ideal + working set + activations``, with
activations the micro-batch's measured share (``--activation-allowance-mib``,
stated in the results). ``--baseline-repo`` runs the same cases with another
checkout's trainer (for example the construction before partitioned
construction: ``git worktree add /tmp/before 5791898``), its ``liquid_dist``
first on ``PYTHONPATH``.

Cases (``--cases``): ``scaling`` — ``configs/base-moe.yaml`` cut to 4 + 4
layers (about 0.37 B parameters) at W = 1, 2, 4, the baseline at W = 1, 2
(at 4 its ranks would need most of this 24 GiB machine); ``fits`` — cut to
6 + 6 layers (0.52 B, the size that did not fit before) at W = 4, without
the baseline (about 8.3 GiB per rank there: killed for memory at step 1;
docs/parallelism.md, "Construction"); ``eight`` — the 6 + 6 layers at W = 8,
with ``parallel.ep_size`` 8 and 1 (eight ranks of about 2.6 GiB at ``ep_size``
1: most of this machine). Short
sequences (encoder 64, decoder 32 tokens, micro-batch 1) keep activations
small and steps short on 2 cores. Results (machine, date, settings, per-rank
figures) go to ``--output`` (default ``bench/results/memory.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procstatus import proc_status  # noqa: E402  (bench/, the script's own directory)

MIB = 1 << 20
SHORT = ["data.encoder_length=64", "data.decoder_length=32", "train.micro_batch_size=1",
         "train.grad_accum=1", "train.log_every=1", "train.eval_every=1000000",
         "train.ckpt_every=1000000", "data.num_workers=0", "model.dropout=0.0",
         "parallel.zero_stage=3", "train.precision=fp32"]
CASES = {
    # "baseline": the world sizes at which --baseline-repo runs too; not where it would
    # need more than this 24 GiB machine has (the kernel's OOM killer picks its victims)
    "scaling": {"layers": 4, "worlds": [1, 2, 4], "baseline": [1, 2]},
    "fits": {"layers": 6, "worlds": [4], "baseline": []},
    # W = 8 with and without expert parallelism: the world where a rank's fixed costs
    # (idle, working set) outweigh its partition
    "eight": {"layers": 6, "worlds": [8], "ep": [8, 1], "baseline": []},
}
SMOKE = {"smoke": {"layers": 1, "worlds": [2], "ep": [2], "baseline": []}}
SMOKE_MODEL = ["model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=128",
               "model.moe.expert_ffn_dim=64", "model.moe.num_experts=2", "model.freq_heads=2",
               "model.hyena_filter_dim=8", "model.max_encoder_length=64",
               "model.max_decoder_length=32", "model.window=16", "model.band_block=16"]


def _ranks(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes."""
    import psutil

    found = {}
    try:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")
            except (psutil.Error, OSError):
                continue
            if rank is not None and "python" in child.name().lower():
                found[int(rank)] = child.pid
    except psutil.Error:
        pass
    return found


def launch_ranks(world: int, args: list[str], repo: Path, env_extra: dict[str, str],
            events: Optional[Path], last_step: int, timeout: float) -> dict[str, Any]:
    """Run ``torchrun`` (W ranks) and poll the ranks' memory; see the module doc."""
    from liquid_dist.parallel import free_port

    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world),
           "--master_port", str(free_port()), *args]
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        pids: dict[int, int] = {}
        last: dict[int, dict[str, int]] = {}
        # mark -> rank -> VmHWM when rank 0 logged the mark's record
        marks: dict[str, Any] = {
            "built": lambda r: r.get("event") in ("start", "resume"),
            "stepped": lambda r: r.get("kind") == "train" and r.get("step") == last_step}
        at: dict[str, dict[int, int]] = {name: {} for name in marks}
        while proc.poll() is None:
            if time.monotonic() - start > timeout:
                proc.kill()
                break
            if len(pids) < world:
                pids.update(_ranks(proc.pid))
            for rank, pid in pids.items():
                status = proc_status(pid, ("VmHWM", "VmRSS"))
                if status:
                    last[rank] = status
            pending = [name for name in marks if not at[name]]
            if pending and events is not None and events.is_file():
                records = [json.loads(line) for line in events.read_text().splitlines()
                           if line.strip()]
                for name in pending:
                    if any(marks[name](r) for r in records):
                        at[name] = {rank: s["VmHWM"] for rank, s in last.items()}
            time.sleep(0.05)
        log.seek(0)
        output = log.read()
    return {"returncode": proc.returncode, "wall_s": time.monotonic() - start,
            "peak": [last.get(r, {}).get("VmHWM") for r in range(world)],
            "built": [at["built"].get(r) for r in range(world)],
            "stepped": [at["stepped"].get(r) for r in range(world)],
            "tail": output[-2000:] if proc.returncode else ""}


def model_facts(overrides: list[str], vocab: int, ep_size: int = 1) -> dict[str, int]:
    import torch

    from liquid_dist.config import load_config
    from liquid_dist.model import LiquidFoundationModelOptimized
    from liquid_dist.parallel.deepspeed_config import zero3_working_set, zero3_working_set_bytes

    cfg = load_config(str(ROOT / "configs" / "base-moe.yaml"),
                      [*overrides, f"model.vocab_size={vocab}"])
    with torch.device("meta"):
        model = LiquidFoundationModelOptimized(cfg.model)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "largest_tensor": max(p.numel() for p in model.parameters()),
            "working_set_bytes": zero3_working_set_bytes(zero3_working_set(cfg.model, ep_size),
                                                         "fp32")}


def _row(case: str, world: int, ep: int, trainer: str, facts: dict[str, int], idle: list,
         run: dict[str, Any], allowance: float) -> dict[str, Any]:
    """One result row: the run's per-rank peaks set against the bound (``new`` trainer)."""
    ideal = 16 * facts["parameters"] / world
    working = facts["working_set_bytes"]
    row = {"case": case, "world_size": world, "ep_size": ep, "trainer": trainer, **facts,
           "ideal_mib": ideal / MIB, "working_set_mib": working / MIB,
           "idle_mib": [v / MIB if v else None for v in idle],
           "construction_peak_mib": [v / MIB if v else None for v in run["built"]],
           "steps_peak_mib": [v / MIB if v else None for v in run["stepped"]],
           "peak_mib": [v / MIB if v else None for v in run["peak"]],
           "returncode": run["returncode"], "wall_s": round(run["wall_s"], 1)}
    if trainer == "new" and run["returncode"] == 0:
        bound = [(i or 0) + ideal + working + allowance for i in idle]
        row["bound_mib"] = [b / MIB for b in bound]
        row["within_bound"] = all(pk is not None and pk <= b
                                  for pk, b in zip(run["stepped"], bound, strict=True))
    if run["returncode"]:
        row["tail"] = run["tail"]
    steps = ", ".join(f"{v:.0f}" for v in row["steps_peak_mib"] if v is not None)
    peaks = ", ".join(f"{v:.0f}" for v in row["peak_mib"] if v is not None)
    print(f"    rc {run['returncode']}, {run['wall_s']:.0f} s; peak MiB per rank: steps {steps}, "
          f"run {peaks} (ideal {ideal / MIB:.0f} + working set {working / MIB:.0f})", flush=True)
    return row


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare")
    p.add_argument("--baseline-repo", type=Path, default=None,
                   help="also run every case with this checkout's trainer ('baseline')")
    p.add_argument("--activation-allowance-mib", type=float, default=512.0,
                   help="activations and autograd buffers of one micro-batch, per rank")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a micro model at W = 2 (the test)")
    args = p.parse_args(argv)
    cases = SMOKE if args.smoke else {k: CASES[k] for k in args.cases}
    output = args.output or (Path(tempfile.mkdtemp(prefix="memory_smoke_")) / "memory.json"
                             if args.smoke else ROOT / "bench" / "results" / "memory.json")
    if not (args.data / "shards").is_dir():
        subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare_shakespeare.py"),
                        "--output", str(args.data)], check=True)
    from liquid_dist.data import Tokenizer

    vocab = Tokenizer(str(args.data / "tokenizer" / "tokenizer.model")).vocab_size
    trainers = {"new": ROOT}
    if args.baseline_repo is not None:
        trainers["baseline"] = args.baseline_repo.resolve()
    data = [f"data.tokenizer={args.data / 'tokenizer' / 'tokenizer.model'}",
            f"data.train_shards={args.data / 'shards'}", f"data.val_shards={args.data / 'shards'}"]

    def train(world: int, model: list[str], repo: Path, trainer: str) -> dict[str, Any]:
        run_dir = Path(tempfile.mkdtemp(prefix=f"memory_{world}_"))
        launch_args = [str(repo / "launch" / "pretrain.py"), "--config",
                       str(ROOT / "configs" / "base-moe.yaml"), "--resume", "none"]
        for o in [*model, *SHORT, *data, f"train.max_steps={args.steps}",
                  f"train.run_dir={run_dir}"]:
            launch_args += ["--set", o]
        env = {"PYTHONPATH": str(repo)}  # this checkout's code, whatever is installed
        try:
            return launch_ranks(world, launch_args, repo, env, run_dir / "metrics.jsonl",
                           args.steps, args.timeout)
        finally:  # a run's checkpoint is GBs: never leave it behind
            shutil.rmtree(run_dir, ignore_errors=True)

    rows: list[dict[str, Any]] = []
    recorded = {k: str(v) for k, v in trainers.items()}
    if not args.smoke and output.is_file():  # the rows not measured now are kept
        before = json.loads(output.read_text())
        rows = [r for r in before["rows"]
                if r["case"] not in cases or r["trainer"] not in trainers]
        recorded = {**{k: v for k, v in before["settings"]["trainers"].items()
                       if any(r["trainer"] == k for r in rows)}, **recorded}
    idle: dict[int, list] = {}

    def write() -> None:  # after every row: an interrupted protocol keeps what it measured
        result = {"date": datetime.date.today().isoformat(),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version()},
                  "settings": {"config": "configs/base-moe.yaml", "short": SHORT,
                               "steps": args.steps, "vocab_size": vocab,
                               "malloc": "as launched (liquid_dist.train.allocator)",
                               "activation_allowance_mib": args.activation_allowance_mib,
                               "trainers": recorded},
                  "rows": rows}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")

    for name, case in cases.items():
        model = SMOKE_MODEL if args.smoke else []
        model = [*model, f"model.n_encoder_layers={case['layers']}",
                 f"model.n_decoder_layers={case['layers']}"]
        for world in case["worlds"]:
            if world not in idle:
                print(f"idle rank: W={world} ...", flush=True)
                idle[world] = train(world, [*SMOKE_MODEL, "model.n_encoder_layers=1",
                                            "model.n_decoder_layers=1"], ROOT, "new")["peak"]
            for ep in case.get("ep", [1]):
                facts = model_facts([*model, *SHORT], vocab, ep)
                for trainer, repo in trainers.items():
                    if trainer == "baseline" and world not in case["baseline"]:
                        continue
                    print(f"{name}: W={world} ep={ep} {trainer} "
                          f"({facts['parameters']:,} parameters) ...", flush=True)
                    run = train(world, [*model, f"parallel.ep_size={ep}"], repo, trainer)
                    rows.append(_row(name, world, ep, trainer, facts, idle[world], run,
                                     args.activation_allowance_mib * MIB))
                    write()
    write()
    print(f"wrote {output}")
    failed = [r for r in rows if r["trainer"] == "new"
              and (r["returncode"] != 0 or not r.get("within_bound"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
