"""Every seed component starts so that it cannot hurt (docs/model.md, "Initialisation"),
and the decoder knows which objective it decodes for (docs/model.md, "Generation modes").

At initialisation the full ``tiny`` model computes its plain counterpart's logits: each
component whose branch starts at zero gives exactly the logits of the model without it
(the shared weights copied over), and the MoE, which has no zero start, moves them no
more than redrawing the dense FFN that replaces it does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.config import (
    ABLATIONS,
    ConfigError,
    check_same_architecture,
    load_config,
)
from liquid_dist.data import Tokenizer, build_train_loader, build_val_loader
from liquid_dist.data.tokenizer import DECODER_START_IDS
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.utils import param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 512
EXACT = 1e-6
"""The bound for a zero-started component: max |Δ logit| against its ablated form."""
MOE_SLACK = 1.1
"""The MoE at init may move the logits by at most this times what redrawing its dense
counterpart's weights moves them (relative Frobenius norm)."""
ZERO_STARTED = {
    "embedding_conv": ("encoder.embedding.conv_gain", "decoder.embedding.conv_gain"),
    "frequency": ("encoder.embedding.frequency_gain", "decoder.embedding.frequency_gain"),
    "compression": ("encoder.embedding.proj_gain", "decoder.embedding.proj_gain"),
    "deformable_conv": ("encoder.blocks.0.conv.norm.weight", "decoder.blocks.1.conv.norm.weight"),
    "lstm": ("decoder.memory.mlps.0.2.weight",),
}


def tiny(ablate=()) -> LiquidFoundationModelOptimized:
    cfg = load_config(CONFIGS / "tiny.yaml",
                      [f"model.vocab_size={VOCAB}", f"model.ablate=[{','.join(ablate)}]"])
    return LiquidFoundationModelOptimized(cfg.model).eval()


def build(ablate=(), seed=0) -> LiquidFoundationModelOptimized:
    torch.manual_seed(seed)
    return tiny(ablate)


def with_weights_of(model, source):
    """``model`` with every tensor it shares (by name) with ``source`` copied from it."""
    theirs = source.state_dict()
    model.load_state_dict({k: theirs.get(k, v) for k, v in model.state_dict().items()})
    return model


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    enc = torch.randint(4, VOCAB, (2, 128), generator=g)
    dec = torch.randint(4, VOCAB, (2, 64), generator=g)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[1, 90:] = False
    return enc, dec, mask


@pytest.fixture(scope="module")
def full_logits(inputs):
    with torch.no_grad():
        return build()(*inputs[:2], encoder_attention_mask=inputs[2]).logits


def logits(model, inputs):
    with torch.no_grad():
        return model(*inputs[:2], encoder_attention_mask=inputs[2]).logits


@pytest.mark.parametrize("component", sorted(ZERO_STARTED))
def test_a_zero_started_component_gives_its_ablated_forms_logits(component, inputs,
                                                                 full_logits):
    ablated = with_weights_of(build([component], seed=1), build())
    assert (logits(ablated, inputs) - full_logits).abs().max() <= EXACT


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_moe_at_init_moves_the_logits_no_more_than_a_redrawn_dense_ffn(inputs, full_logits):
    dense = with_weights_of(build(["moe"], seed=1), build())
    redrawn = with_weights_of(build(["moe"], seed=2), build())  # only dense_ffn differs
    moe_shift = relative(full_logits, logits(dense, inputs))
    draw_shift = relative(logits(redrawn, inputs), logits(dense, inputs))
    assert 0 < moe_shift <= MOE_SLACK * draw_shift, (moe_shift, draw_shift)
    # all six together: only the MoE's shift is left
    plain = with_weights_of(build(list(ABLATIONS), seed=1), build())
    assert relative(full_logits, logits(plain, inputs)) <= MOE_SLACK * draw_shift


def test_every_zero_started_branch_gets_a_gradient_at_the_first_step(inputs):
    model = build().train()
    enc, dec, mask = inputs
    model(enc, dec, encoder_attention_mask=mask, labels=dec).loss.backward()
    params = dict(model.named_parameters())
    for component, names in ZERO_STARTED.items():
        for name in names:
            assert not params[name].any(), name  # starts at zero
            assert params[name].grad is not None and params[name].grad.abs().sum() > 0, (
                component, name)


def test_moe_mean_k_reports_dynamic_ks_cost(inputs):
    model = build()
    out = model(*inputs[:2], encoder_attention_mask=inputs[2])
    k_max = model.cfg.moe.k_max
    # Switch's router init routes near uniformly: maximal entropy, so k = k_max
    assert out.aux["moe_mean_k"] == pytest.approx(k_max)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "router"):
                m.router.weight.normal_(0.0, 1.0)  # a sharp router: fewer experts
    out = model(*inputs[:2], encoder_attention_mask=inputs[2])
    assert 1.0 <= float(out.aux["moe_mean_k"]) < k_max
    assert build(["moe"])(*inputs[:2]).aux["moe_mean_k"] == 0.0


def test_the_hyena_filter_and_skip_are_not_weight_decayed():
    model = build()
    decay, rest = param_groups(model, 0.1)
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in rest["params"]}
    hyena = "decoder.embedding.frequency.hyena."
    assert f"{hyena}skip" in kept and f"{hyena}filter_mlp.0.weight" in kept
    assert f"{hyena}filter_mlp.4.weight" in kept and f"{hyena}in_proj.weight" in decayed
    assert not any(n.startswith(f"{hyena}filter_mlp") for n in decayed)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert decayed | kept == set(names.values()) and not decayed & kept


def test_a_model_saved_before_revision_2_is_refused_with_the_reason(tmp_path):
    model = build()
    saved = dataclasses.asdict(model.cfg)
    del saved["architecture_revision"]  # what revision 1 wrote
    with pytest.raises(ConfigError, match="architecture_revision") as err:
        check_same_architecture(saved, model.cfg, "the checkpoint X")
    assert "older liquid_dist" in str(err.value) and "cannot be loaded" in str(err.value)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="architecture_revision"):
        LiquidFoundationModelOptimized.from_pretrained(tmp_path)


def test_suppressed_tokens_are_never_generated(inputs):
    model = build()
    enc, _, mask = inputs
    greedy = model.generate(enc, mask, max_new_tokens=12, eos_token_id=None)
    banned = tuple(sorted(set(greedy[:, 1:].flatten().tolist())))
    for settings in ({}, {"num_beams": 3}, {"do_sample": True}):
        out = model.generate(enc, mask, max_new_tokens=12, eos_token_id=None,
                             suppress_tokens=banned, generator=torch.Generator().manual_seed(0),
                             **settings)
        assert not set(out[:, 1:].flatten().tolist()) & set(banned), settings


def test_after_short_training_the_text_start_writes_text_and_the_span_start_fills_spans():
    """The decoder start token tells the model which objective it decodes for: trained
    briefly on the span-corruption + prefix-LM mixture, greedy decoding from the prefix-LM
    start (the default) writes no sentinel even with nothing suppressed, and from the
    span-corruption start it opens with the first sentinel, as span targets do."""
    data = tf.train_data()
    tok = Tokenizer(data.tokenizer)
    cfg = load_config(CONFIGS / "tiny.yaml", [
        f"model.vocab_size={tok.vocab_size}", f"data.tokenizer={data.tokenizer}",
        f"data.train_shards={data.shards}", f"data.val_shards={data.shards}",
        "data.num_workers=0", "data.shuffle_buffer=8", "data.encoder_length=64",
        "data.decoder_length=32", "model.max_encoder_length=64", "model.max_decoder_length=32",
        "model.d_model=64", "model.ffn_dim=128", "model.moe.expert_ffn_dim=64"])
    torch.manual_seed(0)
    model = LiquidFoundationModelOptimized(cfg.model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    loader = build_train_loader(cfg.data, rank=0, world_size=1, batch_size=8, seed=0)
    step = 0
    while step < 150:
        for b in loader:
            model(b["encoder_input_ids"], b["decoder_input_ids"],
                  encoder_attention_mask=b["encoder_attention_mask"],
                  labels=b["labels"]).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            step += 1
            if step == 150:
                break
    model.eval()
    val = dataclasses.replace(cfg.data, objective="prefix_lm")
    b = next(iter(build_val_loader(val, rank=0, world_size=1, batch_size=4, seed=0,
                                   num_batches=1)))
    prompt = (b["encoder_input_ids"], b["encoder_attention_mask"])
    assert model.generation_config.suppress_tokens == ()
    text = model.generate(*prompt, max_new_tokens=32, eos_token_id=tok.eos_id)
    assert (text[:, 0] == DECODER_START_IDS["prefix_lm"]).all()
    assert not set(text[:, 1:].flatten().tolist()) & set(tok.sentinel_ids)
    spans = model.generate(*prompt, max_new_tokens=4, eos_token_id=tok.eos_id,
                           decoder_start_token_id=DECODER_START_IDS["span_corruption"])
    assert (spans[:, 1] == tok.sentinel_id(0)).all()
