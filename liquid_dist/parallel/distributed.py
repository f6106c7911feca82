"""Process-group set-up: rank discovery from the launcher's environment, device, backend.

Every launcher describes a process by environment variables; they are mapped
here to one :class:`DistEnv`, in this order of precedence:

1. ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``deepspeed``, ``torchrun``);
2. ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` (one ``srun`` task
   per rank, no per-node launcher; ``MASTER_ADDR`` must then be set, e.g. to
   the first host of the allocation);
3. nothing: a single process (rank 0 of 1) on a free local port.

``MASTER_PORT`` defaults to 29500 when a launcher gave ranks but no port.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from liquid_dist.config import ConfigError
from liquid_dist.parallel.ds_compat import skip_shm_comm_build


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as exc:
        raise ConfigError(name, env[name], "an integer environment variable") from exc


def resolve_dist_env(environ: Optional[Mapping[str, str]] = None,
                     local_rank_arg: Optional[int] = None) -> DistEnv:
    """Map the launcher's environment to a :class:`DistEnv` (see the module docstring).

    ``local_rank_arg`` is the ``--local_rank`` the ``deepspeed`` launcher passes;
    it is used only when ``LOCAL_RANK`` is absent.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (local_rank_arg or 0)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world > 1 and "MASTER_ADDR" not in env:
            raise ConfigError("MASTER_ADDR", None,
                              "the rendezvous host (e.g. the first host of "
                              "`scontrol show hostnames $SLURM_JOB_NODELIST`) when ranks come "
                              "from SLURM_PROCID/SLURM_NTASKS")
    else:
        return DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                       master_port=int(env.get("MASTER_PORT", 0)) or free_port())
    if not 0 <= rank < world:
        raise ConfigError("RANK", rank, f"0 <= rank < world size ({world})")
    return DistEnv(rank=rank, world_size=world, local_rank=local,
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(env.get("MASTER_PORT", 29500)))


def device_type() -> str:
    """``cuda`` when CUDA is available, else ``cpu``: the device every rank trains on."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (:func:`device_type`), else the CPU."""
    if device_type() == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(local_rank_arg: Optional[int] = None) -> tuple[DistEnv, torch.device]:
    """Create the default process group (NCCL on GPU, gloo on CPU); returns (env, device).

    Exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that
    DeepSpeed never falls back to MPI discovery.
    """
    import deepspeed

    dist_env = resolve_dist_env(local_rank_arg=local_rank_arg)
    os.environ.update(RANK=str(dist_env.rank), WORLD_SIZE=str(dist_env.world_size),
                      LOCAL_RANK=str(dist_env.local_rank), MASTER_ADDR=dist_env.master_addr,
                      MASTER_PORT=str(dist_env.master_port))
    device = select_device(dist_env.local_rank)
    skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False)
    return dist_env, device


def exit_process(status: int) -> None:
    """End a process that has used a process group: flush, then leave without
    interpreter finalisation (``os._exit``).

    DeepSpeed keeps references to the process groups it created (ZeRO's, the
    experts'), so some outlive ``destroy_process_group`` until the interpreter tears
    its objects down; a gloo worker thread that then frees a tensor with a Python
    object needs the interpreter lock of an interpreter that is finalising, the
    thread is unwound, and the process aborts ("terminate called without an active
    exception", SIGABRT, about one run in several hundred here; pytorch/pytorch
    #190489). Every file the run writes is closed and its work done before this
    point; nothing is left for finalisation to do but that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
