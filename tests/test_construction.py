"""The run's model is built without any rank holding it whole, and its initial weights are
bitwise the same on every layout (docs/parallelism.md, "Construction").

The multi-process checks build an 83 M-parameter model (largest tensor 2.1 M) under ZeRO-3
through tests/construction_worker.py, for (world size, ep_size) in (1, 1), (2, 1), (2, 2):
every parameter's full value, gathered, equals the single-process build's, and each
rank's peak resident-memory growth during construction stays within its share of the
fp32 weights plus a few tensors; the construction main used before (the whole model on
every rank, then partitioned) is the negative control that breaks the same bound.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.config import load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.init import expert_slice, init_parameters
from liquid_dist.parallel import free_port

BIG = ["model.vocab_size=4000", "model.d_model=512", "model.n_heads=8", "model.ffn_dim=2048",
       "model.moe.expert_ffn_dim=1024", "model.hyena_filter_dim=64",
       "model.n_encoder_layers=4", "model.n_decoder_layers=4"]
MIB = 1 << 20
ALLOWANCE = 96 * MIB
"""Allocator slack and the per-call buffers of DeepSpeed's partitioning."""
TENSORS_IN_FLIGHT = 3
"""The module being valued: its drawn value, the parameter, ZeRO-3's partition of it."""


def big_cfg():
    return load_config("configs/tiny.yaml", BIG)


@functools.cache
def worker(world: int, mode: str, ep: int, *extra: str) -> dict:
    out = tf.TMP / f"construction_{world}_{mode}_{ep}_{len(extra)}.json"
    cmd = [str(tf.BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port",
           str(free_port()), "tests/construction_worker.py", str(out), mode, str(ep), *BIG,
           *extra]
    proc = subprocess.run(cmd, cwd=tf.REPO, env=tf.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(out.read_text())


@functools.cache
def reference() -> dict[str, list]:
    """The single-process build's parameters: shape, dtype, SHA-256."""
    cfg = big_cfg()
    model = LiquidFoundationModelOptimized(cfg.model, seed=cfg.train.seed)
    return {name: [list(p.shape), str(p.dtype),
                   hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()]
            for name, p in model.named_parameters()}


def small_cfg():
    return load_config("configs/tiny.yaml", ["model.vocab_size=300"]).model


def test_meta_build_valued_later_equals_the_whole_build_and_seeds_differ() -> None:
    cfg = small_cfg()
    whole = LiquidFoundationModelOptimized(cfg, seed=5)
    with torch.device("meta"):
        meta = LiquidFoundationModelOptimized(cfg)
    assert all(p.is_meta for p in meta.parameters())
    init_parameters(meta, 5)
    assert meta.lm_head.weight is meta.token_embedding.weight  # the tie survives
    for (name, a), (_, b) in zip(whole.named_parameters(), meta.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    other = LiquidFoundationModelOptimized(cfg, seed=6)
    assert not torch.equal(other.token_embedding.weight, whole.token_embedding.weight)
    torch.manual_seed(0)  # seed=None: torch's global generator decides
    first = LiquidFoundationModelOptimized(cfg).token_embedding.weight
    torch.manual_seed(0)
    assert torch.equal(LiquidFoundationModelOptimized(cfg).token_embedding.weight, first)


def test_an_expert_slice_draws_exactly_its_rows_of_the_whole_tensor_even_after_a_deepcopy():
    cfg = small_cfg()
    whole = LiquidFoundationModelOptimized(cfg, seed=3)
    with torch.device("meta"):
        meta = LiquidFoundationModelOptimized(cfg)
    sliced = copy.deepcopy(meta)  # the init rules live on the modules: a copy keeps them
    layer = sliced.encoder.blocks[0].moe
    for attr in ("w1", "b1", "w2", "b2"):
        expert_slice(layer, attr, 2, 4)
    init_parameters(sliced, 3)
    for attr in ("w1", "b1", "w2", "b2"):
        full = getattr(whole.encoder.blocks[0].moe, attr)
        assert torch.equal(getattr(layer, attr), full[2:4]), attr


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(1, 1), (2, 1), (2, 2)])
def test_initial_weights_are_bitwise_equal_on_every_layout(world: int, ep: int) -> None:
    assert big_cfg().model.tie_embeddings
    got = worker(world, "partitioned", ep)["sha256"]
    want = reference()
    assert got.keys() == want.keys()
    different = [name for name in want if got[name] != want[name]]
    assert not different, different


def _sharded_converted_model() -> tuple[Path, dict[str, list]]:
    """The big model (another seed) as a converted directory in two safetensors shards with
    an index, and the SHA-256 of its parameters."""
    from safetensors.torch import load_file, save_file

    from liquid_dist.model.pretrained import INDEX_NAME, WEIGHTS_NAME

    cfg = big_cfg()
    model = LiquidFoundationModelOptimized(cfg.model, seed=11)
    out = model.save_pretrained(tf.TMP / "big_converted")
    tensors = load_file(str(out / WEIGHTS_NAME))
    names = sorted(tensors)
    shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
    (out / INDEX_NAME).write_text(json.dumps(
        {"weight_map": {n: file for file, part in shards.items() for n in part}}))
    (out / WEIGHTS_NAME).unlink()
    hashes = {name: [list(p.shape), str(p.dtype),
                     hashlib.sha256(p.detach().contiguous().numpy().tobytes()).hexdigest()]
              for name, p in model.named_parameters()}
    return out, hashes


def _bound(world: int) -> float:
    cfg = big_cfg()
    with torch.device("meta"):
        model = LiquidFoundationModelOptimized(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    return 4 * n / world + TENSORS_IN_FLIGHT * 4 * largest + ALLOWANCE


@pytest.mark.slow
def test_construction_memory_is_bounded_by_the_partition_and_the_old_path_is_not() -> None:
    bound = _bound(2)
    for ep in (1, 2):
        growth = worker(2, "partitioned", ep)["rss_growth"]
        assert max(growth) <= bound, (ep, [g / MIB for g in growth], bound / MIB)
    whole = worker(2, "whole", 1)["rss_growth"]
    assert min(whole) > bound, ([g / MIB for g in whole], bound / MIB)


@pytest.mark.slow
def test_init_from_a_sharded_converted_model_reads_it_within_the_same_bound() -> None:
    path, want = _sharded_converted_model()
    for ep in (1, 2):
        result = worker(2, "partitioned", ep, f"train.init_from={path}")
        different = [name for name in want if result["sha256"][name] != want[name]]
        assert not different, (ep, different)
        growth = result["rss_growth"]
        assert max(growth) <= _bound(2), (ep, [g / MIB for g in growth], _bound(2) / MIB)
