"""The run plan (liquid_dist.train.prepare, liquid_dist.parallel.build_plan): a config
resolved once, before any process group, into everything the build reads, and its
start point (the checkpoint it resumes, verified); and the
module layering it leaves (no back-arrows into data/ from the config, out of the model
package, or from parallel/ into train/; the trainer imports no model classes)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import train_fixtures as tf

from liquid_dist.checkpoint_format import CheckpointError
from liquid_dist.config import ConfigError, load_config
from liquid_dist.data import read_manifest
from liquid_dist.data.errors import DataError
from liquid_dist.parallel.build_plan import resolve_build
from liquid_dist.parallel.deepspeed_config import build_deepspeed_config
from liquid_dist.train.prepare import StartPoint, resolve_run, resolve_start

TINY = tf.REPO / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(TINY, tf.base_overrides(tmp_path / "run") + list(extra))


def test_the_plan_holds_every_decision_of_the_build(tmp_path: Path) -> None:
    plan = resolve_run(_cfg(tmp_path), world_size=2, device_type="cpu")
    cfg, build = plan.config, plan.build
    assert cfg.model.vocab_size == 600  # from the tokenizer ('auto' in tiny.yaml)
    assert (build.world_size, build.device_type, build.precision) == (2, "cpu", "fp32")
    # the model is built with the decided backend; the config (saved with every
    # checkpoint) keeps what the user wrote
    assert cfg.model.moe.backend == "auto" and build.moe_backend == "grouped_mm"
    assert build.model_config.moe.backend == "grouped_mm"
    assert build.ds_config == build_deepspeed_config(cfg, world_size=2, precision="fp32")
    assert build.local_experts == cfg.model.moe.num_experts
    # both data streams resolved for this world size (a rank opens its own)
    assert plan.train_data.world_size == plan.val_data.world_size == 2
    assert plan.val_data.steps_per_epoch == cfg.train.eval_steps and not plan.val_data.shuffle
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.val_data = None  # type: ignore[misc]
    # --resume auto on an empty run directory, no train.init_from: a fresh start
    assert resolve_start(plan, "auto") == StartPoint()


def test_the_build_plan_decides_precision_backend_and_layout_for_the_device() -> None:
    cfg = load_config(TINY, ["model.vocab_size=600", "parallel.ep_size=2",
                             "parallel.zero_stage=3"])
    gpu = resolve_build(cfg, world_size=4, device_type="cuda")
    assert (gpu.precision, gpu.moe_backend, gpu.local_experts) == (
        "bf16", "grouped_mm", cfg.model.moe.num_experts // 2)
    fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    assert resolve_build(fp32, world_size=4, device_type="cuda").moe_backend == "loop"
    with pytest.raises(ConfigError, match=r"'parallel.ep_size' = 2: expected a divisor of the "
                                          r"world size \(3\)"):
        resolve_build(cfg, world_size=3, device_type="cpu")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        resolve_build(load_config(TINY), world_size=1, device_type="cpu")


def test_expert_parallelism_rules_of_the_config_alone_are_the_configs() -> None:
    with pytest.raises(ConfigError, match="1 unless parallel.zero_stage is 3"):
        load_config(TINY, ["parallel.ep_size=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="divisor of model.moe.num_experts"):
        load_config(TINY, ["parallel.ep_size=3", "parallel.zero_stage=3"])


def test_files_are_read_and_checked_by_the_plan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="room for span corruption targets"):
        resolve_run(_cfg(tmp_path, "data.objective=span_corruption", "data.decoder_length=2"),
                    world_size=1, device_type="cpu")
    with pytest.raises(DataError, match="/nonexistent/shards"):
        resolve_run(_cfg(tmp_path, "data.val_shards=/nonexistent/shards"), world_size=1,
                    device_type="cpu")
    with pytest.raises(CheckpointError, match="no such run or checkpoint directory"):
        resolve_start(resolve_run(_cfg(tmp_path), world_size=1, device_type="cpu"),
                      str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="no such run or checkpoint directory"):
        resolve_start(resolve_run(_cfg(tmp_path, f"train.init_from={tmp_path / 'nothing'}"),
                                  world_size=1, device_type="cpu"))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth), relative imports made absolute."""
    package = ".".join(path.relative_to(tf.REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def test_the_token_plan_counts_what_the_run_draws_from_each_source(tmp_path: Path) -> None:
    plan = resolve_run(_cfg(tmp_path), world_size=2, device_type="cpu")
    data, cfg = plan.train_data, plan.config
    totals = read_manifest(tf.train_data().shards)["totals"]["train"]
    assert data.steps_per_epoch >= cfg.train.max_steps
    raw = [data.shapes[o].raw for o in data.epoch_objectives(0)[:cfg.train.max_steps]]
    (source,) = plan.token_plan.sources
    assert source.available == totals["tokens"] + totals["documents"]  # an EOS per document
    assert source.planned == 4 * sum(raw)  # S = 2 ranks x 2 examples of each step's objective
    assert source.epochs == source.planned / source.available
    assert (source.share, source.max_repetition) == (1.0, 4.0)  # data.max_repetition
    shards = str(tf.train_data().shards)
    two = resolve_run(_cfg(tmp_path, f"data.sources=[{{name: web, shards: {shards}, weight: 3}}, "
                                     f"{{name: code, shards: {shards}, max_repetition: 9}}]"),
                      world_size=2, device_type="cpu").token_plan
    assert [(s.name, s.share, s.max_repetition) for s in two.sources] == [
        ("web", 0.75, 4.0), ("code", 0.25, 9)]
    assert sum(s.planned for s in two.sources) == pytest.approx(source.planned, abs=1)
    assert "web: 0.750" in two.table() and "code: 0.250" in two.table()
    assert two.to_dict()["sources"][1]["planned_tokens"] == two.sources[1].planned


def test_a_source_read_beyond_its_max_repetition_is_refused_naming_it(tmp_path: Path) -> None:
    shards = str(tf.train_data().shards)
    steps = "train.max_steps=4000"
    with pytest.raises(ConfigError, match=r"'data.max_repetition' = 4.0: expected at least "
                                          r"\d+\.\d\d: source 'train' has [\d,]+ tokens and "
                                          r"train.max_steps=4000 draws [\d,]+ of them"):
        resolve_run(_cfg(tmp_path, steps), world_size=2, device_type="cpu")
    resolve_run(_cfg(tmp_path, steps, "data.max_repetition=null"), world_size=2,
                device_type="cpu")
    with pytest.raises(ConfigError, match=r"'data.sources\[1\].max_repetition' = 0.1: .* source "
                                          "'code'"):
        resolve_run(_cfg(tmp_path, "train.max_steps=200", "data.max_repetition=null",
                         f"data.sources=[{{name: web, shards: {shards}}}, "
                         f"{{name: code, shards: {shards}, max_repetition: 0.1}}]"),
                    world_size=2, device_type="cpu")


def test_no_back_arrows_from_the_config_into_data_or_out_of_the_model_package() -> None:
    """The run config takes its model section from the model package only; the model
    package (a model directory's remote code) imports nothing of the project outside it
    (the tokenizer saves itself: liquid_dist.data.Tokenizer.save_pretrained); the
    parallel layer builds the engine without the training engine."""
    root = tf.REPO / "liquid_dist"
    outside = {m for m in _imports(root / "config.py") if m.startswith("liquid_dist.")}
    assert outside and all(m.startswith("liquid_dist.model.config") for m in outside), outside
    for path in (root / "model").glob("*.py"):
        outside = {m for m in _imports(path)
                   if m.startswith("liquid_dist.") and not m.startswith("liquid_dist.model")}
        assert not outside, path.name
    for path in (root / "parallel").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("liquid_dist.train")}, path.name
    trainer = _imports(root / "train" / "trainer.py")
    assert not {m for m in trainer if m.startswith("liquid_dist.model")}, trainer


def test_resume_verifies_a_checkpoint_before_reading_it(tmp_path: Path) -> None:
    """auto passes over a damaged newest checkpoint to the one before (saying why); a
    checkpoint named explicitly is refused instead, naming the file."""
    from test_train_units import _FakeEngine

    from liquid_dist.train.checkpoint import CheckpointManager
    from liquid_dist.train.prepare import resolve_vocabulary
    from liquid_dist.train.state import TrainerState

    cfg = _cfg(tmp_path)
    resolved = resolve_vocabulary(cfg)
    manager = CheckpointManager(tmp_path / "run", keep_last=3, rank=0, world_size=1)
    for step in (2, 4):
        manager.save(_FakeEngine(), TrainerState(step=step), rank_state={"loader": {}},
                     config=resolved.to_dict(), tokenizer_path=resolved.data.tokenizer)
    shard = (tmp_path / "run" / "checkpoints" / "step_00000004"
             / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # the same size, another byte
    shard.write_bytes(bytes(data))
    plan = resolve_run(cfg, world_size=1, device_type="cpu")
    start = resolve_start(plan, "auto")
    assert start.resume is not None and start.resume.tag == "step_00000002"
    (why,) = start.resume_skipped
    assert "step_00000004 is damaged: zero_pp_rank_0_mp_rank_00_model_states.pt: contents " \
           "changed" in why
    with pytest.raises(CheckpointError, match="step_00000004 is damaged"):
        resolve_start(plan, str(shard.parent))


def test_a_resume_that_rewrites_the_trained_mixture_is_refused_before_any_rank(
        tmp_path: Path) -> None:
    from test_train_units import _FakeEngine

    from liquid_dist.train.checkpoint import CheckpointManager
    from liquid_dist.train.prepare import resolve_vocabulary
    from liquid_dist.train.state import TrainerState

    shards = str(tf.train_data().shards)

    def cfg(stages: str, names: str = "web, code", epoch: int = 40):
        sources = ", ".join(f"{{name: {n}, shards: {shards}}}" for n in names.split(", "))
        return _cfg(tmp_path, f"data.sources=[{sources}]", f"data.stages={stages}",
                    f"data.batches_per_epoch={epoch}")

    first = cfg("[{start_step: 0, weights: {web: 1}}, {start_step: 6, weights: {code: 1}}]")
    resolved = resolve_vocabulary(first)
    CheckpointManager(tmp_path / "run", keep_last=3, rank=0, world_size=1).save(
        _FakeEngine(), TrainerState(step=4), rank_state={"loader": {}},
        config=resolved.to_dict(), tokenizer_path=resolved.data.tokenizer)
    # the annealing stage moved to the resume step, and a source added after it: fine
    later = cfg("[{start_step: 0, weights: {web: 1}}, {start_step: 4, weights: {code: 1}}, "
                "{start_step: 7, weights: {book: 1}}]", "web, code, book")
    assert resolve_start(resolve_run(later, world_size=1, device_type="cpu"), "auto").resume
    plan = resolve_run(later, world_size=1, device_type="cpu")
    assert [round(s.share, 3) for s in plan.token_plan.sources] == [0.5, 0.375, 0.125]
    earlier = cfg("[{start_step: 0, weights: {web: 1}}, {start_step: 3, weights: {code: 1}}]")
    with pytest.raises(ConfigError, match=r"'data.stages' = .*before its step 4: data.stages: "
                                          r"the mixture at step 3 was \{'web': 1.0\}, it is "
                                          r"\{'code': 1.0\} now"):
        resolve_start(resolve_run(earlier, world_size=1, device_type="cpu"), "auto")
    grown = cfg("[{start_step: 0, weights: {web: 1}}, {start_step: 7, weights: {book: 1}}]",
                "web, code, book", epoch=0)
    with pytest.raises(ConfigError, match=r"'data.batches_per_epoch' = 0: .*sources \['book'\] "
                                          "are added on resume"):
        resolve_start(resolve_run(grown, world_size=1, device_type="cpu"), "auto")
    fewer = cfg("[{start_step: 0, weights: {web: 1}}]", "web")
    with pytest.raises(ConfigError, match=r"'data.sources' = \['web'\]: .*\['code'\] included: "
                                          "sources may be added on resume, not removed"):
        resolve_start(resolve_run(fewer, world_size=1, device_type="cpu"), "auto")
