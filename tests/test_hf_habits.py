"""Hugging Face habits: generation defaults from the model's config, save_pretrained /
from_pretrained, the Hugging Face argument names, and a mask passed as decoder ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_model
import torch
from data_fixtures import tokenizer_path
from test_model import VOCAB, make_model, small_cfg

from liquid_dist.config import ModelConfig
from liquid_dist.data import Tokenizer
from liquid_dist.data.tokenizer import MODEL_NAME as TOKENIZER_NAME
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.generation import GenerationConfig
from liquid_dist.model.pretrained import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    remote_code_files,
)


def cfg(**kw) -> ModelConfig:
    return small_cfg(**{"n_encoder_layers": 1, "n_decoder_layers": 1, **kw})


def build(seed=0, **kw) -> LiquidFoundationModelOptimized:
    return make_model(seed, **{"n_encoder_layers": 1, "n_decoder_layers": 1, **kw})


def batch(b=2, seed=1):
    return test_model.batch(b=b, le=16, ld=10, seed=seed, pad=5)


# ------------------------------------------------------------ generation defaults


def test_generate_stops_at_the_eos_of_the_model_config():
    enc, _, mask, _ = batch(b=1)
    free = build().generate(enc, mask, max_new_tokens=12, eos_token_id=None)
    assert free.shape == (1, 13)  # explicitly no EOS: the full length
    eos = int(free[0, 4])
    first = free[0].tolist().index(eos, 1)
    model = build(eos_token_id=eos)  # the same weights: token ids do not change the init
    out = model.generate(enc, mask, max_new_tokens=12)
    assert out.tolist() == [free[0, : first + 1].tolist()]  # stopped at the config's EOS
    assert model.generation_config.eos_token_id == eos


def test_generation_config_sets_the_defaults_and_a_call_overrides_them():
    model = build()
    enc, _, mask, _ = batch()
    assert model.generate(enc, mask, eos_token_id=None).shape == (2, 1 + 24)  # max_decoder_length
    model.generation_config = model.generation_config.updated(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_k=10, eos_token_id=None)
    sampled = model.generate(enc, mask, generator=torch.Generator().manual_seed(3))
    again = model.generate(enc, mask, do_sample=True, temperature=0.7, top_k=10,
                           max_new_tokens=5, eos_token_id=None,
                           generation_config=GenerationConfig.from_model_config(model.cfg),
                           generator=torch.Generator().manual_seed(3))
    assert sampled.shape == (2, 6) and torch.equal(sampled, again)
    greedy = model.generate(enc, mask, do_sample=False)
    assert torch.equal(greedy, build().generate(enc, mask, max_new_tokens=5, eos_token_id=None))
    with pytest.raises(TypeError, match=r"\['max_length'\].*'max_new_tokens'"):
        model.generate(enc, mask, max_length=5)


# ------------------------------------------------------------ save_pretrained


def test_save_pretrained_round_trip(tmp_path: Path):
    model = build(ablate=["lstm"])
    model.generation_config = model.generation_config.updated(max_new_tokens=7, top_p=0.9)
    tok = tokenizer_path()
    out = tmp_path / "model"
    out.mkdir()
    (out / INDEX_NAME).write_text("{}")  # a stale sharded export must not shadow the new file
    assert model.save_pretrained(out) == out
    assert Tokenizer(tok).save_pretrained(
        out, model_max_length=model.cfg.max_encoder_length) == out
    assert {p.name for p in out.iterdir()} == {
        CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, TOKENIZER_NAME, "tokenizer.json",
        "tokenizer_config.json", *(f.name for f in remote_code_files())}
    assert (out / TOKENIZER_NAME).read_bytes() == tok.read_bytes()
    loaded = LiquidFoundationModelOptimized.from_pretrained(out)
    assert loaded.cfg == model.cfg and loaded.cfg.ablate == ["lstm"]
    assert loaded.generation_config == model.generation_config
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    enc, dec, mask, _ = batch()
    torch.testing.assert_close(loaded(enc, dec, mask).logits, model(enc, dec, mask).logits,
                               atol=0, rtol=0)


def test_save_pretrained_keeps_the_dtype_and_untied_heads(tmp_path: Path):
    model = build(tie_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = LiquidFoundationModelOptimized.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is not loaded.token_embedding.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_generation_config_json_with_an_unknown_key_is_refused(tmp_path: Path):
    build().save_pretrained(tmp_path)
    f = tmp_path / GENERATION_CONFIG_NAME
    values = json.loads(f.read_text())
    assert values == GenerationConfig.from_model_config(cfg()).to_dict()
    f.write_text(json.dumps({**values, "length_penalty": 1.0}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['length_penalty'\]"):
        LiquidFoundationModelOptimized.from_pretrained(tmp_path)


def test_from_pretrained_without_generation_config_takes_the_model_config(tmp_path: Path):
    build(eos_token_id=7).save_pretrained(tmp_path)
    (tmp_path / GENERATION_CONFIG_NAME).unlink()
    loaded = LiquidFoundationModelOptimized.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == 7


# ------------------------------------------------------------ argument names


def test_hugging_face_argument_names_are_aliases():
    model = build()
    enc, dec, mask, labels = batch()
    ours = model(enc, dec, mask, labels)
    theirs = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    assert torch.equal(theirs.logits, ours.logits) and torch.equal(theirs.loss, ours.loss)
    unmasked = model(enc, dec).logits
    assert not torch.equal(unmasked, ours.logits)  # the mask is used, not dropped
    assert torch.equal(model.generate(input_ids=enc, attention_mask=mask, max_new_tokens=4),
                       model.generate(enc, mask, max_new_tokens=4))


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": "enc", "encoder_input_ids": "enc", "decoder_input_ids": "dec"},
     "both encoder_input_ids and input_ids"),
    ({"input_ids": "enc", "decoder_input_ids": "dec", "attention_mask": "mask",
      "encoder_attention_mask": "mask"}, "both encoder_attention_mask and attention_mask"),
    ({"decoder_input_ids": "dec"}, "missing encoder_input_ids"),
    ({"input_ids": "enc"}, "missing decoder_input_ids"),
])
def test_both_or_neither_spelling_is_a_type_error(kwargs, message):
    model = build()
    enc, dec, mask, _ = batch()
    tensors = {"enc": enc, "dec": dec, "mask": mask}
    with pytest.raises(TypeError, match=message):
        model(**{k: tensors[v] for k, v in kwargs.items()})


def test_a_mask_passed_as_decoder_ids_is_an_error():
    """``model(input_ids, attention_mask)`` puts the mask where decoder ids go."""
    model = build()
    enc, _, mask, _ = batch()
    with pytest.raises(TypeError, match="bool tensor is an attention mask"):
        model(enc, mask)
    with pytest.raises(ValueError, match="decoder_input_ids looks like an attention mask"):
        model(enc, mask.long())
    # the same values are accepted as decoder ids when the encoder mask is explicit, and a
    # decoder input of start/pad tokens only (no 1) is never taken for a mask
    assert model(enc, mask.long(), mask).logits.shape == (2, 16, VOCAB)
    assert model(enc, torch.zeros_like(enc)).logits.shape == (2, 16, VOCAB)
    with pytest.raises(TypeError, match="integer tensor of token ids, got torch.float32"):
        model(enc.float(), enc)


# ------------------------------------------------------------ the generate CLI


def test_generate_cli_takes_its_defaults_from_generation_config_json(tmp_path: Path):
    """No decoding flag: the CLI samples as generation_config.json says."""
    import subprocess
    import sys

    import train_fixtures as tf

    from liquid_dist.data import Tokenizer
    from liquid_dist.generate import generate_batch

    tok_file = tf.train_data().tokenizer
    tok = Tokenizer(tok_file)
    model = build(vocab_size=tok.vocab_size)
    model.generation_config = model.generation_config.updated(
        do_sample=True, top_k=5, temperature=1.5, max_new_tokens=6)
    tok.save_pretrained(model.save_pretrained(tmp_path / "m"),
                        model_max_length=model.cfg.max_encoder_length)
    prompts = ["To be, or not to be", "ROMEO:"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    proc = subprocess.run([sys.executable, "-m", "liquid_dist.generate", str(tmp_path / "m"),
                           "--prompts-file", str(tmp_path / "prompts.txt"), "--seed", "3"],
                          cwd=tf.REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = [json.loads(line)["generated"] for line in proc.stdout.splitlines()]
    want = generate_batch(model, tok, prompts, max_new_tokens=6, do_sample=True, top_k=5,
                          temperature=1.5, top_p=None, num_beams=1,
                          generator=torch.Generator().manual_seed(3))
    greedy = generate_batch(model, tok, prompts, max_new_tokens=6)
    assert got == want and want != greedy
