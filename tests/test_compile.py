"""``train.compile``: every ImprovedTransformerBlock compiles whole and computes what eager does."""

from __future__ import annotations

import copy

import pytest
import torch
from test_model import awaken

from liquid_dist.config import ConfigError, load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.parallel.compile import compile_blocks

pytestmark = pytest.mark.timeout(600)
VOCAB = 64


def _model_and_batch():
    cfg = load_config("configs/tiny.yaml", [f"model.vocab_size={VOCAB}", "model.dropout=0.0"])
    torch.manual_seed(0)
    model = awaken(LiquidFoundationModelOptimized(cfg.model))
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(4, VOCAB, (3, 48), generator=g)
    dec = torch.randint(4, VOCAB, (3, 24), generator=g)
    enc_mask = torch.arange(48)[None] < torch.tensor([[48], [30], [41]])
    labels = dec.masked_fill(torch.arange(24)[None] >= torch.tensor([[24], [17], [9]]), -100)
    return model, {"encoder_input_ids": enc, "decoder_input_ids": dec,
                   "encoder_attention_mask": enc_mask, "labels": labels}


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_compiled_blocks_equal_eager_in_losses_and_gradients():
    eager, batch = _model_and_batch()
    compiled = copy.deepcopy(eager)
    n_blocks = len(compiled.encoder.blocks) + len(compiled.decoder.blocks)
    assert compile_blocks(compiled) == n_blocks
    assert compile_blocks(compiled) == 0, "compiling twice is a no-op"
    ref_out, ref_grads = _run(eager, batch)
    for _ in range(2):  # the second call reuses the compiled graphs
        out, grads = _run(compiled, batch)
        assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-4)
        for key, value in ref_out.aux.items():
            assert out.aux[key].float().item() == pytest.approx(value.float().item(), rel=1e-4,
                                                                abs=1e-6), key
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    # parameter names stay as they were: checkpoints and conversion see the same model
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_a_block_is_one_graph_without_breaks(side):
    model, batch = _model_and_batch()
    with torch.no_grad():
        memory, enc_mask, _, _ = model.encode(batch["encoder_input_ids"],
                                              batch["encoder_attention_mask"])
    if side == "encoder":
        block, x = model.encoder.blocks[0], torch.randn(3, 48, model.cfg.d_model)
        kwargs = {"mask": enc_mask}
    else:
        block, x = model.decoder.blocks[0], torch.randn(3, 24, model.cfg.d_model)
        kwargs = {"mask": batch["labels"] != -100, "memory": memory, "memory_mask": enc_mask}
    explanation = torch._dynamo.explain(block.forward)(x, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_with_expert_parallelism_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("configs/tiny.yaml", ["train.compile=true", "parallel.ep_size=2",
                                          "parallel.zero_stage=3"])


@pytest.mark.slow
def test_compiled_training_under_zero3_on_two_ranks_equals_eager():
    """ZeRO-3 gathers a compiled block's parameters around its graph (the block is a
    ZeRO-3 leaf module then): 2 ranks train exactly like the eager reference run."""
    import train_fixtures as tf

    run_dir = tf.TMP / "compiled"
    proc = tf.launch(2, tf.base_overrides(run_dir) + ["train.compile=true"],
                     launcher="torchrun", timeout=900)
    assert proc.returncode == 0, tf.tail(proc)
    compiled, eager = tf.train_losses(run_dir), tf.train_losses(tf.reference_run())
    assert sorted(compiled) == sorted(eager) == list(range(1, 9))
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), step
