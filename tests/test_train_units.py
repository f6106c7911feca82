"""Single-process pieces of the training engine: schedule, DeepSpeed config, rank discovery,
signals, FLOPs, metrics files, checkpoint bookkeeping, launch-time config resolution."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import train_fixtures as tf

from liquid_dist.checkpoint_format import (
    LATEST,
    TRAINER_STATE,
    CheckpointError,
    CheckpointRef,
    find_checkpoint,
    find_damage,
    hash_shares,
    newest_valid_checkpoint,
    verify_checkpoint,
)
from liquid_dist.config import Config, ConfigError, ModelConfig, WandbConfig, load_config
from liquid_dist.model import LiquidFoundationModelOptimized
from liquid_dist.parallel import build_deepspeed_config, resolve_dist_env
from liquid_dist.parallel.build_plan import resolve_build
from liquid_dist.train.checkpoint import CheckpointManager, check_resumable
from liquid_dist.train.flops import forward_flops
from liquid_dist.train.metrics import (
    MetricsLogger,
    read_metrics,
    truncate_metrics,
    wandb_sent_through,
)
from liquid_dist.train.prepare import resolve_vocabulary
from liquid_dist.train.schedule import lr_at
from liquid_dist.train.signals import StopFlag
from liquid_dist.train.state import TrainerState


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=20)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    after = [lr_at(s, **kw) for s in range(3, 20)]
    assert all(a > b for a, b in zip(after, after[1:], strict=False))
    assert lr_at(19, **kw) == pytest.approx(0.1)
    assert lr_at(11, **kw) == pytest.approx(0.55)  # half-way: mean of lr and min_lr
    assert lr_at(500, **kw) == pytest.approx(0.1)
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == pytest.approx(1.0)


def _cfg(**train: object) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train),
                               model=dataclasses.replace(cfg.model, vocab_size=1000))


def test_deepspeed_config_sets_every_trap_explicitly() -> None:
    cfg = _cfg(micro_batch_size=3, grad_accum=4, grad_clip=0.5)
    ds = build_deepspeed_config(cfg, world_size=2, precision="fp32")
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["memory_efficient_linear"] is False
    # the working set: two of the largest unit (a block here), not DeepSpeed's 1e9
    zero, model = ds["zero_optimization"], LiquidFoundationModelOptimized(cfg.model)
    block = max(sum(p.numel() for p in b.parameters())
                for b in [*model.encoder.blocks, *model.decoder.blocks])
    assert block > model.token_embedding.weight.numel()
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 2 * block
    assert zero["stage3_prefetch_bucket_size"] == zero["reduce_bucket_size"] == block
    assert zero["sub_group_size"] == block
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # CPU: fp32
    assert build_deepspeed_config(_cfg(grad_clip=0.0), world_size=1,
                                  precision="fp32")["gradient_clipping"] == 0.0
    # the run's precision, decided once by the build plan: bf16 on GPU by default
    cuda = resolve_build(cfg, world_size=1, device_type="cuda")
    assert cuda.precision == "bf16" and cuda.ds_config["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_build(_cfg(precision="fp16"), world_size=1, device_type="cpu")


def test_rank_discovery_from_launcher_slurm_and_nothing() -> None:
    e = resolve_dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                          "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "SLURM_PROCID": "0"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        3, 4, 1, "h0", 1234)
    e = resolve_dist_env({"RANK": "1", "WORLD_SIZE": "2"}, local_rank_arg=1)
    assert e.local_rank == 1 and e.master_port == 29500
    e = resolve_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "MASTER_ADDR": "n1"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr) == (5, 8, 1, "n1")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        resolve_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    with pytest.raises(ConfigError, match="RANK"):
        resolve_dist_env({"RANK": "2", "WORLD_SIZE": "2"})
    e = resolve_dist_env({})
    assert (e.rank, e.world_size) == (0, 1) and e.master_port > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_sets_the_flag_and_nothing_else(sig: signal.Signals) -> None:
    before = signal.getsignal(sig)
    flag = StopFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)  # a second copy (Slurm + torchrun) is harmless
        assert flag.received == sig.name
    finally:
        flag.restore()
    assert signal.getsignal(sig) == before


def test_flops_count_experts_by_top_k_and_scale_with_lengths() -> None:
    m = ModelConfig(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64,
                    max_encoder_length=32, max_decoder_length=16, window=8, freq_heads=2,
                    band_block=16, hyena_filter_dim=8)
    m2 = dataclasses.replace(m, moe=dataclasses.replace(m.moe, top_k=2))
    one, two = forward_flops(m, 32, 16), forward_flops(m2, 32, 16)
    e = m.moe
    per_layer = e.num_experts * 2 * m.d_model * e.expert_ffn_dim  # w1 + w2
    expected = 2 * per_layer / e.num_experts * (m.n_encoder_layers * 32 + m.n_decoder_layers * 16)
    assert two.weights - one.weights == pytest.approx(expected)
    assert forward_flops(m, 32, 8).forward < one.forward
    assert one.training == pytest.approx(3 * one.forward)


def test_metrics_written_on_rank_0_only_and_truncated_on_resume(tmp_path: Path) -> None:
    lines: list[str] = []
    log0 = MetricsLogger(tmp_path / "a", rank=0, wandb_cfg=WandbConfig(), config={},
                         printer=lines.append)
    for step in (1, 2, 3):
        log0.log({"kind": "train", "step": step, "loss": float("nan") if step == 2 else 1.0},
                 f"line {step}")
    MetricsLogger(tmp_path / "b", rank=1, wandb_cfg=WandbConfig(), config={}).log(
        {"kind": "train", "step": 1})
    assert not (tmp_path / "b").exists()
    assert lines == ["line 1", "line 2", "line 3"]
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [1.0, "nan", 1.0]
    assert truncate_metrics(tmp_path / "a", 2) == 1
    assert [r["step"] for r in read_metrics(tmp_path / "a", "train")] == [1, 2]
    json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])


class _FakeEngine:
    """Stands in for DeepSpeed (not under test here): saves one shard file per save through
    its checkpoint engine, as DeepSpeed does."""

    checkpoint_engine = None

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert save_latest is False
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        self.checkpoint_engine.save({"x": 1},
                                    str(path / "zero_pp_rank_0_mp_rank_00_model_states.pt"))


def test_checkpoints_keep_last_k_and_resolve_resume_paths(tmp_path: Path) -> None:
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer")
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, rank=0, world_size=1)
    assert newest_valid_checkpoint(tmp_path / "run") == (None, [])
    for step in (5, 10, 15):
        ref = mgr.save(_FakeEngine(), TrainerState(step=step, run_id="abc"),
                       rank_state={"loader": {"pos": step}}, config={"train": {}},
                       tokenizer_path=tok).ref
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        "step_00000010", "step_00000015"]
    assert (ckpts / LATEST).read_text().strip() == "step_00000015"
    assert ref == CheckpointRef(ckpts, "step_00000015")
    state = torch.load(ref.path / TRAINER_STATE, weights_only=True)
    assert state["step"] == 15 and state["ranks"][0]["loader"] == {"pos": 15}
    restored = TrainerState()
    restored.load_state_dict(state)
    assert restored == TrainerState(step=15, run_id="abc")
    with pytest.raises(CheckpointError, match="trainer state without \\['run_id'\\]"):
        TrainerState().load_state_dict({k: v for k, v in state.items() if k != "run_id"})
    assert (ref.path / "tokenizer.model").read_bytes() == b"tokenizer"
    verify_checkpoint(ref.path)  # every file as written, the rank files included
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in json.loads(
        (ref.path / "checksums.json").read_text())["files"]
    (ref.path / "stray.pt").write_bytes(b"?")
    with pytest.raises(CheckpointError, match="stray.pt: not written with the checkpoint"):
        verify_checkpoint(ref.path)
    (ref.path / "stray.pt").unlink()
    assert newest_valid_checkpoint(tmp_path / "run") == (ref, [])
    assert find_checkpoint(str(tmp_path / "run")) == ref
    assert find_checkpoint(str(ckpts / "step_00000010")).tag == "step_00000010"
    assert find_checkpoint("none") is None
    with pytest.raises(CheckpointError, match="has no 'latest' file"):
        find_checkpoint(str(tmp_path))
    assert find_checkpoint(str(tmp_path / "run"), step=10).tag == "step_00000010"
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5; complete ones: "
                                              r"\['step_00000010', 'step_00000015'\]"):
        find_checkpoint(str(tmp_path / "run"), step=5)
    (ckpts / "step_00000020.tmp").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        find_checkpoint(str(tmp_path / "run"), step=20)
    assert mgr.remove_incomplete() == ["step_00000020.tmp"]


def test_the_ranks_share_a_checkpoint_verification_each_reading_its_part(
        tmp_path: Path) -> None:
    """Every file in exactly one rank's share, the bytes spread evenly; each rank finds the
    damage of its own share (rank 0 the files not written too), and the damages of all
    the ranks together are what one process checking everything finds."""
    sizes = {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt": size
             for r in range(6) for kind, size in (("model", 10), ("optim", 1000))}
    sizes |= {"trainer_state.pt": 5, "config.yaml": 1, "tokenizer.model": 300}
    for world in (1, 2, 4, 7, 40):
        shares = hash_shares(sizes, world)
        assert sorted(n for share in shares for n in share) == sorted(sizes)
        loads = [sum(sizes[n] for n in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes.values()), (world, loads)
        assert shares == hash_shares(dict(reversed(sizes.items())), world)
    # the six large files first, then each smaller one to the least loaded rank
    assert [sum(sizes[n] for n in s) for s in hash_shares(sizes, 4)] == [2000, 2000, 1300,
                                                                           1066]
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer")

    class _Engine:
        checkpoint_engine = None

        def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
            (Path(save_dir) / tag).mkdir(parents=True)
            for r in range(3):
                (Path(save_dir) / tag / f"zero_pp_rank_{r}.pt").write_bytes(b"x" * (r + 1))

    ref = CheckpointManager(tmp_path / "run", keep_last=1, rank=0, world_size=1).save(
        _Engine(), TrainerState(step=1), rank_state={}, config={}, tokenizer_path=tok).ref
    assert all(find_damage(ref.path, rank=r, world_size=2) == [] for r in range(2))
    (ref.path / "zero_pp_rank_2.pt").write_bytes(b"yyy")
    (ref.path / "zero_pp_rank_0.pt").unlink()
    (ref.path / "stray.pt").write_bytes(b"?")
    whole = find_damage(ref.path)
    assert whole[:2] == ["stray.pt: not written with the checkpoint",
                         "zero_pp_rank_0.pt: missing"]
    assert len(whole) == 3 and whole[2].startswith("zero_pp_rank_2.pt: contents changed")
    sizes = {n: d["size"] for n, d in json.loads((ref.path / "checksums.json").read_text())[
        "files"].items()}
    parts = [find_damage(ref.path, rank=r, world_size=3) for r in range(3)]
    assert sorted(d for part in parts for d in part) == whole
    for r, (part, share) in enumerate(zip(parts, hash_shares(sizes, 3), strict=True)):
        assert {d.split(":")[0] for d in part} == (
            {n for n in share if n in ("zero_pp_rank_0.pt", "zero_pp_rank_2.pt")}
            | ({"stray.pt"} if r == 0 else set())), r
    (ref.path / "checksums.json").unlink()
    assert find_damage(ref.path, rank=1, world_size=3) == [
        "checksums.json: missing, so its files cannot be verified (written before checksums "
        "were recorded, or not by this trainer)"]


def _verify_together(rank: int, tmp: Path, paths: list[str]) -> None:
    import torch.distributed as dist

    from liquid_dist.train.checkpoint import find_damage_together

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), 2), rank=rank,
                            world_size=2)
    try:
        out = find_damage_together(Path(paths[rank]))
    except CheckpointError as exc:
        out = f"CheckpointError: {exc}"
    (tmp / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_verifying_together_reach_one_verdict(tmp_path: Path) -> None:
    """Two gloo processes: the damage that one rank's share holds reaches both; ranks that
    name different checkpoints are told so, both of them."""
    import torch.multiprocessing as mp

    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer" * 1000)
    mgr = CheckpointManager(tmp_path / "run", keep_last=2, rank=0, world_size=1)
    refs = [mgr.save(_FakeEngine(), TrainerState(step=step), rank_state={}, config={},
                     tokenizer_path=tok).ref for step in (1, 2)]
    sizes = {n: d["size"] for n, d in json.loads(
        (refs[1].path / "checksums.json").read_text())["files"].items()}
    # damage the largest file, which rank 0 hashes, and the smallest, which rank 1 hashes
    shares = hash_shares(sizes, 2)
    for name in (shares[0][0], shares[1][-1]):
        f = refs[1].path / name
        f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:])
    whole = find_damage(refs[1].path)
    assert len(whole) == 2 and {d.split(":")[0] for d in whole} == {shares[0][0],
                                                                   shares[1][-1]}
    for paths, expected in (([str(refs[1].path)] * 2, whole),
                            ([str(r.path) for r in refs],
                             "CheckpointError: the ranks verify different checkpoints ("
                             f"{refs[0].path}, {refs[1].path}): the run directory must look "
                             "the same from every node")):
        mp.spawn(_verify_together, args=(tmp_path, paths), nprocs=2)
        assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [
            expected, expected]
        (tmp_path / "store").unlink(missing_ok=True)


def test_resuming_with_another_model_is_a_config_error(tmp_path: Path) -> None:
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer")
    cfg = Config()
    mgr = CheckpointManager(tmp_path / "run", keep_last=1, rank=0, world_size=1)
    ref = mgr.save(_FakeEngine(), TrainerState(step=1), rank_state={}, config=cfg.to_dict(),
                   tokenizer_path=tok).ref
    check_resumable(cfg, ref, world_size=1)
    # training and run settings may change (the trainer's NaN message advises check_finite)
    settings = dataclasses.replace(cfg.model, activation_checkpointing=True, check_finite=True,
                                   dropout=0.2, attention_backend="sdpa")
    check_resumable(dataclasses.replace(cfg, model=settings,
                                        train=dataclasses.replace(cfg.train, lr=0.5)), ref, 1)
    moe = dataclasses.replace(cfg.model.moe, num_experts=8)
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe))
    with pytest.raises(ConfigError, match=r"'model.moe.num_experts' = 8: expected 4, the "
                                          r"architecture.*model.moe.num_experts: 4 -> 8"):
        check_resumable(changed, ref, world_size=1)

def test_vocab_auto_takes_the_tokenizers_size_and_smaller_is_refused(tmp_path: Path) -> None:
    def cfg(*extra: str) -> Config:
        return load_config(REPO_TINY, tf.base_overrides(tmp_path) + list(extra))

    assert resolve_vocabulary(cfg()).model.vocab_size == 600
    assert resolve_vocabulary(cfg("model.vocab_size=640")).model.vocab_size == 640
    with pytest.raises(ConfigError, match="tokenizer's vocabulary"):
        resolve_vocabulary(cfg("model.vocab_size=599"))
    with pytest.raises(ConfigError, match="model.eos_token_id"):
        resolve_vocabulary(cfg("model.eos_token_id=2"))


REPO_TINY = tf.REPO / "configs" / "tiny.yaml"


def test_wandb_sent_through_follows_each_attempts_mode_and_a_lost_service() -> None:
    def ev(name: str, step: int, **kw: object) -> dict:
        return {"kind": "event", "event": name, "step": step, **kw}

    def train(step: int) -> dict:
        return {"kind": "train", "step": step}

    assert wandb_sent_through([]) is None
    assert wandb_sent_through([ev("start", 0, wandb="disabled"), train(1)]) is None
    on = [ev("start", 0, wandb="offline"), train(1), train(2), ev("checkpoint", 2), train(3)]
    assert wandb_sent_through(on) == 3  # the dead attempt sent step 3 after its checkpoint
    second = on[:4] + [ev("resume", 2, wandb="offline"), train(3), train(4)]
    assert wandb_sent_through(second) == 4
    # the service died in the second attempt: none of its steps count as sent
    lost = second + [ev("wandb_lost", 5), train(5), ev("checkpoint", 5)]
    assert wandb_sent_through(lost) == 2
    assert wandb_sent_through(lost + [ev("resume", 5, wandb="offline"), train(6)]) == 6


class _DyingWandbRun:
    """A wandb run whose service is gone (what the job's SIGTERM does to it)."""

    def log(self, data: dict, step: int) -> None:
        raise ConnectionResetError("Connection lost")

    def finish(self) -> None:
        raise ConnectionResetError("Connection lost")


def test_a_failing_wandb_turns_wandb_off_and_keeps_logging(tmp_path: Path) -> None:
    lines: list[str] = []
    log = MetricsLogger(tmp_path, rank=0, wandb_cfg=WandbConfig(), config={},
                        sent_through=2, printer=lines.append)
    log._wandb = _DyingWandbRun()
    log.log({"kind": "train", "step": 2, "loss": 1.0})  # sent before: not sent again
    assert log._wandb is not None
    log.log({"kind": "train", "step": 3, "loss": 1.0})
    log.log({"kind": "train", "step": 4, "loss": 1.0})
    log.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 3, 4]
    assert [r for r in records if r["kind"] == "event"] == [
        {"kind": "event", "event": "wandb_lost", "step": 3}]
    assert lines[0].startswith("wandb failed at step 3 (ConnectionResetError: Connection lost)")


def test_deepspeed_internals_are_used_with_the_version_they_were_written_for() -> None:
    from liquid_dist.parallel.ds_compat import (
        DEEPSPEED_VERSION,
        DeepSpeedVersionError,
        check_deepspeed_version,
    )

    check_deepspeed_version()  # the installed one (scripts/setup_env.sh pins it)
    check_deepspeed_version(DEEPSPEED_VERSION, "of checkpoint X")
    with pytest.raises(DeepSpeedVersionError, match=r"DeepSpeed 0\.20\.1 \(of checkpoint X\): "
                                                    r".*as they are in DeepSpeed 0\.19\.8"):
        check_deepspeed_version("0.20.1", "of checkpoint X")
