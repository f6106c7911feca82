"""Process groups, the DeepSpeed configuration and expert parallelism (docs/parallelism.md).

* :mod:`.distributed` — rank discovery (deepspeed / torchrun / Slurm), device, backend.
* :mod:`.build_plan` — precision, MoE backend, expert layout and DeepSpeed config,
  decided once for a world size and device.
* :mod:`.deepspeed_config` — the DeepSpeed config dict built from a Config.
* :mod:`.construction` — the model of a rank, never whole (docs/parallelism.md).
* :mod:`.expert_parallel` — experts split over an ``ep_size`` group under ZeRO-3
  (docs/parallelism.md).
* :mod:`.ds_compat` — every use of DeepSpeed internals, for one checked version.
"""

from liquid_dist.parallel.deepspeed_config import build_deepspeed_config
from liquid_dist.parallel.distributed import (
    DistEnv,
    free_port,
    init_distributed,
    resolve_dist_env,
    select_device,
)
from liquid_dist.parallel.expert_parallel import (
    ExpertExchange,
    ExpertLayout,
    apply_expert_parallel,
)

__all__ = ["DistEnv", "ExpertExchange", "ExpertLayout", "apply_expert_parallel",
           "build_deepspeed_config", "free_port", "init_distributed", "resolve_dist_env",
           "select_device"]
