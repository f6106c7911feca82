"""The planner (liquid_dist.plan): model states against DeepSpeed's own estimate, memory
against the CPU measurements of bench/memory.py, the xl-moe plan, and its warnings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.plan import main, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _cfg(name: str, overrides=(), vocab: int = 32000):
    cfg = load_config(CONFIGS / f"{name}.yaml", list(overrides))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def test_model_states_agree_with_deepspeeds_all_live_estimate():
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        model_to_params,
    )

    cfg = _cfg("tiny", ["parallel.zero_stage=3", "train.precision=bf16"], vocab=4000)
    model = LiquidFoundationModelOptimized(cfg.model)  # a real model: DeepSpeed reads it
    total, largest = model_to_params(model)  # what ..._all_live derives from the model
    _, ds_gpu, largest_bytes = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=8, num_nodes=2, cpu_offload=False)
    p = plan(cfg, nodes=2, gpus_per_node=8, gpu="h100")
    assert p.deepspeed_estimate_bytes == ds_gpu
    # DeepSpeed counts 18 bytes per parameter plus one whole largest layer in fp32;
    # the plan 16 (bf16 weights and gradients, fp32 master and moments)
    assert p.model_states_bytes == pytest.approx(16 * total / 16)  # 16 bytes over 16 GPUs
    assert p.model_states_bytes == pytest.approx(ds_gpu - largest_bytes, rel=0.15)


def test_memory_agrees_with_the_cpu_benchmark_within_15_percent():
    """bench/results/memory.json: each rank's peak above an idle rank, against the plan."""
    results = json.loads((ROOT / "bench" / "results" / "memory.json").read_text())
    settings = results["settings"]
    checked = 0
    for row in results["rows"]:
        if row["trainer"] != "new" or row["returncode"] != 0:
            continue
        layers = {"scaling": 4, "fits": 6, "eight": 6}[row["case"]]
        cfg = _cfg("base-moe", [*settings["short"], f"model.n_encoder_layers={layers}",
                                f"model.n_decoder_layers={layers}",
                                f"parallel.ep_size={row['ep_size']}"],
                   vocab=settings["vocab_size"])
        p = plan(cfg, nodes=1, gpus_per_node=row["world_size"], gpu="h100")
        predicted = p.model_states_bytes + p.working_set_bytes + p.activations_checkpointed_bytes
        for peak, idle in zip(row["peak_mib"], row["idle_mib"], strict=True):
            measured = (peak - idle) * 2**20
            assert predicted == pytest.approx(measured, rel=0.15), (
                row["case"], row["world_size"], row["ep_size"])
            checked += 1
    assert checked >= 3


def test_xl_moe_plan_on_8_nodes_of_8_h200_fits_with_its_micro_batch(capsys):
    assert main([str(CONFIGS / "xl-moe.yaml"), "--nodes", "8", "--gpus-per-node", "8",
                 "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "13,053,071,688 parameters" in out and "WARNING" not in out
    p = plan(_cfg("xl-moe"), nodes=8, gpus_per_node=8, gpu="h200")
    assert p.ep_size == 8 and p.total_bytes < 0.9 * p.gpu_memory_bytes
    assert p.largest_micro_batch >= p.micro_batch
    assert p.activations_checkpointed_bytes < p.activations_bytes


def test_warnings_name_what_does_not_fit_or_fill_and_a_layout_error_is_the_runs(capsys):
    p = plan(_cfg("xl-moe"), nodes=1, gpus_per_node=8, gpu="a100-40gb", global_batch=4)
    text = " ".join(p.warnings)
    assert "does not fit" in text and "too small for 8 GPUs" in text
    # the run plan's own refusal (the same message a launch on 8 GPUs gives, status 2)
    assert main([str(CONFIGS / "xl-moe.yaml"), "--set", "parallel.ep_size=16", "--nodes", "1",
                 "--gpus-per-node", "8", "--gpu", "h200"]) == 2
    assert "'parallel.ep_size' = 16: expected a divisor of the world size (8)" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit) as info:  # argparse: an unknown GPU
        main([str(CONFIGS / "tiny.yaml"), "--nodes", "1", "--gpus-per-node", "1", "--gpu", "tpu"])
    assert info.value.code == 2


def test_the_plan_prices_a_checkpoint_synchronous_and_asynchronous(capsys):
    assert main([str(CONFIGS / "xl-moe.yaml"), "--nodes", "8", "--gpus-per-node", "8",
                 "--gpu", "h200", "--ckpt-gbps", "4", "--host-copy-gbps", "8"]) == 0
    out = capsys.readouterr().out
    p = plan(_cfg("xl-moe"), nodes=8, gpus_per_node=8, gpu="h200", ckpt_gbps=4,
             host_copy_gbps=8)
    # the fp32 master weights and two moments of what the rank owns
    assert p.checkpoint_bytes == pytest.approx(p.optimizer_bytes)  # bf16: 12 bytes each
    assert p.sync_save_blocked_s == pytest.approx(2 * 64 * p.checkpoint_bytes / 4e9)
    assert p.async_save_blocked_s == pytest.approx(p.checkpoint_bytes / 8e9)
    interval = p.ckpt_every * p.tokens_per_step / p.tokens_per_s
    assert p.save_share(p.sync_save_blocked_s) == pytest.approx(
        p.sync_save_blocked_s / (p.sync_save_blocked_s + interval))
    assert p.save_share(p.async_save_blocked_s) < p.save_share(p.sync_save_blocked_s) / 100
    assert f"host buffer {p.checkpoint_bytes / 1e9:.2f} GB per rank" in out
    assert f"blocks {p.sync_save_blocked_s:.1f} s (written and read once at 4 GB/s)" in out
