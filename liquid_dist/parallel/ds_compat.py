"""Every use of DeepSpeed's internals, in one place, for one DeepSpeed version.

The project uses DeepSpeed's public API directly (``deepspeed.initialize``,
``save_checkpoint`` / ``load_checkpoint``, ``zero.GatheredParameters``,
``utils.safe_get_*`` / ``safe_set_*``, ``set_z3_leaf_modules``). What it
needs beyond that is here, and nowhere else:

* the expert-parallel process groups (``deepspeed.utils.groups._*``) and their
  rank layout, which checkpoints are read by;
* the parameter attributes ZeRO-3 keys its expert placement on (the ones
  AutoEP sets, docs/parallelism.md);
* the ZeRO-3 optimizer's fp32 partitions and AdamW state, for loading a
  checkpoint written on another number of ranks (docs/parallelism.md,
  "Elastic resume");
* the class paths DeepSpeed pickles into its checkpoint files;
* skipping the JIT build of an inference-only communication op;
* the global gradient norm of the update being applied, which ZeRO stores on its
  optimizer before it calls the wrapped one (a loss-spike check reads it there).

:func:`check_deepspeed_version` runs at start-up (before any process group)
and whenever a checkpoint is read: these internals are known for
:data:`DEEPSPEED_VERSION` only. Importing this module does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

import torch

DEEPSPEED_VERSION = "0.19.8"
"""The DeepSpeed release this module was written for (scripts/setup_env.sh pins it)."""

EP_PLACEMENT_FAMILY = "autoep_expert"
"""ZeRO-3's placement family of expert parameters (runtime/zero/stage3.py
``_autoep_expert_parallel_group``, runtime/engine.py ``_resolve_zero3_param_placement``)."""

PICKLED_CLASSES = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")
"""Classes DeepSpeed pickles into its rank files (the ZeRO stage, the loss scaler)."""


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed, or the one that wrote a checkpoint, is not the supported one."""


def check_deepspeed_version(version: Optional[str] = None, what: str = "installed") -> None:
    """DeepSpeedVersionError unless ``version`` (default: the installed one) is supported.

    ``what`` says whose version it is (``installed``, ``of checkpoint <path>``).
    """
    if version is None:
        try:
            import deepspeed
        except ImportError as exc:
            raise DeepSpeedVersionError(
                f"deepspeed is not installed: pip install deepspeed=={DEEPSPEED_VERSION} "
                "(scripts/setup_env.sh)") from exc
        version = deepspeed.__version__
    if version != DEEPSPEED_VERSION:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} ({what}): liquid_dist relies on DeepSpeed internals "
            f"(expert-parallel groups, ZeRO-3 partitions, checkpoint files; "
            f"liquid_dist/parallel/ds_compat.py) as they are in DeepSpeed {DEEPSPEED_VERSION}; "
            f"install that version (DS_BUILD_OPS=0 pip install --no-build-isolation "
            f"deepspeed=={DEEPSPEED_VERSION}, as scripts/setup_env.sh does)")


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed's CPU backend from JIT-compiling its shm all-reduce op at start-up
    (~100 s on 2 cores); only inference uses it."""
    importlib.import_module("deepspeed.comm.torch")  # returns torch itself: go via sys.modules
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# ------------------------------------------------------------ expert-parallel groups


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert(-data)-parallel groups for ``ep_size``."""
    return f"ep_size_{ep_size}"


def ep_size_of_group(name: str) -> int:
    """The ``ep_size`` of a group named by :func:`ep_group_name` (ValueError otherwise)."""
    prefix = ep_group_name(0)[:-1]
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        raise ValueError(f"{name!r} is not a DeepSpeed expert-parallel group name")
    return int(name[len(prefix):])


def ep_rank_of(rank: int, ep_size: int) -> int:
    """The expert-parallel rank of global ``rank`` in DeepSpeed's legacy group layout:
    expert-parallel groups are the consecutive ranks ``[0..P-1], [P..2P-1], ...``."""
    return rank % ep_size


def create_expert_groups(ep_size: int) -> str:
    """Create (once) the expert-parallel and expert-data-parallel groups; returns the name.

    Collective: every rank must call it, in the same order.
    """
    from deepspeed.utils import groups

    name = ep_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return name


def expert_parallel_group(name: str) -> Any:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_parallel_rank(name: str) -> int:
    from deepspeed.utils import groups

    return groups._get_expert_parallel_rank(name)


def mark_expert_parameter(param: torch.nn.Parameter, group_name: str) -> None:
    """Tag ``param`` the way AutoEP tags its expert parameters: ZeRO-3 then partitions
    (and broadcasts) it over the expert-data-parallel group ``group_name`` only, reduces
    its gradient there and folds its norm into the joint one."""
    from deepspeed.utils import groups

    param.allreduce = False
    param.group_name = group_name
    param.ds_zero_placement_family = EP_PLACEMENT_FAMILY
    param.ds_zero_partition_group_name = group_name
    param.ds_zero_partition_process_group = groups._get_expert_data_parallel_group(group_name)


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` carries the expert marking of :func:`mark_expert_parameter`."""
    return getattr(param, "ds_zero_placement_family", None) == EP_PLACEMENT_FAMILY


# ------------------------------------------------------------ ZeRO-3 optimizer state


def zero3_optimizer(engine: Any) -> Any:
    """The engine's ZeRO-3 optimizer (ValueError for another ZeRO stage)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    opt = engine.optimizer
    if not isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        raise ValueError(f"expected a ZeRO stage 3 engine, got {type(opt).__name__}")
    return opt


def pending_grad_norm(engine: Any) -> Optional[float]:
    """Inside the wrapped optimizer's ``step``: the global gradient norm (before clipping)
    of the update ZeRO stages 1-3 are applying, which they compute, reduce over the ranks
    and store (``_global_grad_norm``) first. None without ZeRO."""
    norm = getattr(engine.optimizer, "_global_grad_norm", None)
    return None if norm is None else float(norm)


def init_adam_state(engine: Any, step: float) -> None:
    """Give every fp32 partition of a fresh ZeRO-3 engine an AdamW state at ``step``
    (zero moments, to be filled by ``safe_set_full_optimizer_state``).

    torch's AdamW creates its state lazily at the first step; a state loaded
    into a run that has not stepped yet must be created first.
    """
    opt = zero3_optimizer(engine)
    for flat in opt.fp32_partitioned_groups_flat:
        opt.optimizer.state[flat] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}


def refresh_working_params(engine: Any) -> None:
    """Copy the fp32 master partitions into the working (fp32/bf16) parameters, as the
    end of an optimizer step does, and re-gather the persistent (small, never
    partitioned) parameters. Collective: every rank calls it."""
    opt = zero3_optimizer(engine)
    for sub_group in range(len(opt.fp32_partitioned_groups_flat)):
        opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    if opt.persistent_parameters:
        opt.persistent_parameters[0].all_gather(opt.persistent_parameters)


def local_partition(param: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full`` (a whole value of ``param``): the flat
    tensor zero-padded to ``partition count x partition size`` and cut at this rank's
    index in the parameter's partition group (all ranks, or the expert-data-parallel
    group of an expert tensor), as ``safe_set_local_*`` takes it."""
    import torch.distributed as dist

    group = param.ds_process_group
    part = param.ds_tensor.numel()
    index = dist.get_rank(group=group)
    flat = full.reshape(-1)
    padded = torch.zeros(part * dist.get_world_size(group=group), dtype=flat.dtype)
    padded[: flat.numel()] = flat
    return padded[index * part: (index + 1) * part]


def zero_partition_padding(engine: Any) -> None:
    """Zero the padding of every ZeRO-3 partition: the elements of a rank's partition
    past the parameter's end (each parameter is padded to a multiple of its partition
    count), which DeepSpeed leaves as uninitialised memory in the working and the fp32
    master partitions. They never reach the model, but they are saved: with them zeroed
    a checkpoint's files are a function of the run's seed and data alone. Call once,
    after ``deepspeed.initialize`` and before the first step."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param

    with torch.no_grad():
        for param in engine.module.parameters():
            part = param.ds_tensor.numel()
            index = dist.get_rank(group=param.ds_process_group)
            valid = max(0, min(part, param.ds_numel - index * part))
            if valid == part:
                continue
            param.ds_tensor.data.view(-1)[valid:] = 0
            master = safe_get_local_fp32_param(param)
            if master is not None:
                master.view(-1)[valid:] = 0


def share_fp32_master_partitions(engine: Any) -> int:
    """Let a fp32 ZeRO-3 run keep one copy of each parameter partition, not two; returns
    the bytes given back.

    In fp32 the master weights are the parameters themselves, and
    ``DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions`` means to share each
    sub-group's flat partition with them ("we don't need another copy of the
    weights") — but it compares ``tensor.device`` (a ``torch.device``) with the
    optimizer's device name (a ``str``), which is never equal, and clones every
    partition: 4 more bytes per parameter and rank (measured: 1.4 GB per rank at
    W = 1 for 0.37 B parameters). This makes each master partition a view of the
    parameters' flat partition, as DeepSpeed's own branch does; the optimizer's update
    then writes the parameters directly and DeepSpeed's copy back is a copy onto
    itself. Sub-groups of another dtype (bf16 / fp16 runs), device or size are left
    alone. Call once, after ``deepspeed.initialize`` and before the first step.
    """
    opt = zero3_optimizer(engine)
    freed = 0
    for working, master in zip(opt.fp16_partitioned_groups_flat,
                               opt.fp32_partitioned_groups_flat, strict=True):
        if (working is None or master.data_ptr() == working.data_ptr()
                or master.dtype != working.dtype or master.device != working.device
                or master.shape != working.shape):
            continue
        freed += master.numel() * master.element_size()
        master.data = working.data
    return freed
