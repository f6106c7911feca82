"""A model directory in the Hugging Face ecosystem: AutoConfig, AutoModelForSeq2SeqLM and
AutoTokenizer in a process that cannot import liquid_dist (tests/hf_remote_worker.py), against
the project's own model on the same directory; the remote code is the package's own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import converted
from test_model import make_model

from liquid_dist.config import ABLATIONS
from liquid_dist.data import Tokenizer
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.pretrained import (
    AUTO_MAP,
    CONFIG_NAME,
    read_model_config,
    remote_code_files,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["To be, or not to be: that is the question.", "  two  spaces\tand a tab\n\nend ",
         "ROMEO 12 <extra_id_0> café 日本 \U0001f600"]


def probe(model: LiquidFoundationModelOptimized, path: Path) -> dict:
    """Inputs with padding in the encoder and ignored labels, written for the worker."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(4, cfg.vocab_size, (2, min(20, cfg.max_encoder_length)), generator=g)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[1, -6:] = False
    labels = torch.randint(4, cfg.vocab_size, (2, min(10, cfg.max_decoder_length)), generator=g)
    labels[1, -3:] = -100
    shifted = torch.cat([torch.full_like(labels[:, :1], cfg.decoder_start_token_id),
                         labels[:, :-1]], dim=1)
    dec = shifted.masked_fill(shifted == -100, cfg.pad_token_id)
    data = {"enc": enc, "mask": mask, "dec": dec, "labels": labels, "max_new_tokens": 8,
            "texts": TEXTS}
    torch.save(data, path)
    return data


def run_worker(tmp: Path, jobs: list[dict]) -> None:
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"),
           "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_remote_worker.py"),
                           str(tmp / "jobs.json")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def check_against_project(model_dir: Path, data: dict, got: dict) -> LiquidFoundationModelOptimized:
    """Logits, loss and greedy generations of transformers == the project's, same weights."""
    model = LiquidFoundationModelOptimized.from_pretrained(model_dir)
    enc, mask, dec, labels = data["enc"], data["mask"], data["dec"], data["labels"]
    with torch.no_grad():
        ref = model(enc, dec, encoder_attention_mask=mask)
        scored = model(enc, dec, encoder_attention_mask=mask, labels=labels)
    assert torch.equal(got["logits"], ref.logits)
    assert torch.equal(got["labels_logits"], scored.logits)
    assert torch.equal(got["loss"], scored.aux["ce"])
    assert torch.equal(got["aux_loss"], scored.aux_loss)
    assert torch.equal(got["loss_over_items"], scored.ce_sum / 100)
    greedy = model.generate(enc, mask, max_new_tokens=data["max_new_tokens"])
    assert torch.equal(got["greedy"], greedy), (got["greedy"], greedy)
    assert torch.equal(got["greedy_no_cache"], greedy)
    assert got["config"]["ablate"] == model.cfg.ablate
    assert got["misaligned"] == []  # copied out of the file mapping, as the project loads
    assert got["config"]["num_experts"] == model.cfg.moe.num_experts
    return model


def test_remote_code_is_the_package_itself_and_needs_only_torch(tmp_path: Path) -> None:
    """What transformers copies for the auto_map's files is within the package modules the
    directory carries, byte for byte, and none of them imports liquid_dist (outside a try)."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    out = make_model(0).save_pretrained(tmp_path / "m")
    carried = {f.name for f in remote_code_files()}
    for f in remote_code_files():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
        assert "liquid_dist" not in get_imports(f), f.name
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["auto_map"] == AUTO_MAP and config["model_type"] == "liquid_foundation"
    for ref in AUTO_MAP.values():
        entry = out / (ref.split(".")[0] + ".py")
        needed = {Path(p).name for p in get_relative_import_files(entry)} | {entry.name}
        assert needed <= carried, needed - carried
    config["model_type"] = "t5"
    (out / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 't5'"):
        read_model_config(out)


def test_transformers_refuses_a_directory_without_every_weight(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSeq2SeqLM

    out = make_model(0).save_pretrained(tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    del tensors["encoder.norm.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="encoder.norm.weight"):
        AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True)


def test_activation_checkpointing_switch_is_the_models_own(tmp_path: Path) -> None:
    """Trainer's gradient_checkpointing switches ModelConfig.activation_checkpointing: the
    same loss and gradients, the blocks recomputed."""
    from transformers import AutoModelForSeq2SeqLM

    out = make_model(0).save_pretrained(tmp_path / "m")
    model = AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).train()
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(4, model.config.vocab_size, (2, 12), generator=g)
    labels = torch.randint(4, model.config.vocab_size, (2, 6), generator=g)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=enc, labels=labels).loss
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None}

    plain, plain_grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert model.liquid.decoder.cfg.activation_checkpointing
    checkpointed, grads = loss_and_grads()
    assert torch.equal(checkpointed, plain) and grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=name)
    model.activation_checkpointing_disable()
    assert not model.liquid.encoder.cfg.activation_checkpointing
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=2)


def test_without_transformers_the_classes_say_what_to_install(monkeypatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "transformers", None)
    for name in ("configuration_liquid_foundation", "modeling_liquid_foundation"):
        monkeypatch.delitem(sys.modules, f"liquid_dist.model.{name}", raising=False)
        with pytest.raises(ImportError, match=r"pip install 'liquid_dist\[hf\]'"):
            importlib.import_module(f"liquid_dist.model.{name}")


@pytest.mark.slow
def test_transformers_loads_converted_ablated_and_expert_parallel_models(tmp_path: Path) -> None:
    from test_elastic_resume import resumed

    from liquid_dist.convert import convert

    ablated = make_model(0, ablate=list(ABLATIONS[:3])).save_pretrained(tmp_path / "ablated")
    expert_parallel = convert(resumed("w2", "w2ep2"), tmp_path / "ep", progress=False)
    dirs = {"trained": converted(), "ablated": ablated, "ep": expert_parallel}
    jobs, data = [], {}
    for name, d in dirs.items():
        data[name] = probe(LiquidFoundationModelOptimized.from_pretrained(d),
                           tmp_path / f"{name}.probe.pt")
        jobs.append({"model": str(d), "probe": str(tmp_path / f"{name}.probe.pt"),
                     "full": name == "trained", "out": str(tmp_path / f"{name}.out")})
    run_worker(tmp_path, jobs)
    got = {name: torch.load(tmp_path / f"{name}.out", weights_only=True) for name in dirs}
    for name, d in dirs.items():
        check_against_project(d, data[name], got[name])
    assert got["ep"]["config"]["num_experts"] > 1 and got["ablated"]["config"]["ablate"]

    # the trained model: tokenizer, decoding modes, save_pretrained, bf16 + device_map
    trained, model = got["trained"], LiquidFoundationModelOptimized.from_pretrained(converted())
    assert trained["config"]["class"] == "LiquidFoundationConfig"
    tok = Tokenizer(converted() / "tokenizer.model")
    assert trained["tokenizer"]["fast"]
    assert trained["tokenizer"]["special"] == [tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id]
    assert trained["tokenizer"]["ids"] == [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    n = data["trained"]["max_new_tokens"]
    for key in ("sampled", "beams"):
        ids = trained[key]
        assert ids.shape[0] == 2 and 1 < ids.shape[1] <= n + 1, key
        assert (ids[:, 0] == model.cfg.decoder_start_token_id).all(), key
        assert not set(ids.flatten().tolist()) & set(tok.sentinel_ids), key
    assert torch.equal(trained["left_padded_logits"], trained["logits"])
    assert torch.equal(trained["left_padded_greedy"], trained["greedy"])
    assert torch.equal(trained["reloaded_logits"], trained["logits"])
    reloaded = LiquidFoundationModelOptimized.from_pretrained(tmp_path / "trained.out.saved")
    assert reloaded.generation_config == model.generation_config
    half = LiquidFoundationModelOptimized.from_pretrained(converted(), dtype=torch.bfloat16)
    d = data["trained"]
    with torch.no_grad():
        ref = half(d["enc"], d["dec"], encoder_attention_mask=d["mask"]).logits.float()
    assert trained["bf16_dtype"] == "torch.bfloat16"
    assert torch.equal(trained["bf16_logits"], ref)
