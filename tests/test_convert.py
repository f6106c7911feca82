"""Checkpoint -> single-GPU format: exact weights, refused checkpoints, from_pretrained, init_from.

The multi-process tests reuse train_fixtures.reference_run(): 2 ranks, ZeRO-3,
8 steps on the Shakespeare shards (one checkpoint, step 8).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_fixtures as tf
import yaml
from safetensors.torch import load_file

from liquid_dist.checkpoint_format import (
    CHECKSUMS,
    CheckpointError,
    checksummed_files,
    file_digest,
)
from liquid_dist.config import ModelConfig
from liquid_dist.convert import convert, parse_size
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.model.pretrained import INDEX_NAME, load_weights_into, read_model_config

STEP = "step_00000008"


def converted(dtype: str = "fp32") -> Path:
    """The reference run converted once per dtype."""
    return _converted(dtype)


@functools.cache
def _converted(dtype: str) -> Path:
    return convert(tf.reference_run(), tf.TMP / f"converted_{dtype}", dtype=dtype,
                   progress=False)


def weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def copy_run(tmp_path: Path) -> Path:
    """A private copy of the reference run's checkpoint that a test may break."""
    src = tf.reference_run() / "checkpoints"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / STEP, run / "checkpoints" / STEP)
    shutil.copy(src / "latest", run / "checkpoints" / "latest")
    return run


def reseal(run: Path) -> None:
    """Record the checkpoint's files as they are now: a checkpoint written inconsistent,
    not one damaged after it was written (what the converter's own checks are for)."""
    ckpt = run / "checkpoints" / STEP
    files = {name: file_digest(ckpt / name) for name in checksummed_files(ckpt)}
    (ckpt / CHECKSUMS).write_text(json.dumps({"algorithm": "sha256", "files": files}))


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=tf.REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def deepspeed_consolidation(run: Path) -> dict[str, torch.Tensor]:
    """The reference: DeepSpeed's own merge of a run's latest ZeRO checkpoint (no experts),
    or its one full state dict (ZeRO stage 0)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run / "checkpoints"
    full = ckpt / (ckpt / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    if full.is_file():
        sd = torch.load(full, map_location="cpu", weights_only=False)["module"]
    else:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    return {k.removeprefix("model."): v.float() for k, v in sd.items()}


def random_inputs(cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    enc = torch.randint(2, cfg.vocab_size, (2, cfg.max_encoder_length), generator=g)
    dec = torch.randint(2, cfg.vocab_size, (2, cfg.max_decoder_length), generator=g)
    mask = torch.ones_like(enc, dtype=torch.bool)
    mask[1, 20:] = False
    return enc, dec, mask


# ---------------------------------------------------------------- fast units


def test_parse_size_units() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("100KB") == 100_000
    assert parse_size("1234") == 1234
    with pytest.raises(ValueError):
        parse_size("five")


def test_from_pretrained_refuses_mismatched_weights(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, n_encoder_layers=1,
                      n_decoder_layers=1, ffn_dim=64, max_encoder_length=32,
                      max_decoder_length=16, window=8, freq_heads=2, band_block=16,
                      hyena_filter_dim=8)
    model = LiquidFoundationModelOptimized(cfg)
    from safetensors.torch import save_file

    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.bias"}
    sd.pop("encoder.embedding.token_embedding.weight")
    sd.pop("decoder.embedding.token_embedding.weight")
    sd.pop("lm_head.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(__import__("dataclasses").asdict(cfg)))
    with pytest.raises(ValueError, match=r"missing \['lm_head.bias'\]"):
        load_weights_into(LiquidFoundationModelOptimized(cfg), tmp_path)


# ---------------------------------------------------------- on a real run


@pytest.mark.slow
def test_dense_tensors_equal_deepspeed_consolidation_bitwise() -> None:
    deepspeed_sd = deepspeed_consolidation(tf.reference_run())
    ours = weights(converted())
    # every stored tensor once; the aliases are the tied embedding / lm_head
    assert set(ours) <= set(deepspeed_sd)
    assert set(deepspeed_sd) - set(ours) == {"lm_head.weight",
                                            "encoder.embedding.token_embedding.weight",
                                            "decoder.embedding.token_embedding.weight"}
    for name, t in ours.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, deepspeed_sd[name]), name


def assert_same_logits(model, live) -> None:
    """fp32 logits of ``model`` equal ``live``'s on the same random inputs, within 1e-5."""
    enc, dec, mask = random_inputs(model.cfg)
    with torch.no_grad():
        want = live(enc, dec, encoder_attention_mask=mask).logits
        got = model(enc, dec, encoder_attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_converted_model_logits_equal_the_trained_weights_logits() -> None:
    from liquid_dist.convert import load_trained_model

    live, _ = load_trained_model(tf.reference_run())
    model = LiquidFoundationModelOptimized.from_pretrained(converted())
    assert model.lm_head.weight is model.token_embedding.weight  # re-tied
    assert_same_logits(model, live)


@pytest.mark.slow
def test_bf16_export_is_the_fp32_export_rounded() -> None:
    fp32, bf16 = weights(converted("fp32")), weights(converted("bf16"))
    assert fp32.keys() == bf16.keys()
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
    model = LiquidFoundationModelOptimized.from_pretrained(converted("bf16"))
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_sharded_export_has_an_index_and_the_same_weights(tmp_path: Path) -> None:
    out = convert(tf.reference_run(), tmp_path / "sharded", max_shard_size="100KB",
                  progress=False)
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert weights(out).keys() == set(index["weight_map"])
    single = weights(converted())
    for name, t in weights(out).items():
        assert torch.equal(t, single[name]), name
    model = LiquidFoundationModelOptimized.from_pretrained(out)
    for name, t in single.items():
        assert torch.equal(model.state_dict()[name], t), name


@pytest.mark.slow
def test_output_directory_has_config_tokenizer_generation_config_and_card() -> None:
    out = converted()
    run_cfg = yaml.safe_load((tf.reference_run() / "checkpoints" / STEP / "config.yaml")
                             .read_text())
    cfg = read_model_config(out)
    assert cfg.vocab_size == run_cfg["model"]["vocab_size"] and cfg.tie_embeddings
    assert (out / "tokenizer.model").read_bytes() == tf.train_data().tokenizer.read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id and gen["max_new_tokens"] == 16
    card = (out / "README.md").read_text()
    last = [r for r in map(json.loads, (tf.reference_run() / "metrics.jsonl").read_text()
                           .splitlines()) if r["kind"] == "train"][-1]
    assert "| training_steps | 8 |" in card
    assert "| tokens_seen | 1536 |" in card  # 8 steps x 2 ranks x 2 samples x (32 + 16)
    assert f"| loss | {last['loss']:.4f} |" in card and "val_ce" in card


@pytest.mark.slow
def test_from_pretrained_imports_no_deepspeed() -> None:
    code = ("import sys\nfrom liquid_dist.model import LiquidFoundationModelOptimized as M\n"
            f"m = M.from_pretrained({str(converted())!r}, device='cpu')\n"
            "assert not [k for k in sys.modules if k.startswith('deepspeed')], 'deepspeed'\n"
            "print(sum(p.numel() for p in m.parameters()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tf.REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) > 0


# ----------------------------------------------------- refused checkpoints


@pytest.mark.slow
def test_refuses_a_missing_rank_file(tmp_path: Path) -> None:
    run = copy_run(tmp_path)
    (run / "checkpoints" / STEP / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    reseal(run)
    with pytest.raises(CheckpointError,
                       match=r"missing rank file.*zero_pp_rank_1_mp_rank_00_optim_states\.pt "
                             r"\(rank 1 of 2\)"):
        convert(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_refuses_rank_files_of_another_deepspeed_version(tmp_path: Path) -> None:
    run = copy_run(tmp_path)
    for f in (run / "checkpoints" / STEP).glob("zero_pp_rank_*_model_states.pt"):
        state = torch.load(f, weights_only=False)  # the test's own file
        state["ds_version"] = "0.20.1"
        torch.save(state, f)
    reseal(run)
    with pytest.raises(CheckpointError,
                       match=r"DeepSpeed 0\.20\.1 \(of checkpoint .*step_00000008\)"):
        convert(run, tmp_path / "out", progress=False)


@pytest.mark.slow
def test_refuses_a_shape_mismatch_and_a_wrong_expert_count(tmp_path: Path) -> None:
    run = copy_run(tmp_path)
    cfg_file = run / "checkpoints" / STEP / "config.yaml"
    original = yaml.safe_load(cfg_file.read_text())
    changed = json.loads(json.dumps(original))
    changed["model"]["ffn_dim"] = 48
    cfg_file.write_text(yaml.safe_dump(changed))
    reseal(run)
    with pytest.raises(CheckpointError,
                       match=r"shape mismatch encoder\.blocks\.0\.ffn\.fc1\.weight: "
                             r"checkpoint \(64, 32\), config \(48, 32\)"):
        convert(run, tmp_path / "out", progress=False)
    changed = json.loads(json.dumps(original))
    changed["model"]["moe"]["num_experts"] = 3
    cfg_file.write_text(yaml.safe_dump(changed))
    reseal(run)
    with pytest.raises(CheckpointError, match=r"wrong expert count in .*moe\.w1: checkpoint "
                                              r"has 2 experts, model\.moe\.num_experts = 3"):
        convert(run, tmp_path / "out", progress=False)


@pytest.mark.slow
def test_a_checkpoint_damaged_after_it_was_written_is_refused_naming_the_file(
        tmp_path: Path) -> None:
    """One flipped byte, a truncated file, a deleted file: the converter, the sampler's and
    evaluator's loader and the offline verifier (``python -m liquid_dist.checkpoint_format
    verify``) name each."""
    from liquid_dist.convert import load_trained_model

    run = copy_run(tmp_path)
    ckpt = run / "checkpoints" / STEP
    ok = cli("liquid_dist.checkpoint_format", "verify", str(run))
    assert ok.returncode == 0 and ok.stdout.startswith("ok "), ok.stdout + ok.stderr
    optim = ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0x01
    optim.write_bytes(bytes(data))
    model_states = ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:100])
    (ckpt / "config.yaml").unlink()
    expected = (r"zero_pp_rank_0_mp_rank_00_optim_states\.pt: contents changed.*"
                r"zero_pp_rank_1_mp_rank_00_model_states\.pt: 100 bytes, \d+ written")
    with pytest.raises(CheckpointError, match=r"config\.yaml: missing; " + expected):
        convert(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"config\.yaml: missing; " + expected):
        load_trained_model(run)
    bad = cli("liquid_dist.checkpoint_format", "verify", str(run))
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "config.yaml: missing" in (
        bad.stdout)


@pytest.mark.slow
def test_refuses_no_latest_and_an_incomplete_checkpoint(tmp_path: Path) -> None:
    run = copy_run(tmp_path)
    ckpts = run / "checkpoints"
    (ckpts / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no 'latest' file.*step_00000008"):
        convert(run, tmp_path / "out", progress=False)
    assert convert(run, tmp_path / "out", step=8, progress=False).is_dir()
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5"):
        convert(run, tmp_path / "out5", step=5, progress=False)
    (ckpts / "latest").write_text(STEP + "\n")
    (ckpts / STEP / "trainer_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"names step_00000008, which is not a complete"):
        convert(run, tmp_path / "out2", progress=False)
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint"):
        convert(run, tmp_path / "out2", step=8, progress=False)


@pytest.mark.slow
def test_never_overwrites_output_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = cli("liquid_dist.convert", str(tf.reference_run()), "--output", str(out))
    assert proc.returncode == 2 and "exists: pass --overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    proc = cli("liquid_dist.convert", str(tf.reference_run()), "--output", str(out),
               "--overwrite", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "100%" in proc.stderr  # the progress bar


@functools.cache
def ep_run() -> Path:
    """2 ranks, ZeRO-3, ep_size 2 (4 experts, 2 per rank), 2 steps, and the live model's
    logits at the end (tests/live_logits_harness.py)."""
    run_dir = tf.TMP / "convert_ep2"
    proc = tf.launch(2, tf.base_overrides(run_dir, steps=2)
                     + ["model.moe.num_experts=4", "parallel.ep_size=2"], launcher="torchrun",
                     script="tests/live_logits_harness.py",
                     script_args=["--logits", str(run_dir / "live_logits.pt")])
    assert proc.returncode == 0, tf.tail(proc)
    return run_dir


@pytest.mark.slow
def test_expert_parallel_checkpoint_converts_to_the_live_model() -> None:
    from live_logits_harness import probe_inputs

    from liquid_dist.convert import load_trained_model

    run = ep_run()
    out = convert(run, tf.TMP / "converted_ep2", progress=False)
    ours = weights(out)
    experts = [k for k in ours if k.endswith((".moe.w1", ".moe.b1", ".moe.w2", ".moe.b2"))]
    assert len(experts) == 8 and all(ours[k].shape[0] == 4 for k in experts)
    model = LiquidFoundationModelOptimized.from_pretrained(out).eval()
    m = model.cfg
    enc, dec, mask = probe_inputs(m.vocab_size, m.max_encoder_length, m.max_decoder_length)
    with torch.no_grad():
        logits = model(enc, dec, encoder_attention_mask=mask).logits
    live = torch.load(run / "live_logits.pt", weights_only=True)
    torch.testing.assert_close(logits, live, rtol=0, atol=1e-5)
    sampler_model, _ = load_trained_model(run)  # the sampler reads the same files
    for name, t in ours.items():
        assert torch.equal(sampler_model.state_dict()[name], t), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_zero_stage_0_and_2_checkpoints_convert_like_deepspeed_consolidates(stage: int) -> None:
    run = tf.TMP / f"convert_zero{stage}"
    proc = tf.launch(2, tf.base_overrides(run, steps=1) + [f"parallel.zero_stage={stage}"],
                     launcher="torchrun")
    assert proc.returncode == 0, tf.tail(proc)
    deepspeed_sd = deepspeed_consolidation(run)
    ours = weights(convert(run, tf.TMP / f"converted_zero{stage}", progress=False))
    assert len(ours) == 164
    for name, t in ours.items():
        assert torch.equal(t, deepspeed_sd[name]), name
