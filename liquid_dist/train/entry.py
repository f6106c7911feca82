"""The pretraining entry point behind ``launch/pretrain.py``.

Exit statuses (also in docs/training.md):

* 0  — trained to ``train.max_steps`` (final checkpoint written);
* 2  — bad configuration or missing input (config, tokenizer, shards, the checkpoint to
  resume or start from), found before any process group exists;
* 3  — stopped: non-finite loss on more than ``train.max_nan_skips`` steps in a row;
* 75 — preempted (SIGTERM / SIGUSR1): checkpoint written, requeue and ``--resume auto``;
* 1  — anything else (traceback on stderr).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
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
from liquid_dist.train.faults import Faults
from liquid_dist.train.prepare import resolve_run
from liquid_dist.train.signals import StopFlag
from liquid_dist.train.trainer import NonFiniteLossError, Trainer

EXIT_CONFIG = 2
EXIT_NONFINITE = 3


def use_deterministic_algorithms() -> None:
    """``train.deterministic``: every operation's deterministic implementation (an error
    names an operation that has none), cuBLAS's fixed workspace (set before CUDA starts:
    cuBLAS reads it once) and no cuDNN autotuning."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _say(message: str) -> None:
    # every rank reads the config; one copy of the message is enough
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(message, file=sys.stderr, flush=True)


def pretrain(config_path: str, overrides: Iterable[str] = (), *, resume: str = "auto",
             local_rank: Optional[int] = None,
             train_loader_factory: Optional[Callable[[Config, DistEnv], Any]] = None) -> int:
    """Load the config and resolve it into the run plan (liquid_dist.train.prepare), create
    the process group, train; returns the exit status.

    The stop handlers are installed first: a SIGTERM / SIGUSR1 that comes while the
    process starts (Slurm may send the time-limit warning that early) is kept and
    honoured at the first step boundary, not lost or fatal.
    """
    stop = StopFlag().install()
    try:
        return _pretrain(config_path, overrides, resume, local_rank, train_loader_factory,
                         stop)
    finally:
        stop.restore()


def _pretrain(config_path: str, overrides: Iterable[str], resume: str,
              local_rank: Optional[int],
              train_loader_factory: Optional[Callable[[Config, DistEnv], Any]],
              stop: StopFlag) -> int:
    try:
        check_deepspeed_version()
        plan = resolve_run(load_config(config_path, list(overrides)),
                           world_size=resolve_dist_env(local_rank_arg=local_rank).world_size,
                           device_type=device_type(), resume=resume)
    except (ConfigError, FileNotFoundError, CheckpointError, DataError,
            DeepSpeedVersionError) as exc:
        _say(f"error: {exc}")
        return EXIT_CONFIG
    import torch.distributed as dist

    if plan.config.train.deterministic:
        use_deterministic_algorithms()
    env, device = init_distributed(local_rank)
    try:
        loader = train_loader_factory(plan.config, env) if train_loader_factory else None
        return Trainer(plan, env, device, train_loader=loader,
                       faults=Faults.from_environment()).run(stop)
    except NonFiniteLossError as exc:
        _say(f"error: {exc}")
        return EXIT_NONFINITE
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
