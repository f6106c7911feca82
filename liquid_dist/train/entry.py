"""The pretraining entry point behind ``launch/pretrain.py``.

Exit statuses (liquid_dist.train.exit_status, docs/training.md): 0 trained to
``train.max_steps``; 2 bad configuration or missing input, found before any
process group, or no checkpoint that verifies, found before anything is built; 3
the loss diverged (non-finite on more than ``train.max_nan_skips`` steps in a
row, or a spike again right after a rewind);
75 preempted (SIGTERM / SIGUSR1: checkpoint written, requeue and ``--resume
auto``); 1 anything else (a traceback on stderr). Rank 0 writes each
status it returns, with the step and the reason, to ``RUN_DIR/EXIT``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

from liquid_dist.checkpoint_format import CheckpointError
from liquid_dist.config import Config, ConfigError, load_config
from liquid_dist.data.errors import DataError
from liquid_dist.parallel.distributed import (
    DistEnv,
    device_type,
    init_distributed,
    resolve_dist_env,
)
from liquid_dist.parallel.ds_compat import DeepSpeedVersionError, check_deepspeed_version
from liquid_dist.train import watchdog
from liquid_dist.train.allocator import fix_mmap_threshold
from liquid_dist.train.checkpoint import find_damage_together
from liquid_dist.train.exit_status import (
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_OK,
    ExitRecord,
    write_exit_record,
)
from liquid_dist.train.faults import Faults
from liquid_dist.train.heartbeat import Heartbeat
from liquid_dist.train.prepare import resolve_run, resolve_start
from liquid_dist.train.signals import StopFlag
from liquid_dist.train.spikes import LossSpikeError
from liquid_dist.train.trainer import NonFiniteLossError, Trainer


def argument_parser() -> argparse.ArgumentParser:
    """``launch/pretrain.py``'s arguments (also read by liquid_dist.train.requeue)."""
    p = argparse.ArgumentParser(
        description="Pretrain LiquidFoundationModelOptimized with DeepSpeed (docs/training.md)")
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto (the newest valid checkpoint of train.run_dir, if any), none, "
                        "or a checkpoint / run directory")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (LOCAL_RANK wins when both exist)")
    return p


def use_deterministic_algorithms() -> None:
    """``train.deterministic``: every operation's deterministic implementation (an error
    names an operation that has none), cuBLAS's fixed workspace (set before CUDA starts:
    cuBLAS reads it once) and no cuDNN autotuning."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


REFUSALS = (ConfigError, FileNotFoundError, CheckpointError, DataError,
            DeepSpeedVersionError)
"""What status 2 means: a config, input or checkpoint that retrying cannot mend."""


def _say(rank: int, message: str) -> None:
    # every rank finds the same problem; one copy of the message is enough
    if rank == 0:
        print(message, file=sys.stderr, flush=True)


def _refuse(exc: Exception, cfg: Optional[Config], rank: int) -> int:
    _say(rank, f"error: {exc}")
    # into a run directory that exists (slurm/pretrain.sh makes it): a bad
    # config does not leave one behind
    if cfg is not None and rank == 0 and Path(cfg.train.run_dir).is_dir():
        write_exit_record(Path(cfg.train.run_dir), ExitRecord(EXIT_CONFIG, None, str(exc)))
    return EXIT_CONFIG


def pretrain(config_path: str, overrides: Iterable[str] = (), *, resume: str = "auto",
             local_rank: Optional[int] = None,
             train_loader_factory: Optional[Callable[[Config, DistEnv], Any]] = None) -> int:
    """Load the config and resolve it into the run plan, create the process group, find
    the start point (liquid_dist.train.prepare: the ranks verify a checkpoint together),
    train; returns the exit status.

    The stop handlers are installed first: a SIGTERM / SIGUSR1 that comes while the
    process starts (Slurm may send the time-limit warning that early) is kept and
    honoured at the first step boundary, not lost or fatal. Then glibc's mmap
    threshold is fixed (liquid_dist.train.allocator).
    """
    stop = StopFlag().install()
    fix_mmap_threshold()
    try:
        return _pretrain(config_path, overrides, resume, local_rank, train_loader_factory,
                         stop)
    finally:
        stop.restore()


def _pretrain(config_path: str, overrides: Iterable[str], resume: str,
              local_rank: Optional[int],
              train_loader_factory: Optional[Callable[[Config, DistEnv], Any]],
              stop: StopFlag) -> int:
    rank, cfg = 0, None
    try:
        dist_env = resolve_dist_env(local_rank_arg=local_rank)
        rank = dist_env.rank
        check_deepspeed_version()
        cfg = load_config(config_path, list(overrides))
        plan = resolve_run(cfg, world_size=dist_env.world_size, device_type=device_type())
    except REFUSALS as exc:
        return _refuse(exc, cfg, rank)
    import torch.distributed as dist

    if plan.config.train.deterministic:
        use_deterministic_algorithms()
    env, device = init_distributed(local_rank)
    try:
        heartbeat = Heartbeat.for_run(plan.config.train, env.rank, env.local_rank)
        with heartbeat:
            if heartbeat.directory is not None and env.local_rank == 0:
                watchdog.start(heartbeat.directory, Path(plan.config.train.run_dir))
            try:  # the ranks verify a checkpoint together, each reading its share
                start = resolve_start(plan, resume, damage=find_damage_together)
            except REFUSALS as exc:
                return _refuse(exc, cfg, env.rank)
            loader = train_loader_factory(plan.config, env) if train_loader_factory else None
            trainer = Trainer(plan, start, env, device, train_loader=loader,
                              faults=Faults.from_environment(), heartbeat=heartbeat)
            try:
                status = trainer.run(stop)
                reason = "done" if status == EXIT_OK else stop.describe()
            except (NonFiniteLossError, LossSpikeError) as exc:
                _say(env.rank, f"error: {exc}")
                status, reason = EXIT_DIVERGED, str(exc)
        if env.rank == 0:
            write_exit_record(Path(plan.config.train.run_dir),
                              ExitRecord(status, trainer.state.step, reason))
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
