"""Plan a run before renting the cluster: memory per GPU, communication, throughput.

    python -m liquid_dist.plan configs/xl-moe.yaml --nodes 8 --gpus-per-node 8 --gpu h200
    liquid-plan configs/base-moe.yaml --set parallel.ep_size=4 --nodes 1 --gpus-per-node 8 \\
        --gpu h100 --mfu 0.35 --tokens 2e11

Per GPU, under the config's ZeRO stage, ``ep_size`` and precision (docs/parallelism.md):

* model states: parameters, gradients and AdamW state (fp32 master weights and
  two moments under bf16/fp16; two moments under fp32), dense ones divided by
  the world size as the stage partitions them, expert ones by ``ep_size`` and
  then by their expert-data-parallel group; DeepSpeed's own estimate
  (``estimate_zero3_model_states_mem_needs``, all parameters live) beside it;
* ZeRO-3's working set (:func:`~liquid_dist.parallel.deepspeed_config.zero3_working_set`);
* activations of one micro-batch at the config's lengths, with and without
  ``model.activation_checkpointing``: the bytes autograd saves for backward
  (the parameters themselves aside), counted on a forward of fake tensors in
  the training precision (no memory is allocated), per block; with
  checkpointing, what stays outside the blocks, each block's input and one
  block's recomputation;
* the largest micro-batch that fits (activations grow linearly with it);
* communication per step and GPU: ZeRO-3 gathers each dense parameter for the
  forward and again for the backward and reduce-scatters its gradient, every
  micro-batch; the MoE all-to-all sends each routed token's activations out and
  back, forward and backward;
* training FLOPs per token (the trainer's own ``ModelFlops``: 3 x forward) and,
  at ``--mfu``, tokens per second and days to ``--tokens``;
* checkpoints: each rank's share (its fp32 master weights and two AdamW
  moments, 12 bytes per owned parameter), the time a save blocks the loop
  every ``train.ckpt_every`` steps and its share of the wall time —
  synchronous: every rank writes its share and hashes one in W of the files
  (the whole checkpoint written and read once at ``--ckpt-gbps``, the shared
  filesystem's aggregate bandwidth); asynchronous (``train.async_checkpoint``):
  the copy of the share into host memory at ``--host-copy-gbps`` per GPU —
  and the host buffer an asynchronous save keeps per rank;
* warnings: does not fit, a global batch (``--global-batch``) too small for
  the world size or not a multiple of it. The precision, the expert layout and
  the DeepSpeed config are the run's own (liquid_dist.parallel.build_plan, which
  the trainer's run plan uses): an ``ep_size`` that does not divide the world
  size is the same error (status 2) as at launch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from liquid_dist.config import Config, ConfigError, load_config

GPUS: dict[str, float] = {"h200": 141e9, "h100": 80e9, "a100": 80e9, "a100-40gb": 40e9,
                          "l40s": 48e9}
"""Memory (bytes) per GPU model, from the vendors' data sheets; the peak FLOP/s are the
trainer's (``liquid_dist.train.flops.peak_flops_of``)."""
RESERVED_FRACTION = 0.1
"""Share of a GPU's memory left to the CUDA context, the allocator's fragmentation and
the communication buffers when deciding what fits."""
OPTIMIZER_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}
"""AdamW's two fp32 moments, plus the fp32 master weights under mixed precision."""


@dataclass
class Plan:
    """Every figure is per GPU (bytes, FLOPs, seconds) unless its name says otherwise."""

    world_size: int
    ep_size: int
    zero_stage: int
    precision: str
    micro_batch: int
    parameters: int
    expert_parameters: int
    active_per_token: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    deepspeed_estimate_bytes: Optional[float]
    working_set_bytes: float
    activations_bytes: float
    activations_checkpointed_bytes: float
    checkpointing: bool
    total_bytes: float
    gpu_memory_bytes: float
    largest_micro_batch: int
    zero_comm_bytes: float
    moe_comm_bytes: float
    training_flops_per_token: float
    tokens_per_step: int
    tokens_per_s: float
    days: float
    checkpoint_bytes: float
    """One rank's share of a checkpoint (the host buffer of an asynchronous save)."""
    ckpt_every: int
    ckpt_gbps: float
    host_copy_gbps: float
    warnings: list[str]

    @property
    def step_s(self) -> float:
        return self.tokens_per_step / self.tokens_per_s

    @property
    def sync_save_blocked_s(self) -> float:
        """The whole checkpoint written and read once (hashed) at ``ckpt_gbps``."""
        return 2 * self.checkpoint_bytes * self.world_size / (self.ckpt_gbps * 1e9)

    @property
    def async_save_blocked_s(self) -> float:
        """A rank's share copied into host memory at ``host_copy_gbps``."""
        return self.checkpoint_bytes / (self.host_copy_gbps * 1e9)

    def save_share(self, blocked_s: float) -> float:
        """The share of the wall time a save blocking ``blocked_s`` every ``ckpt_every``
        steps takes."""
        return blocked_s / (blocked_s + self.ckpt_every * self.step_s)

    @property
    def model_states_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes


def _meta_model(cfg: Config):
    from liquid_dist.model import LiquidFoundationModelOptimized

    with torch.device("meta"):
        return LiquidFoundationModelOptimized(cfg.model)


def activation_bytes(cfg: Config, micro_batch: int, dtype: torch.dtype) -> tuple[float, float]:
    """Bytes saved for backward by one micro-batch's forward at the config's lengths,
    ``(without, with)`` activation checkpointing of the blocks (see the module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from liquid_dist.model.block import ImprovedTransformerBlock
    from liquid_dist.model.init import init_parameters

    model = _meta_model(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))).train()
    blocks = [m for m in model.modules() if isinstance(m, ImprovedTransformerBlock)]
    current: list[Optional[int]] = [None]
    per_block = [0.0] * len(blocks)
    block_inputs = [0.0] * len(blocks)
    outside = [0.0]
    seen: dict[int, torch.Tensor] = {}  # holding each tensor keeps its id from being reused

    weights: set[int] = set()  # storages of the parameters: saved, but not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in seen and t.untyped_storage()._cdata not in weights:
            seen[id(t)] = t
            size = t.numel() * t.element_size()
            if current[0] is None:
                outside[0] += size
            else:
                per_block[current[0]] += size
        return t

    def enter(i: int):
        def hook(_module, args):
            current[0] = i
            block_inputs[i] = args[0].numel() * args[0].element_size()
        return hook

    def leave(_module, _args, _out):
        current[0] = None

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(enter(i))
        block.register_forward_hook(leave)
    d = cfg.data
    with FakeTensorMode(allow_non_fake_inputs=True):
        # parameters in the training dtype, as DeepSpeed holds them: autocast then saves
        # no cast copy of a weight
        init_parameters(model, 0, source=lambda name, p, rule: torch.empty(p.shape),
                        dtype=dtype)
        weights.update(p.untyped_storage()._cdata for p in model.parameters())
        enc = torch.zeros(micro_batch, d.encoder_length, dtype=torch.long)
        dec = torch.zeros(micro_batch, d.decoder_length, dtype=torch.long)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(enc, dec, labels=dec)
    without = outside[0] + sum(per_block)
    checkpointed = outside[0] + sum(block_inputs) + max(per_block, default=0.0)
    return without, checkpointed


CHECKPOINT_BYTES_PER_PARAMETER = 12
"""A rank's checkpoint files per owned parameter: fp32 master weights and two AdamW moments
(under fp32 the master weights are the parameters)."""
CKPT_GBPS = 5.0
"""The shared filesystem's aggregate checkpoint bandwidth assumed (GB/s): a few GB/s of a
parallel filesystem seen from one job."""
HOST_COPY_GBPS = 10.0
"""A GPU's copy into host memory assumed (GB/s): a pageable device-to-host copy over PCIe."""


def plan(cfg: Config, *, nodes: int, gpus_per_node: int, gpu: str, mfu: float = 0.4,
         tokens: Optional[float] = None, global_batch: Optional[int] = None,
         ckpt_gbps: float = CKPT_GBPS, host_copy_gbps: float = HOST_COPY_GBPS) -> Plan:
    """The :class:`Plan` of ``cfg`` (resolved vocabulary) on ``nodes`` x ``gpus_per_node``.

    ``global_batch`` (sequences per step) sets the gradient accumulation for this
    world size (``train.grad_accum`` otherwise). ``ckpt_gbps``: the filesystem's
    aggregate bandwidth for checkpoints (GB/s); ``host_copy_gbps``: a GPU's copy into
    host memory (GB/s)."""
    from liquid_dist.model.counts import count_parameters
    from liquid_dist.model.moe import PRECISION_DTYPES
    from liquid_dist.parallel.build_plan import resolve_build
    from liquid_dist.parallel.deepspeed_config import zero3_working_set_bytes
    from liquid_dist.train.flops import ModelFlops, peak_flops_of

    if gpu not in GPUS:
        raise ConfigError("--gpu", gpu, f"one of {sorted(GPUS)}")
    memory = GPUS[gpu]
    world = nodes * gpus_per_node
    # the precision, expert layout and DeepSpeed config a run on this cluster would get
    build = resolve_build(cfg, world_size=world, device_type="cuda")
    ep, stage, t = cfg.parallel.ep_size, cfg.parallel.zero_stage, cfg.train
    precision = build.precision
    warnings = []
    model = _meta_model(cfg)
    counts = count_parameters(model)
    dense = counts["dense"]
    experts = counts["experts"] * build.local_experts / cfg.model.moe.num_experts  # a rank's
    expert_dp = world // ep
    # parameters held (or owned, under ZeRO-3) by this GPU
    params_local = dense / world + experts / expert_dp if stage == 3 else dense + experts
    grads_local = dense / world + experts / expert_dp if stage >= 2 else dense + experts
    optim_local = dense / world + experts / expert_dp
    dtype = PRECISION_DTYPES[precision]
    pb = dtype.itemsize
    params_bytes, grads_bytes = params_local * pb, grads_local * pb
    optimizer_bytes = optim_local * OPTIMIZER_BYTES[precision]
    ds_estimate = None
    working = 0.0
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        largest = max(sum(p.numel() for p in m.parameters(recurse=False))
                      for m in model.modules())
        ds_estimate = float(estimate_zero3_model_states_mem_needs(
            counts["total"], largest, gpus_per_node, nodes, cpu_offload=False)[1])
        working = zero3_working_set_bytes(build.ds_config["zero_optimization"], precision)
    one = activation_bytes(cfg, 1, dtype)
    two = activation_bytes(cfg, 2, dtype)
    per_sample = [b - a for a, b in zip(one, two, strict=True)]
    fixed = [a - s for a, s in zip(one, per_sample, strict=True)]
    mb = t.micro_batch_size
    acts = [f + s * mb for f, s in zip(fixed, per_sample, strict=True)]
    ckpt = cfg.model.activation_checkpointing
    act = acts[1] if ckpt else acts[0]
    states = params_bytes + grads_bytes + optimizer_bytes
    total = states + working + act
    budget = memory * (1 - RESERVED_FRACTION)
    room = budget - states - working - fixed[1 if ckpt else 0]
    largest_mb = max(int(room // per_sample[1 if ckpt else 0]), 0) if room > 0 else 0
    if total > budget:
        warnings.append(f"does not fit: {total / 1e9:.1f} GB per GPU > {budget / 1e9:.1f} GB "
                        f"({gpu} less {RESERVED_FRACTION:.0%} reserved)")
    accum = t.grad_accum
    if global_batch is not None:
        accum = max(global_batch // (mb * world), 1)
        if global_batch < mb * world:
            warnings.append(f"global batch {global_batch} is too small for {world} GPUs at "
                            f"micro-batch {mb}: each step needs at least {mb * world}")
        elif global_batch % (mb * world):
            warnings.append(f"global batch {global_batch} is not a multiple of micro-batch "
                            f"{mb} x {world} GPUs: {accum * mb * world} per step")
    global_batch = mb * accum * world
    # communication per step and GPU (ring collectives move (W-1)/W of the data)
    ring = (world - 1) / world if world > 1 else 0.0
    zero_comm = 0.0
    if stage == 3:
        zero_comm = accum * 3 * (dense + experts) * pb * ring
    else:
        zero_comm = 2 * (dense + experts) * pb * ring
    d_model = cfg.model.d_model
    moe_layers = (cfg.model.n_encoder_layers + cfg.model.n_decoder_layers
                  if cfg.model.keeps("moe") else 0)
    routed = mb * (cfg.data.encoder_length + cfg.data.decoder_length) * (
        (cfg.model.moe.top_k + cfg.model.moe.k_max) / 2)
    moe_comm = (accum * moe_layers * 4 * routed * d_model * pb * (ep - 1) / ep
                if ep > 1 else 0.0)
    flops = ModelFlops(cfg.model)
    tokens_per_sample = cfg.data.encoder_length + cfg.data.decoder_length
    per_token = flops.forward(cfg.data.encoder_length, cfg.data.decoder_length).training \
        / tokens_per_sample
    tokens_per_s = world * peak_flops_of(gpu, precision) * mfu / per_token
    active = (counts["active_per_token_min"] + counts["active_per_token_max"]) // 2
    budget_tokens = tokens if tokens is not None else 20.0 * active
    share = optim_local * CHECKPOINT_BYTES_PER_PARAMETER
    return Plan(world_size=world, ep_size=ep, zero_stage=stage, precision=precision,
                micro_batch=mb, parameters=counts["total"], expert_parameters=counts["experts"],
                active_per_token=active, params_bytes=params_bytes, grads_bytes=grads_bytes,
                optimizer_bytes=optimizer_bytes, deepspeed_estimate_bytes=ds_estimate,
                working_set_bytes=working, activations_bytes=acts[0],
                activations_checkpointed_bytes=acts[1], checkpointing=ckpt,
                total_bytes=total, gpu_memory_bytes=memory,
                largest_micro_batch=largest_mb, zero_comm_bytes=zero_comm,
                moe_comm_bytes=moe_comm, training_flops_per_token=per_token,
                tokens_per_step=global_batch * tokens_per_sample, tokens_per_s=tokens_per_s,
                days=budget_tokens / tokens_per_s / 86400, checkpoint_bytes=share,
                ckpt_every=t.ckpt_every, ckpt_gbps=ckpt_gbps, host_copy_gbps=host_copy_gbps,
                warnings=warnings)


def _gb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x / 1e9:8.2f} GB"


def report(p: Plan, gpu: str, mfu: float, tokens: Optional[float]) -> str:
    lines = [
        f"{p.parameters:,} parameters ({p.expert_parameters:,} in experts; "
        f"{p.active_per_token:,} active per token), {p.world_size} x {gpu}, "
        f"ZeRO-{p.zero_stage}, ep_size {p.ep_size}, {p.precision}, micro-batch {p.micro_batch}",
        "per GPU:",
        f"  parameters            {_gb(p.params_bytes)}",
        f"  gradients             {_gb(p.grads_bytes)}",
        f"  optimizer state       {_gb(p.optimizer_bytes)}",
        f"  model states          {_gb(p.model_states_bytes)}"
        f"   (DeepSpeed's estimate: {_gb(p.deepspeed_estimate_bytes).strip()})",
        f"  ZeRO-3 working set    {_gb(p.working_set_bytes)}",
        f"  activations           {_gb(p.activations_bytes)} without checkpointing, "
        f"{_gb(p.activations_checkpointed_bytes).strip()} with"
        f" ({'on' if p.checkpointing else 'off'} in this config)",
        f"  total                 {_gb(p.total_bytes)} of {_gb(p.gpu_memory_bytes).strip()}",
        f"  largest micro-batch   {p.largest_micro_batch}",
        f"  communication / step  {_gb(p.zero_comm_bytes)} ZeRO, "
        f"{_gb(p.moe_comm_bytes).strip()} MoE all-to-all",
        f"training FLOPs / token  {p.training_flops_per_token:.3e}",
        f"at MFU {mfu:.0%}: {p.tokens_per_s:,.0f} tokens/s; "
        f"{p.days:.1f} days to {tokens if tokens is not None else 20 * p.active_per_token:.3g} "
        f"tokens ({p.tokens_per_step:,} tokens per step)",
        f"checkpoint             {_gb(p.checkpoint_bytes).strip()} per GPU, "
        f"{_gb(p.checkpoint_bytes * p.world_size).strip()} in all, every {p.ckpt_every} "
        f"steps ({p.ckpt_every * p.step_s / 60:.1f} min at this MFU)",
        f"  synchronous save     blocks {p.sync_save_blocked_s:.1f} s (written and read "
        f"once at {p.ckpt_gbps:g} GB/s): {p.save_share(p.sync_save_blocked_s):.1%} of the "
        "wall time",
        f"  asynchronous save    blocks {p.async_save_blocked_s:.1f} s (host copy at "
        f"{p.host_copy_gbps:g} GB/s per GPU): {p.save_share(p.async_save_blocked_s):.2%}; "
        f"host buffer {_gb(p.checkpoint_bytes).strip()} per rank",
    ]
    lines += [f"WARNING: {w}" for w in p.warnings]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, required=True)
    ap.add_argument("--gpu", required=True, choices=sorted(GPUS))
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed")
    ap.add_argument("--tokens", type=float, default=None,
                    help="token budget (default: 20 x the active parameters)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="sequences per step; sets the gradient accumulation for this world "
                         "(default: the config's micro-batch x grad_accum x world size)")
    ap.add_argument("--ckpt-gbps", type=float, default=CKPT_GBPS,
                    help="the filesystem's aggregate bandwidth for checkpoints, GB/s")
    ap.add_argument("--host-copy-gbps", type=float, default=HOST_COPY_GBPS,
                    help="a GPU's copy into host memory (an asynchronous save), GB/s")
    ap.add_argument("--vocab-size", type=int, default=32000,
                    help="used when model.vocab_size is 'auto'")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if cfg.model.vocab_size == "auto":
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                cfg.model, vocab_size=args.vocab_size))
        result = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                      mfu=args.mfu, tokens=args.tokens, global_batch=args.global_batch,
                      ckpt_gbps=args.ckpt_gbps, host_copy_gbps=args.host_copy_gbps)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result, args.gpu, args.mfu, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

