"""Shared data and launch helpers of the training-engine tests (tests/test_train_*.py).

Plain cached functions, not pytest fixtures (no conftest): the first caller
builds a 600-piece tokenizer and a few shards from Shakespeare scenes into one
temporary directory (a few seconds), removed at exit. :func:`launch` runs
``launch/pretrain.py`` through the real ``deepspeed`` or ``torchrun`` launcher
on CPU (gloo) with a micro model, so every run takes seconds.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="liquid_train_tests_"))
atexit.register(shutil.rmtree, TMP, True)
BIN = Path(sys.executable).parent

MICRO_MODEL = [
    "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_encoder_layers=1",
    "model.n_decoder_layers=1", "model.ffn_dim=64", "model.max_encoder_length=32",
    "model.max_decoder_length=16", "model.window=8", "model.freq_heads=2",
    "model.band_block=16", "model.hyena_filter_dim=8", "model.moe.num_experts=2",
    "model.moe.k_max=2", "model.moe.expert_ffn_dim=32", "model.dropout=0.0",
]


@dataclass(frozen=True)
class TrainData:
    tokenizer: Path
    shards: Path


def _shakespeare():
    spec = importlib.util.spec_from_file_location("train_tests_shakespeare",
                                                  REPO / "data_prep" / "shakespeare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@functools.cache
def train_data() -> TrainData:
    """Tokenizer (600 pieces, 100 sentinels) and train/val shards of 40 scenes."""
    from liquid_dist.data import train_tokenizer
    from liquid_dist.data.prep import PrepSettings, prepare_shards

    scenes = [s.text for _, s in zip(range(120), _shakespeare().iter_scenes(), strict=False)]
    tok = train_tokenizer(scenes[:80], TMP / "tokenizer", vocab_size=600, seed=0,
                          num_threads=1)
    corpus = TMP / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in scenes[80:120]))
    prepare_shards([corpus], TMP / "shards",
                   PrepSettings(str(tok), shard_size_mb=0.05, val_fraction=0.1))
    return TrainData(tokenizer=tok, shards=TMP / "shards")


def base_overrides(run_dir: Path, *, steps: int = 8) -> list[str]:
    """A micro model on train_data(): seconds per run, one log line per step."""
    data = train_data()
    return MICRO_MODEL + [
        f"data.tokenizer={data.tokenizer}", f"data.train_shards={data.shards}",
        f"data.val_shards={data.shards}", "data.encoder_length=32", "data.decoder_length=16",
        "data.num_workers=0", "data.shuffle_buffer=16", "data.objective=mixture",
        f"train.run_dir={run_dir}", f"train.max_steps={steps}", "train.micro_batch_size=2",
        "train.grad_accum=1", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=1",
        f"train.ckpt_every={steps}", "train.keep_last=3", f"train.eval_every={steps}",
        "train.eval_steps=2", "train.seed=7", "train.monitor_every=4", "parallel.zero_stage=3",
    ]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def launch_cmd(nproc: int, overrides: Sequence[str], *, launcher: str = "deepspeed",
               resume: str = "auto", script: str = "launch/pretrain.py",
               config: str = "configs/tiny.yaml", script_args: Sequence[str] = ()) -> list[str]:
    from liquid_dist.parallel import free_port

    port = str(free_port())
    if launcher == "deepspeed":
        head = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port]
    elif launcher == "torchrun":
        head = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        head = [sys.executable]
    args = [script, *script_args, "--config", config, "--resume", resume]
    for o in overrides:
        args += ["--set", o]
    return head + args


def launch(nproc: int, overrides: Sequence[str], *, launcher: str = "deepspeed",
           resume: str = "auto", script: str = "launch/pretrain.py", timeout: float = 300,
           script_args: Sequence[str] = (),
           extra_env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run to completion; returns the CompletedProcess (stdout+stderr in ``.stdout``)."""
    return subprocess.run(
        launch_cmd(nproc, overrides, launcher=launcher, resume=resume, script=script,
                   script_args=script_args),
        cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start(nproc: int, overrides: Sequence[str], *, extra_env: Optional[dict[str, str]] = None,
          log: Path) -> subprocess.Popen:
    """Start a deepspeed-launched run in the background, output to ``log``."""
    fh = open(log, "w")
    return subprocess.Popen(launch_cmd(nproc, overrides), cwd=REPO, env=env(**(extra_env or {})),
                            stdout=fh, stderr=subprocess.STDOUT, text=True)


def train_losses(run_dir: Path) -> dict[int, float]:
    """{step: total loss} of the train records of a run."""
    from liquid_dist.train.metrics import read_metrics

    return {r["step"]: float(r["loss"]) for r in read_metrics(run_dir, "train")}


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return proc.stdout[-n:]


@functools.cache
def reference_run() -> Path:
    """2 ranks, ZeRO-3, 8 uninterrupted steps through torchrun: the baseline of several tests."""
    run_dir = TMP / "reference"
    proc = launch(2, base_overrides(run_dir), launcher="torchrun")
    assert proc.returncode == 0, tail(proc)
    return run_dir


@functools.cache
def union_run() -> Path:
    """1 process fed rank 0's then rank 1's batch of a 2-rank split (grad_accum 2):
    the same global batches as reference_run() (tests/train_union_harness.py)."""
    run_dir = TMP / "one_rank_union"
    proc = launch(1, base_overrides(run_dir) + ["train.grad_accum=2"], launcher="python",
                  script="tests/train_union_harness.py", script_args=["--ranks", "2"])
    assert proc.returncode == 0, tail(proc)
    return run_dir
