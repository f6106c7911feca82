"""What a config becomes on a given number of ranks of a given device: the precision,
the MoE backend, the expert layout and the DeepSpeed config, decided once.

:func:`resolve_build` is the one place these are decided: the run plan
(liquid_dist.train.prepare.resolve_run) calls it before any process group, the
build (liquid_dist.parallel.construction) and the trainer read its
:class:`BuildPlan`, and the planner (liquid_dist.plan) calls it for the cluster
it plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from liquid_dist.config import Config, ConfigError, ModelConfig, TrainConfig


@dataclass(frozen=True)
class BuildPlan:
    """What the config becomes on ``world_size`` ranks of ``device_type``."""

    config: Config
    world_size: int
    device_type: str
    precision: str
    """``fp32`` / ``bf16`` / ``fp16`` (``train.precision: auto`` decided for the device)."""
    moe_backend: str
    """The expert-compute backend (``model.moe.backend: auto`` decided for the device and
    precision)."""
    local_experts: int
    """Experts each rank holds: ``num_experts / ep_size`` (all of them without expert
    parallelism)."""
    ds_config: dict[str, Any]
    """The ``config`` of ``deepspeed.initialize`` (read it, do not change it)."""

    @property
    def model_config(self) -> ModelConfig:
        """The model to build: the config's, with the decided MoE backend."""
        m = self.config.model
        return dataclasses.replace(m, moe=dataclasses.replace(m.moe, backend=self.moe_backend))

    @property
    def zero3(self) -> bool:
        return self.config.parallel.zero_stage == 3


def resolve_precision(train: TrainConfig, device_type: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for this device; ``auto`` is bf16 on GPU, fp32 on CPU."""
    if train.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if train.precision == "fp16" and device_type != "cuda":
        raise ConfigError("train.precision", train.precision,
                          "fp32 or bf16 on CPU (fp16 loss scaling is for GPUs)")
    return train.precision


def resolve_build(cfg: Config, *, world_size: int, device_type: str) -> BuildPlan:
    """The :class:`BuildPlan` of ``cfg`` (an integer ``model.vocab_size``) on
    ``world_size`` ranks of ``device_type`` (``cpu`` / ``cuda``).

    ConfigError for what this layout cannot run: an ``ep_size`` that does not
    divide the world size (the config alone checks the rest of expert
    parallelism: liquid_dist.config.validate), fp16 without a GPU, an MoE
    backend without a kernel for this device and precision.
    """
    from liquid_dist.model.moe import resolve_moe_backend
    from liquid_dist.parallel.deepspeed_config import build_deepspeed_config

    if not isinstance(cfg.model.vocab_size, int):
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          "an integer (resolve_run reads it from the tokenizer)")
    ep = cfg.parallel.ep_size
    if world_size < 1 or world_size % ep:
        raise ConfigError("parallel.ep_size", ep,
                          f"a divisor of the world size ({world_size}): every expert-parallel "
                          "group holds every expert once")
    precision = resolve_precision(cfg.train, device_type)
    return BuildPlan(config=cfg, world_size=world_size, device_type=device_type,
                     precision=precision,
                     moe_backend=resolve_moe_backend(cfg.model.moe, device_type, precision),
                     local_experts=cfg.model.moe.num_experts // ep,
                     ds_config=build_deepspeed_config(cfg, world_size=world_size,
                                                      precision=precision))
