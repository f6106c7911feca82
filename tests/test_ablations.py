"""``model.ablate``: each seed component can be removed and replaced by its plain
counterpart (docs/model.md, "Ablations"); removing all of them leaves a plain pre-LN
encoder-decoder transformer. Ablated models train under ZeRO-3, convert, load and
generate like the full one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import test_model
import torch
import train_fixtures as tf
import yaml
from test_model import VOCAB, awaken, small_cfg

from liquid_dist.config import (
    ABLATIONS,
    ConfigError,
    ModelConfig,
    MoEConfig,
    check_same_architecture,
    config_from_dict,
    load_config,
    validate_model,
)
from liquid_dist.data import Tokenizer
from liquid_dist.model import LiquidFoundationModelOptimized, MoELayer
from liquid_dist.model.counts import count_parameters
from liquid_dist.model.generation import GenerationConfig, IncrementalDecoder
from liquid_dist.train.flops import ModelFlops

ALL = list(ABLATIONS)
CASES = [[name] for name in ABLATIONS] + [ALL]
IDS = [c[0] for c in CASES[:-1]] + ["all"]

# the parameters each component owns (name fragments), written from docs/model.md
OWNED = {
    "frequency": (".embedding.frequency.", ".embedding.frequency_gain"),
    "compression": (".embedding.proj.", ".embedding.proj_norm.", ".embedding.proj_gain"),
    "embedding_conv": (".embedding.conv1.", ".embedding.conv2.", ".embedding.norm.",
                       ".embedding.conv_gain"),
    "deformable_conv": (".conv_norm.", ".conv."),
    "moe": (".moe_norm.", ".moe."),
    "lstm": ("decoder.memory.",),
}


def cfg(ablate=(), **kw) -> ModelConfig:
    return small_cfg(moe=MoEConfig(num_experts=4, top_k=2, k_max=3, expert_ffn_dim=16),
                     ablate=list(ablate), **kw)


def build(ablate=(), seed=0, **kw) -> LiquidFoundationModelOptimized:
    torch.manual_seed(seed)
    return awaken(LiquidFoundationModelOptimized(cfg(ablate, **kw)), seed).eval()


def batch(seed=1):
    return test_model.batch(b=2, le=20, ld=12, seed=seed, pad=6)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("value, fragment", [
    (["frequency", "attention"], "'attention' is not one"),
    (["moe", "lstm", "moe"], "'moe' is repeated"),
    ("moe", "a list of distinct names"),
])
def test_ablate_refuses_unknown_and_repeated_names_listing_the_valid_ones(value, fragment):
    with pytest.raises(ConfigError) as info:
        if isinstance(value, list):
            config_from_dict({"model": {"ablate": value}})
        else:  # a YAML file gets "expected a list" from the type check first
            validate_model(ModelConfig(ablate=value))
    assert info.value.key == "model.ablate"
    assert fragment in str(info.value)
    for name in ABLATIONS:
        assert repr(name) in info.value.expected, name


def test_ablate_order_does_not_change_the_architecture():
    one, other = cfg(["lstm", "moe", "frequency"]), cfg(["frequency", "moe", "lstm"])
    assert one.ablate == other.ablate == ["frequency", "moe", "lstm"]
    check_same_architecture(one, other, "the other spelling")
    with pytest.raises(ConfigError, match="model.ablate"):
        check_same_architecture(cfg(["moe"]), cfg(), "a MoE-free model")


def test_expert_parallelism_without_moe_is_a_config_error():
    with pytest.raises(ConfigError, match="removes the MoE layers") as info:
        config_from_dict({}, ["model.ablate=[moe]", "parallel.ep_size=2"])
    assert info.value.key == "parallel.ep_size"


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_transformer_configs_are_the_base_configs_with_everything_ablated(name):
    root = tf.REPO / "configs"
    base = yaml.safe_load((root / f"{name}.yaml").read_text())
    plain = yaml.safe_load((root / f"{name}-transformer.yaml").read_text())
    assert sorted(plain["model"].pop("ablate")) == sorted(ABLATIONS)
    assert plain["model"] == base["model"] and plain["data"] == base["data"]
    assert plain["parallel"] == base["parallel"]
    assert plain["train"].pop("run_dir") == f"runs/{name}-transformer"
    base["train"].pop("run_dir")
    assert plain["train"] == base["train"]
    assert load_config(root / f"{name}-transformer.yaml").model.ablate == ALL


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("ablate", CASES, ids=IDS)
def test_each_ablation_runs_forward_backward_and_decodes_incrementally(ablate):
    model = build(ablate).train()
    enc, dec, mask, labels = batch()
    out = model(enc, dec, mask, labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    silent = [n for n, p in model.named_parameters()
              if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    # an expert may get no token in one batch; every other parameter learns
    assert all(".moe.w" in n or ".moe.b" in n for n in silent), silent
    if "compression" in ablate:
        assert out.aux["recon_encoder"] == 0 and out.aux["recon_decoder"] == 0
    else:
        assert out.aux["recon_encoder"] > 0 and out.aux["recon_decoder"] > 0
    if "moe" in ablate:
        assert out.expert_usage == [] and out.aux["moe_entropy"] == 0
    else:
        assert len(out.expert_usage) == 4
    model.eval()
    ref = model(enc, dec, mask).logits
    inc = IncrementalDecoder(model)
    inc.start(enc, mask)
    steps = torch.stack([inc.step(dec[:, p], p) for p in range(dec.shape[1])], dim=1)
    torch.testing.assert_close(steps, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ABLATIONS)
def test_an_ablation_removes_exactly_the_parameters_of_its_component(name):
    full = {n for n, _ in build().named_parameters()}
    ablated = {n for n, _ in build([name]).named_parameters()}
    owned = {n for n in full if any(part in n for part in OWNED[name])}
    assert owned and full - ablated == owned
    added = ablated - full
    if name == "moe":
        assert added == {f"{side}.blocks.{i}.{m}.{w}" for side in ("encoder", "decoder")
                         for i in range(2) for m in ("dense_ffn_norm", "dense_ffn.fc1",
                                                     "dense_ffn.fc2") for w in ("weight", "bias")}
    else:
        assert added == set()


def _pair(prefix: str) -> set[str]:
    return {f"{prefix}.weight", f"{prefix}.bias"}


def test_removing_everything_leaves_the_plain_transformer():
    """The parameter names of a pre-LN encoder-decoder transformer with learned positions,
    tied embeddings, local GQA self-attention, cross-attention and two FFN sub-blocks (the
    dense counterpart of the MoE, then the block's FFN), written out from the architecture."""
    expected = {"token_embedding.weight", "lm_head.bias",
                "encoder.embedding.position_embedding.weight",
                "decoder.embedding.position_embedding.weight",
                *_pair("encoder.norm"), *_pair("decoder.norm")}
    attention = ("q_proj", "k_proj", "v_proj", "out_proj")
    for side, layers in (("encoder", 2), ("decoder", 2)):
        for i in range(layers):
            b = f"{side}.blocks.{i}"
            expected |= _pair(f"{b}.attn_norm")
            expected |= {w for p in attention for w in _pair(f"{b}.attn.{p}")}
            if side == "decoder":
                expected |= _pair(f"{b}.cross_norm")
                expected |= {w for p in attention for w in _pair(f"{b}.cross_attn.{p}")}
            for part in ("dense_ffn_norm", "dense_ffn.fc1", "dense_ffn.fc2", "ffn_norm",
                         "ffn.fc1", "ffn.norm", "ffn.fc2"):
                expected |= _pair(f"{b}.{part}")
    model = build(ALL)
    params = dict(model.named_parameters())
    assert set(params) == expected
    assert model.lm_head.weight is model.token_embedding.weight
    # same active width as the MoE it replaces: top_k (2) experts of 16 hidden units
    assert params["encoder.blocks.0.dense_ffn.fc1.weight"].shape == (2 * 16, 32)
    assert params["decoder.blocks.1.dense_ffn.fc2.weight"].shape == (32, 2 * 16)
    assert not any(isinstance(m, MoELayer) for m in model.modules())


@pytest.mark.parametrize("ablate", [["embedding_conv"], ALL], ids=["embedding_conv", "all"])
def test_padding_content_changes_no_logit_without_the_convolutional_stem(ablate):
    """Without the stem's convolutions (which zero padding first) the embedding zeroes
    padded positions itself: no logit, even at a padded position, depends on padding."""
    model = build(ablate)
    enc, dec, mask, _ = batch()
    dec_mask = torch.ones_like(dec, dtype=torch.bool)
    dec_mask[0, 8:] = False
    ref = model(enc, dec, mask, decoder_attention_mask=dec_mask).logits
    g = torch.Generator().manual_seed(9)
    noisy_enc = torch.where(mask, enc, torch.randint(4, VOCAB, enc.shape, generator=g))
    noisy_dec = torch.where(dec_mask, dec, torch.randint(4, VOCAB, dec.shape, generator=g))
    assert not torch.equal(noisy_enc, enc) and not torch.equal(noisy_dec, dec)
    got = model(noisy_enc, noisy_dec, mask, decoder_attention_mask=dec_mask).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_parameter_counts_of_the_dense_ffn():
    full, plain = build(), build(["moe"])
    counts = count_parameters(plain)
    assert counts["experts"] == 0
    assert counts["total"] == counts["dense"] == counts["active_per_token_min"] \
        == counts["active_per_token_max"] == sum(p.numel() for p in plain.parameters())
    # per block: the MoE (its norm, router and 4 experts) becomes a norm and a
    # 32 -> 2*16 -> 32 MLP
    d, e, f, k, blocks = 32, 4, 16, 2, 4
    moe = 2 * d + (d * e + e) + e * (d * f + f + f * d + d)
    dense = 2 * d + (d * k * f + k * f) + (k * f * d + d)
    assert count_parameters(full)["total"] - counts["total"] == blocks * (moe - dense)
    # one token's share of the experts equals the dense FFN's weights, less one bias per
    # extra expert and the router
    active = count_parameters(full)["active_per_token_min"]
    assert active - counts["total"] == blocks * ((d * e + e) + (k - 1) * d)


def test_flops_count_ablated_components_as_absent():
    le, ld = 32, 24
    d, hd, g, w, ffn, kf, v = 32, 8, 2, 4, 64, 2 * 16, VOCAB
    plain = ModelFlops(cfg(ALL)).forward(le, ld)
    assert plain.fft == 0
    assert plain.attention == (2 * 4 * d * min(2 * w + 1, le) * le
                               + 2 * 4 * d * (min(w + 1, ld) * ld + le * ld))
    # weights applied per position, summed over the 2 layers of a side (numel of matrices)
    attn = 2 * d * d + 2 * d * g * hd  # q, out; k, v
    per_enc = 2 * (attn + 2 * d * kf + 2 * d * ffn)
    per_dec = 2 * (attn + 2 * d * d + 2 * d * kf + 2 * d * ffn)  # + cross q, out
    cross_kv = 2 * (2 * d * g * hd)  # the decoder's cross k, v read the encoder positions
    # 2 FLOPs per multiply-add; the tied head d x V per decoder position
    assert plain.weights == 2 * (le * per_enc + le * cross_kv + ld * per_dec) + 2 * ld * d * v

    full = ModelFlops(cfg()).forward(le, ld)
    n_enc, n_dec = 32, _next_pow2(2 * ld)
    spectral_attention = 4 * d * 4 * (n_enc // 2 + 1)  # band_block 4 over the bins
    no_freq = ModelFlops(cfg(["frequency"])).forward(le, ld)
    assert math.isclose(full.attention - no_freq.attention, spectral_attention)
    assert math.isclose(no_freq.fft, d * 2 * 2.5 * n_enc * math.log2(n_enc))  # compression's
    no_comp = ModelFlops(cfg(["compression"])).forward(le, ld)
    assert math.isclose(full.fft - no_comp.fft, d * 2 * 2.5 * n_enc * math.log2(n_enc))
    assert math.isclose(no_comp.fft, d * (2 * 2.5 * n_enc * math.log2(n_enc)
                                          + 3 * 2.5 * n_dec * math.log2(n_dec)))
    # the dense FFN costs what the MoE's nominal top_k experts cost; only the routers go
    no_moe = ModelFlops(cfg(["moe"])).forward(le, ld)
    assert full.weights - no_moe.weights == 2 * (2 * le + 2 * ld) * d * 4
    no_lstm = ModelFlops(cfg(["lstm"])).forward(le, ld)
    lstm = 2 * ld * (8 * d * d + 2 * d * d)  # 4 gates x (input + recurrent), then the MLP
    assert full.weights - no_lstm.weights == lstm


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ------------------------------------------- ZeRO-3 training -> convert -> from_pretrained


@pytest.mark.slow
@pytest.mark.parametrize("ablate", CASES, ids=IDS)
def test_ablated_model_trains_under_zero3_converts_and_generates(ablate, tmp_path: Path):
    """2 ZeRO-3 steps in one process, then the converter rebuilds the ablated model from
    the saved config: from_pretrained's logits equal the trained weights', and greedy
    decoding of the converted model is the teacher-forced argmax."""
    from liquid_dist.convert import convert, load_trained_model

    run = tf.TMP / f"ablate_{'-'.join(ablate)}"
    proc = tf.launch(1, tf.base_overrides(run, steps=2) + [f"model.ablate=[{','.join(ablate)}]"],
                     launcher="python")
    assert proc.returncode == 0, tf.tail(proc)
    losses = tf.train_losses(run)
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) for x in losses.values())
    out = convert(run, tmp_path / "converted", progress=False)
    model = LiquidFoundationModelOptimized.from_pretrained(out)
    assert model.cfg.ablate == ablate
    sentinels = Tokenizer(out / "tokenizer.model").sentinel_ids
    assert model.generation_config == GenerationConfig.from_model_config(model.cfg).updated(
        suppress_tokens=sentinels)
    live, _ = load_trained_model(run)
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(2, model.cfg.vocab_size, (2, model.cfg.max_encoder_length), generator=g)
    dec = torch.randint(2, model.cfg.vocab_size, (2, model.cfg.max_decoder_length), generator=g)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        torch.testing.assert_close(model(enc, dec, mask).logits, live(enc, dec, mask).logits,
                                   atol=1e-5, rtol=0)
    ids = model.generate(enc, mask, max_new_tokens=8, eos_token_id=None)
    assert ids.shape == (2, 9)
    logits = model(enc, ids[:, :-1], mask).logits
    logits[..., list(sentinels)] = float("-inf")  # never generated (suppress_tokens)
    assert torch.equal(logits.argmax(-1), ids[:, 1:])
