"""Process groups and the DeepSpeed configuration (DESIGN.md section 3).

* :mod:`.distributed` — rank discovery (deepspeed / torchrun / Slurm), device, backend.
* :mod:`.deepspeed_config` — the DeepSpeed config dict built from a Config.
"""

from liquid_dist.parallel.deepspeed_config import (
    build_deepspeed_config,
    check_supported,
    resolve_precision,
)
from liquid_dist.parallel.distributed import (
    DistEnv,
    free_port,
    init_distributed,
    resolve_dist_env,
    select_device,
)

__all__ = ["DistEnv", "build_deepspeed_config", "check_supported", "free_port",
           "init_distributed", "resolve_dist_env", "resolve_precision", "select_device"]
